"""The reward-model interface: ``score(images, prompts) -> (N,)``, higher is better.

Every reward (digits classifier, CLIP score, PickScore, HPSv2.1, ImageReward, LAION aesthetic) is a ``RewardModel``:
it carries a ``name`` and a ``version`` (hub id + resolved commit, or local folder + content hash: what a run
records) and scores N (image, prompt) pairs. Images are a list of PIL images or a float tensor (N, C, H, W) in
[0, 1]; ``score`` checks them, splits them into batches of ``batch_size`` and returns float32 scores on the CPU.
A subclass implements ``score_batch`` on one batch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ImageBatch = list[Image.Image] | torch.Tensor


class RewardModel:
    """Scores (image, prompt) pairs; subclasses set ``name``/``version`` and implement ``score_batch``."""

    name: str = ""
    version: str = ""
    batch_size: int = 16

    def score_batch(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        """One batch of n images (as given to ``score``) and n prompts -> (n,) scores."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_batch(images, prompts).")

    @torch.no_grad()
    def score(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        """Score image i against prompt i: N images (PIL list or (N, C, H, W) in [0, 1]) -> (N,) float32 on CPU.

        Runs without gradients, in batches of ``batch_size``; a batch's scores do not depend on the other images.
        """
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of N strings, one per image, not the single string {prompts!r}.")
        prompts = list(prompts)
        check_images(images)
        if len(images) != len(prompts):
            raise ValueError(
                f"got {len(images)} images and {len(prompts)} prompts; pass one prompt per image "
                "(repeat a prompt for several images of it)."
            )
        chunks = [
            self.score_batch(images[start : start + self.batch_size], prompts[start : start + self.batch_size])
            for start in range(0, len(prompts), self.batch_size)
        ]
        if not chunks:
            return torch.zeros(0)
        return torch.cat([chunk.detach().float().reshape(-1).cpu() for chunk in chunks])  # (N,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


def check_images(images: ImageBatch) -> None:
    """Raise a clear error unless ``images`` is a list of PIL images or a float tensor (N, C, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"image tensors must be float (N, C, H, W) in [0, 1]; "
                f"got {images.dtype} of shape {tuple(images.shape)}."
            )
        if images.numel() and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
            raise ValueError(
                f"image tensors must lie in [0, 1]; got values in [{images.min():.3g}, {images.max():.3g}] "
                "(model-space images in [-1, 1] convert with (x + 1) / 2)."
            )
        return
    if not isinstance(images, list | tuple) or not all(isinstance(image, Image.Image) for image in images):
        raise TypeError(f"images must be a list of PIL images or a float tensor (N, C, H, W); got {type(images)}.")


def to_pil_images(images: ImageBatch) -> list[Image.Image]:
    """PIL images as given, or a float tensor (N, C, H, W) in [0, 1] as RGB images (8-bit, as when saved to disk)."""
    if not isinstance(images, torch.Tensor):
        return [image.convert("RGB") for image in images]
    if images.shape[1] not in (1, 3):
        raise ValueError(f"image tensors need 1 or 3 channels; got shape {tuple(images.shape)}.")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # (N, C, H, W)
    pixels = pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(array)) for array in pixels]


def content_hash(folder: str | Path, patterns: tuple[str, ...] = ("*.json", "*.txt", "*.safetensors")) -> str:
    """First 16 hex digits of the sha256 over the relative names and bytes of a folder's model files."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted({path for pattern in patterns for path in folder.rglob(pattern) if path.is_file()})
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def folder_version(folder: str | Path, patterns: tuple[str, ...] = ("*.json", "*.txt", "*.safetensors")) -> str:
    """``"<absolute folder>#sha256:<16 hex>"``: what a run records for a model read from a local folder."""
    return f"{Path(folder).resolve()}#sha256:{content_hash(folder, patterns)}"


def converted_dir(name: str) -> Path:
    """Where ``scripts/convert_reward_checkpoint.py --kind NAME`` writes a converted reward by default and where
    ``load_reward(NAME)`` looks for it: ``$DIFFALIGN_REWARDS_DIR/NAME`` (default ``~/.cache/diffalign/rewards``)."""
    return Path(os.environ.get("DIFFALIGN_REWARDS_DIR", "~/.cache/diffalign/rewards")).expanduser() / name


def converted_source(name: str, source: str | None) -> str:
    """``source``, or the default converted folder of reward ``name`` with a clear error when it was never made."""
    if source is not None:
        return source
    folder = converted_dir(name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the {name} reward is published only as a pickled checkpoint and has not been converted here; run "
            f"`python scripts/convert_reward_checkpoint.py --kind {name}` once (it writes {folder}), or pass "
            f"load_reward('{name}:FOLDER') for a converted folder."
        )
    return str(folder)


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
MODEL_PATTERNS = ("*.json", "*.txt", "*.safetensors")  # configs, tokenizers, weights: never pickles
PROCESSOR_PATTERNS = ("*.json", "*.txt")  # tokenizer and image-processor files only


def refuse_pickle(source: str) -> None:
    """Raise a clear error for a pickled checkpoint: it must be converted to safetensors once, never unpickled here."""
    if str(source).lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(
            f"{source} is a pickled checkpoint; reward models load safetensors only. Convert it once with "
            "`python scripts/convert_reward_checkpoint.py --kind KIND --checkpoint FILE --out DIR` (it reads with "
            "torch.load(weights_only=True)) and load the written folder, e.g. load_reward('hpsv2.1:OUT_DIR')."
        )


def resolve_source(
    source: str, revision: str | None = None, patterns: tuple[str, ...] = MODEL_PATTERNS
) -> tuple[Path, str]:
    """A local folder or hub id -> (local folder, version). Only files matching ``patterns`` are fetched from the hub
    and hashed in a folder (json/txt/safetensors: never a pickle).

    The version is ``"<folder>#sha256:<hash>"`` for a folder and ``"<repo_id>@<commit>"`` for a hub id, the commit
    being the one ``revision`` (default: the main branch) resolved to, so a run records exactly what it scored with.
    """
    refuse_pickle(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{source} is a file; pass the folder that holds the model (config + safetensors).")
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids only; {source} is a local folder.")
        return path, folder_version(path, patterns)
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise FileNotFoundError(
            f"no reward-model folder at {source}; pass an existing local folder or a hub id 'owner/name'."
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, revision=revision, allow_patterns=list(patterns)))
    except Exception as error:  # offline, unknown repo or revision: say what to do
        raise FileNotFoundError(
            f"could not fetch {source}@{revision or 'main'} from the hub ({type(error).__name__}: {error}); check the "
            "id and revision and the network (HF_HUB_OFFLINE=1 needs it cached), or pass a local folder."
        ) from error
    if any(pattern.endswith(".safetensors") for pattern in patterns) and not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{source}@{revision or 'main'} publishes no safetensors weights; convert its pickled checkpoint once "
            "with scripts/convert_reward_checkpoint.py and pass the written folder."
        )
    return folder, f"{source}@{folder.name}"
