"""DenseDPO data: motion-aligned clip pairs with per-segment preference labels, and the clip dataset that reads them.

Pair construction (DenseDPO, Wu et al. 2025, arXiv 2506.03517, Sec. 3.2 "guided sampling"): a clean clip x_0 is
corrupted to the noise level t* = strength T (``scheduler.add_noise``) with two different noises, and each corrupted
clip is denoised by the model (DDIM from t*, classifier-free guidance). Both clips inherit x_0's coarse layout and
motion, so they differ in local detail only and a preference between them can be given per temporal segment. The
paper labels segments with a VLM or human raters; here the per-segment reward ``clip_segment_rewards`` (mean
log p(prompted digit | frame) of the digits classifier over a segment's frames) labels segment s

    y_s = +1 if r_0,s - r_1,s > tie_threshold,  -1 if r_1,s - r_0,s > tie_threshold,  0 (tie) otherwise,

``TIE_THRESHOLD`` = 0.05 nats: below that the classifier's preference is within its own noise between two almost
identical frames (a choice; the paper's raters may also answer "tie"). Candidate 0 is the clip with the larger mean
reward over the whole clip, so the same ``pairs.jsonl`` is the clip-level Diffusion-DPO data (which ignores the
labels) and DenseDPO's (which reads them).

Files: each clip is a ``.npy`` array (C, F, H, W) in [-1, 1] beside the JSONL, one record per line
``{"prompt", "clips": [path_0, path_1], "scores": [r_0, r_1], "labels": [y_0, ..., y_S-1], "segments": [[r_0,s],
[r_1,s]]}`` (paths relative to the folder; ``.safetensors`` files with one tensor are read too; ``segments``, the
per-segment rewards, is informative only).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from ..models.clips import DigitsClipPipeline, clip_segment_rewards, load_digit_clips
from ..models.digits import NULL_LABEL, load_digits_classifier
from .records import UNREADABLE, DatasetError, read_jsonl, resolve_path

logger = logging.getLogger(__name__)
TIE_THRESHOLD = 0.05
"""Per-segment reward difference (nats of log p) at or below which a segment is labelled a tie (0)."""
PAIRS_JSONL = "pairs.jsonl"


def segment_labels(rewards_0: torch.Tensor, rewards_1: torch.Tensor, tie_threshold: float = TIE_THRESHOLD):
    """Per-segment labels (B, S) in {+1, -1, 0} from per-segment rewards (B, S) of candidate 0 and candidate 1."""
    difference = rewards_0 - rewards_1  # (B, S)
    return torch.where(difference.abs() > tie_threshold, difference.sign(), torch.zeros_like(difference))


@torch.no_grad()
def denoise_from(
    pipeline: DigitsClipPipeline,
    clips: torch.Tensor,
    prompts: list[str],
    strength: float,
    generator: torch.Generator,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.0,
) -> torch.Tensor:
    """Clips (B, C, F, H, W) in [-1, 1] corrupted to t* = the first of the ``strength`` fraction of the DDIM steps
    with noise from ``generator``, then denoised by DDIM (eta 0) with guidance -> (B, C, F, H, W)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (the fraction of the denoising path rerun), got {strength}.")
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps[num_inference_steps - max(1, round(strength * num_inference_steps)) :]
    labels = pipeline.text_encoder.tokenize(prompts)  # (B,)
    hidden = pipeline.text_encoder(torch.cat([torch.full_like(labels, NULL_LABEL), labels]))  # (2B, 1, D)
    noise = torch.randn(clips.shape, generator=generator)  # (B, C, F, H, W)
    x = scheduler.add_noise(clips, noise, timesteps[:1].expand(len(clips)))
    for t in timesteps:
        uncond, cond = pipeline.unet(torch.cat([x, x]), t, encoder_hidden_states=hidden).sample.chunk(2)
        x = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    return x.clamp(-1, 1)


