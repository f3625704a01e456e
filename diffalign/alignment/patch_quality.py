"""PatchDPO's patch quality maps: a feature model compares each generated image with its reference image patch by
patch (Huang et al. 2025, arXiv 2412.03177, Sec. 3.2), and the maps are stored as weight maps beside the data.

For patch features f (a (D, h, w) grid per image) the quality of patch p of a generated image x against its
reference y is q(p) = max(0, cos(f_x(p), f_y(p))) in [0, 1] (the paper scores patches by feature similarity to the
reference; clipping negative cosines to 0 is a choice: an opposite feature is as bad as an unrelated one), or,
with a ``calibration`` (``SameClassCalibration`` on digits), that cosine's quantile among real image pairs, which
spreads q over [0, 1] when the raw cosines are all high. The map is upsampled (bilinear) to the image resolution.
The reference image, candidate 0, gets the map q_0 = q_1 of the generated image (K = 2, as the official data: the
reference is learnt where the generation failed, ``losses.patchdpo_loss`` weighs it by 1 - q_0), and for K > 2 the
mean of the generated images' maps.

Feature models: ``DigitsPatchFeatures`` (the embedded digits classifier's convolutional features: its 4x4 grid
after the first pooling, each patch a 2x2 block of the 8x8 image), and ``TransformersPatchFeatures`` (any
``transformers`` vision backbone that returns patch tokens, e.g. a DINOv2 ``AutoModel``: the last hidden state's
patch tokens, prefix tokens (CLS, registers) dropped, laid out on their square grid). ``load_patch_features`` names
them ("digits", or a hub id / local folder). ``PatchSimilarityReward`` scores samples by their mean patch quality
(raw cosines) against the closest of a set of reference images of the prompted digit; ``make_digit_reference_pairs``
writes the digits demo's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..evaluation.rewards.base import RewardModel
from ..models.digits import NUM_CLASSES, load_digits_classifier, load_digits_data, prompt_to_label
from .records import open_image, read_jsonl


class DigitsPatchFeatures:
    """Images (N, 1, 8, 8) in [0, 1] -> (N, 64, 4, 4) features of the digits classifier after its first pooling."""

    name = "digits"

    def __init__(self):
        self.body = load_digits_classifier().eval().body[:5]  # conv, SiLU, conv, SiLU, max-pool 8x8 -> 4x4

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (1, 8, 8):
            raise ValueError(f"digits patch features need 8x8 grey images (N, 1, 8, 8), got {tuple(images.shape)}.")
        return self.body(images.float() * 2 - 1)


class TransformersPatchFeatures:
    """Images (N, C, H, W) in [0, 1] -> (N, D, g, g) patch tokens of a ``transformers`` vision model (e.g. DINOv2)."""

    def __init__(self, name_or_path: str, revision: str | None = None, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.name = name_or_path
        self.processor = AutoImageProcessor.from_pretrained(name_or_path, revision=revision)
        self.model = AutoModel.from_pretrained(name_or_path, revision=revision).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # grey -> RGB
        inputs = self.processor(images=images.float(), do_rescale=False, return_tensors="pt").to(self.device)
        tokens = self.model(**inputs).last_hidden_state  # (N, T, D)
        patch_size = self.model.config.patch_size
        grid_h, grid_w = (size // patch_size for size in inputs["pixel_values"].shape[-2:])
        prefix = tokens.shape[1] - grid_h * grid_w  # CLS and register tokens
        if prefix < 0:
            raise ValueError(
                f"{self.name} returned {tokens.shape[1]} tokens, fewer than its {grid_h}x{grid_w} patches."
            )
        return tokens[:, prefix:].transpose(1, 2).reshape(len(tokens), -1, grid_h, grid_w).float().cpu()


def load_patch_features(name_or_path: str = "digits", revision: str | None = None, device: str = "cpu"):
    """``"digits"``: ``DigitsPatchFeatures``; anything else: ``TransformersPatchFeatures`` of that hub id / folder."""
    if name_or_path == "digits":
        return DigitsPatchFeatures()
    return TransformersPatchFeatures(name_or_path, revision, device)


def patch_cosines(features: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
    """max(0, cos) per patch of features (N, D, g, g) against reference features (N, D, g, g) -> (N, 1, g, g)."""
    return F.cosine_similarity(features, reference_features, dim=1, eps=1e-6).clamp_min(0)[:, None]


def patch_quality(
    features: torch.Tensor,
    reference_features: torch.Tensor,
    size: tuple[int, int],
    calibration=None,
    prompt: str = "",
) -> torch.Tensor:
    """q per patch of features (N, D, g, g) against reference features (N, D, g, g), upsampled to ``size`` (H, W)
    -> (N, 1, H, W) in [0, 1]: q = max(0, cos), or ``calibration(cosines, prompt)`` (e.g. ``SameClassCalibration``)."""
    quality = patch_cosines(features, reference_features)  # (N, 1, g, g)
    if calibration is not None:
        quality = calibration(quality, prompt)
    return F.interpolate(quality, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


class SameClassCalibration:
    """Patch cosines of digits -> quantiles among real digits: q(p) = the fraction of real same-class pairs whose
    cosine at patch position p is below the generated image's. The pairs are each real digit of the class (training
    split) with its reference by the demo's rule, the closest other digit of the class (highest mean patch cosine).

    The raw cosines of the digits features have little contrast (post-SiLU, max-pooled, nearly non-negative: q ~ 0.9
    almost everywhere); their quantiles spread over [0, 1] by construction: a patch as faithful to its reference as
    the median real digit is to its own gets q = 0.5, one less faithful than every real pair q = 0.
    """

    def __init__(self, features=None, split: str = "train"):
        self.features = features or DigitsPatchFeatures()
        images, labels = load_digits_data(split)  # (M, 1, 8, 8) in [-1, 1], (M,)
        grid = self.features((images + 1) / 2)  # (M, D, g, g)
        self.cosines = {}  # label -> (m, g, g) cosines of the class's real pairs
        for label in labels.unique().tolist():
            members = grid[labels == label]  # (m, D, g, g)
            pairs = torch.stack([patch_cosines(member[None], members)[:, 0] for member in members])  # (m, m, g, g)
            mean = pairs.flatten(2).mean(dim=2).fill_diagonal_(-1)  # (m, m), itself excluded
            self.cosines[label] = pairs[torch.arange(len(members)), mean.argmax(dim=1)]  # (m, g, g)

    def __call__(self, cosines: torch.Tensor, prompt: str) -> torch.Tensor:
        """(N, 1, g, g) patch cosines of images of the digit named in ``prompt`` -> (N, 1, g, g) quantiles."""
        real = self.cosines[prompt_to_label(prompt)]  # (m, g, g)
        return (real[None, None] < cosines[:, :, None]).float().mean(dim=2)  # (N, 1, g, g)


def to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """A PIL image -> (C, H, W) in [0, 1]."""
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1)


def candidate_maps(images: list[torch.Tensor], features, calibration=None, prompt: str = "") -> torch.Tensor:
    """Quality maps (K, 1, H, W) of one record's images (K x (C, H, W) in [0, 1], the reference first): the
    generated images' q_k (``patch_quality``), and q_0 = their mean for the reference (module docstring)."""
    size = images[0].shape[-2:]
    resized = [
        F.interpolate(x[None], size=tuple(size), mode="bilinear")[0] if x.shape[-2:] != size else x for x in images
    ]
    stacked = torch.stack(resized)  # (K, C, H, W)
    grid = features(stacked)  # (K, D, g, g)
    reference = grid[:1].expand_as(grid[1:])  # (K - 1, D, g, g)
    generated = patch_quality(grid[1:], reference, tuple(size), calibration, prompt)  # (K - 1, 1, H, W)
    return torch.cat([generated.mean(dim=0, keepdim=True), generated])  # (K, 1, H, W)


