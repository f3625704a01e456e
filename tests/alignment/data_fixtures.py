"""Small on-disk datasets for the data tests: PNG bytes, Pick-a-Pic parquet files, JSONL folders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: tuple[int, int], mode: str = "RGB") -> bytes:
    """A random PNG of ``size`` = (width, height)."""
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """The pixels of encoded image bytes, (H, W, C) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_pickapic(path: Path, num_rows: int = 6, drop: tuple[str, ...] = ()) -> Path:
    """A Pick-a-Pic-style parquet file; every third row is a tie, images are 80x72 PNGs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    label_0 = [0.5 if i % 3 == 2 else float(i % 2) for i in range(num_rows)]
    columns = {
        "caption": [f"a photo of thing {i}" for i in range(num_rows)],
        "jpg_0": [png_bytes(2 * i, (80, 72)) for i in range(num_rows)],
        "jpg_1": [png_bytes(2 * i + 1, (80, 72)) for i in range(num_rows)],
        "label_0": label_0,
        "label_1": [1.0 - v for v in label_0],
    }
    pq.write_table(pa.table({k: v for k, v in columns.items() if k not in drop}), path)
    return path


def write_jsonl_pairs(folder: Path, num_pairs: int = 4, size: tuple[int, int] = (12, 10)) -> Path:
    """A folder with ``images/<i>.png`` and a ``pairs.jsonl`` of {prompt, chosen, rejected}: chosen = 2 i."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_pairs):
        for j in (2 * i, 2 * i + 1):
            (folder / "images" / f"{j}.png").write_bytes(png_bytes(j, size))
        record = {"prompt": f"prompt {i}", "chosen": f"images/{2 * i}.png", "rejected": f"images/{2 * i + 1}.png"}
        lines.append(json.dumps(record))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_ranked_parquet(path: Path, num_rows: int = 4, k: int = 3, size: tuple[int, int] = (12, 10)) -> Path:
    """A parquet file with ``prompt``, an ``images`` list column of K PNGs and ``scores`` (K,): row r image j has
    seed 10 r + j and score r - j / 10."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {
        "prompt": [f"prompt {r}" for r in range(num_rows)],
        "images": [[png_bytes(10 * r + j, size) for j in range(k)] for r in range(num_rows)],
        "scores": [[r - j / 10 for j in range(k)] for r in range(num_rows)],
    }
    pq.write_table(pa.table(table), path)
    return path