def make_clip_pairs(
    out_dir: str | Path,
    pipeline: DigitsClipPipeline,
    num_pairs: int = 256,
    strength: float = 0.6,
    num_segments: int = 3,
    tie_threshold: float = TIE_THRESHOLD,
    seed: int = 0,
    split: str = "train",
    batch_size: int = 64,
) -> Path:
    """Write ``num_pairs`` motion-aligned pairs of ``digits-clips`` samples (module docstring) to ``out_dir``.

    The clean clips are the first ``num_pairs`` training clips (``load_digit_clips(split)``), each prompted with its
    own digit; the two denoisings use generators seeded ``2 seed`` and ``2 seed + 1``. Returns ``out_dir``.
    """
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    clips, digits = load_digit_clips(split, num_frames=6, seed=seed)
    if num_pairs > len(clips):
        raise ValueError(f"num_pairs={num_pairs} exceeds the {len(clips)} clean clips of split {split!r}.")
    classifier = load_digits_classifier()
    generators = [torch.Generator().manual_seed(2 * seed + k) for k in range(2)]
    pairs = []
    for start in range(0, num_pairs, batch_size):
        clean = clips[start : start + batch_size]  # (b, 1, F, 8, 8)
        prompts = [f"a handwritten {int(d)}" for d in digits[start : start + batch_size]]
        samples = [denoise_from(pipeline, clean, prompts, strength, g) for g in generators]  # 2 x (b, 1, F, 8, 8)
        rewards = [clip_segment_rewards(s, prompts, num_segments, classifier) for s in samples]  # 2 x (b, S)
        swap = rewards[1].mean(dim=1) > rewards[0].mean(dim=1)  # (b,) candidate 0 = the better clip overall
        for i, prompt in enumerate(prompts):
            order = (1, 0) if swap[i] else (0, 1)
            names = []
            for k in order:
                name = f"clips/{start + i:05d}_{k}.npy"
                np.save(out / name, samples[k][i].numpy().astype(np.float32))
                names.append(name)
            scores = [rewards[k][i].mean().item() for k in order]
            labels = segment_labels(rewards[order[0]][i : i + 1], rewards[order[1]][i : i + 1], tie_threshold)[0]
            segment_rewards = [rewards[k][i].tolist() for k in order]
            pairs.append(
                dict(prompt=prompt, clips=names, scores=scores, labels=labels.tolist(), segments=segment_rewards)
            )
    (out / PAIRS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return out


def open_clip(value: str, base: Path, root: Path | None) -> torch.Tensor:
    """A clip (C, F, H, W) float32 from a ``.npy`` or one-tensor ``.safetensors`` file named relative to ``base``."""
    data = resolve_path(value, base, root).read_bytes()
    if data[:6] == b"\x93NUMPY":
        array = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        from safetensors.numpy import load

        tensors = load(data)
        if len(tensors) != 1:
            raise ValueError(f"a clip safetensors file must hold one tensor, found {sorted(tensors)}.")
        array = next(iter(tensors.values()))
    if array.ndim != 4:
        raise ValueError(f"a clip must be an array (C, F, H, W), got shape {array.shape} in {value}.")
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


class ClipPreferenceDataset(torch.utils.data.Dataset):
    """Records of a clip JSONL (module docstring) decoded into the items of ``data.PreferenceDataset``, with
    ``pixels`` (K, C, F, H, W) in [-1, 1] and optional ``scores`` (K,) and ``labels`` (S,); an unreadable clip skips
    to the next record (counted in ``skipped``)."""

    def __init__(self, folder: str | Path, jsonl_name: str = PAIRS_JSONL, image_root=None, max_samples=None):
        self.base = Path(folder)
        self.root = Path(image_root) if image_root is not None else None
        path = self.base / jsonl_name
        if not path.is_file():
            raise DatasetError(f"no {jsonl_name} in {folder}; make clip pairs with diffalign.alignment.dense_pairs.")
        self.records = [record for _, record in read_jsonl(path)][:max_samples]
        for number, record in enumerate(self.records, start=1):
            if not isinstance(record.get("prompt"), str) or len(record.get("clips", [])) < 2:
                raise DatasetError(f"{path} record {number} needs a 'prompt' and K >= 2 'clips'.")
            if len(record["clips"]) != len(self.records[0]["clips"]) or set(record) != set(self.records[0]):
                raise DatasetError(f"{path} record {number}: every record needs the same K and the same fields.")
        if not self.records:
            raise DatasetError(f"{path} has no records.")

    def __len__(self) -> int:
        return len(self.records)

    def decode(self, record: dict) -> dict:
        pixels = torch.stack([open_clip(value, self.base, self.root) for value in record["clips"]])  # (K, C, F, H, W)
        height, width = pixels.shape[-2:]
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32).expand(len(pixels), 6)
        item = dict(prompt=record["prompt"], pixels=pixels, time_ids=time_ids.clone())  # time_ids (K, 6): unused
        if "scores" in record:
            item["scores"] = torch.tensor(record["scores"], dtype=torch.float32)  # (K,)
        if "labels" in record:
            item["labels"] = torch.tensor(record["labels"], dtype=torch.float32)  # (S,)
        return item

    def __getitem__(self, index: int) -> dict:
        for skipped in range(len(self)):
            try:
                item = self.decode(self.records[(index + skipped) % len(self)])
            except DatasetError:
                raise
            except UNREADABLE as error:
                logger.warning("skipping unreadable clip record %d: %s", (index + skipped) % len(self), error)
                continue
            return dict(index=index, skipped=skipped, **item)
        raise ValueError(f"none of the {len(self)} clip records is readable.")


def build_clip_dataset(config, backbone, accelerator) -> ClipPreferenceDataset:
    """The trainer's dataset for a video backbone: ``--dataset`` read as clip pairs, or without one (``digits-clips``)
    ``make_clip_pairs`` of its own samples in ``<output_dir>/clip_pairs`` (made once, by the main process)."""
    if config.cache_dir is not None:
        raise ValueError("--cache_dir is not supported for video backbones (clips are read directly); drop it.")
    if config.eval_steps:
        raise ValueError(
            "--eval_steps scores images with image rewards; a video model is evaluated after training (for "
            "digits-clips: diffalign.evaluation.clip_segments). Drop --eval_steps."
        )
    folder = config.dataset
    if folder is None and backbone.kind != "digits-clips":
        raise ValueError(
            f"--dataset is required for {type(backbone.pipeline).__name__}: a folder with {config.jsonl_name} of "
            '{"prompt", "clips": [a.npy, b.npy], "labels": [...]} records (clips (C, F, H, W) in [-1, 1]).'
        )
    if folder is None:
        folder = str(Path(config.output_dir) / "clip_pairs")
        if accelerator.is_main_process and not (Path(folder) / config.jsonl_name).is_file():
            make_clip_pairs(folder, backbone.pipeline, seed=config.seed)
        accelerator.wait_for_everyone()
    return ClipPreferenceDataset(folder, config.jsonl_name, config.image_root, config.max_train_samples)