def write_quality_maps(
    folder: str | Path, features, jsonl_name: str = "pairs.jsonl", channels: int = 3, calibration=None
) -> Path:
    """Add PatchDPO weight maps to a JSONL dataset of ``{"prompt", "images": [reference, generated, ...]}`` (or
    ``chosen`` = reference, ``rejected`` = generated): one ``.npy`` map per image in ``<folder>/weight_maps/``, the
    records rewritten (atomically) with ``"weight_maps"``; ``calibration`` as in ``patch_quality`` (it gets each
    record's prompt). Returns the JSONL path."""
    folder = Path(folder)
    path = folder / jsonl_name
    (folder / "weight_maps").mkdir(exist_ok=True)
    lines = []
    for number, record in read_jsonl(path):
        names = record.get("images") or [record["chosen"], record["rejected"]]
        images = [to_tensor(open_image(name, folder), channels) for name in names]
        maps = candidate_maps(images, features, calibration, record["prompt"])  # (K, 1, H, W)
        record["weight_maps"] = []
        for k, quality in enumerate(maps):
            name = f"weight_maps/{number:06d}_{k}.npy"
            np.save(folder / name, quality[0].numpy().astype(np.float32))
            record["weight_maps"].append(name)
        record.setdefault("images", names)
        record.pop("chosen", None), record.pop("rejected", None)
        lines.append(json.dumps(record))
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path


