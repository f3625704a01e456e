"""Expert demonstrations for the embedded model: real scikit-learn digits with the prompts digits-cond knows.

Diffusion-DRO learns from single expert images (no pairs). ``make_digits_experts`` writes the training split of the
digits (``load_digits_data("train")``) as 8x8 PNGs with an ``experts.jsonl`` of ``{"prompt", "image"}`` records
(K = 1), so a DRO run reads them through the same data path as a real expert dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from ..models.digits import load_digits_data

EXPERTS_JSONL = "experts.jsonl"


def make_digits_experts(out_dir: str | Path, max_images: int | None = None, seed: int = 0) -> Path:
    """Write ``max_images`` (default: all 1,437) training digits in a seeded order as PNGs + ``experts.jsonl``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_data("train")  # (N, 1, 8, 8) in [-1, 1], (N,)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_images]
    pixels = ((images[order, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()  # (n, 8, 8)
    lines = []
    for i, (array, label) in enumerate(zip(pixels, labels[order].tolist(), strict=True)):
        Image.fromarray(array, mode="L").save(out_dir / "images" / f"{i}.png")
        lines.append(json.dumps({"prompt": f"a handwritten {label}", "image": f"images/{i}.png"}))
    temporary = out_dir / f"{EXPERTS_JSONL}.tmp"
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    temporary.replace(out_dir / EXPERTS_JSONL)
    return out_dir