class PatchSimilarityReward(RewardModel):
    """Mean patch quality q (``patch_quality``) of a digit image against the closest of the reference digits of its
    prompted class (the training split of the digits data by default): how faithfully, patch by patch, a sample
    reproduces some real digit of its class. Images (N, 1, 8, 8) in [0, 1]; higher = better, in [0, 1]."""

    name = "patch_similarity"
    batch_size = 64

    def __init__(self, features=None, split: str = "train"):
        self.features = features or DigitsPatchFeatures()
        images, labels = load_digits_data(split)  # (M, 1, 8, 8) in [-1, 1], (M,)
        self.references = self.features((images + 1) / 2)  # (M, D, g, g)
        self.images, self.labels = images, labels
        self.version = f"digits-classifier conv features, references: digits {split} split ({len(labels)} images)"

    def score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        if not torch.is_tensor(images):
            images = torch.stack([to_tensor(image, 1) for image in images])
        grid = self.features(images)  # (n, D, g, g)
        scores = []
        for features, prompt in zip(grid, prompts, strict=True):
            references = self.references[self.labels == prompt_to_label(prompt)]  # (m, D, g, g)
            scores.append(patch_cosines(features[None], references).flatten(1).mean(dim=1).max())
        return torch.stack(scores).float()


DATA_SAMPLING = {"sampler": "dpm_solver_pp", "nfe": 20, "guidance_scale": 1.0}
"""The sampler of the PatchDPO demo's generated images: the model's regular sampler, as a user makes personalised
samples (DPM-Solver++ 20 steps: ~99.7% classifier accuracy), not the hard 2-step one the demo evaluates with."""


def make_digit_reference_pairs(
    out_dir: str | Path,
    pipeline,
    samples_per_digit: int = 32,
    seed: int = 0,
    sampling: dict | None = None,
    calibration=None,
) -> Path:
    """PatchDPO data on ``digits-cond``: per digit ``samples_per_digit`` samples (``sampling``: the harness's
    ``sample_images`` settings, ``DATA_SAMPLING`` by default; seeds ``seed * samples_per_digit + i``, below the
    eval's ``EVAL_SEED_OFFSET``), each paired with its reference, the real training digit of the prompted class
    closest to it (highest mean patch quality, ``PatchSimilarityReward``'s features), as 8x8 PNGs + ``pairs.jsonl``
    of ``{"prompt", "images": [reference, generated]}`` with the digits-feature quality maps (``write_quality_maps``;
    ``calibration``: e.g. ``SameClassCalibration``, None: q = max(0, cos)). Returns ``out_dir``."""
    from ..evaluation.harness import sample_images

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    prompts = [f"a handwritten {digit}" for digit in range(NUM_CLASSES)]
    seeds = range(seed * samples_per_digit, (seed + 1) * samples_per_digit)
    samples = sample_images(pipeline, prompts, seeds, **(sampling or DATA_SAMPLING)) * 2 - 1  # (N, 1, 8, 8) [-1, 1]
    labels = torch.arange(NUM_CLASSES).repeat_interleave(samples_per_digit)  # (N,) prompt-major
    similarity = PatchSimilarityReward()
    lines = []
    for i, (sample, label) in enumerate(zip(samples.clamp(-1, 1), labels.tolist(), strict=True)):
        members = torch.nonzero(similarity.labels == label).flatten()
        grid = similarity.features((sample[None] + 1) / 2)  # (1, D, g, g)
        cosine = patch_cosines(grid, similarity.references[members])  # (m, 1, g, g)
        reference = similarity.images[members[cosine.flatten(1).mean(dim=1).argmax()]]  # (1, 8, 8)
        for name, image in ((f"images/{i}_reference.png", reference), (f"images/{i}_generated.png", sample)):
            pixels = ((image[0] + 1) * 127.5).round().to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(out / name)
        lines.append(json.dumps({"prompt": prompts[label], "images": [f"images/{i}_reference.png", name]}))
    (out / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_quality_maps(out, similarity.features, channels=1, calibration=calibration)
    return out
