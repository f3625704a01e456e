"""Preference pairs from disk: the Pick-a-Pic format and a folder of images with a JSONL of pairs.

Two sources, one dataset class:

- Pick-a-Pic (Kirstain et al. 2023; ``yuvalkirstain/pickapic_v2``): columns ``jpg_0``, ``jpg_1`` (encoded image
  bytes), ``label_0``, ``label_1`` and ``caption``, read from a parquet file, a folder of parquet shards, a folder
  written by ``Dataset.save_to_disk`` or anything ``datasets.load_dataset`` reads. Ties (``label_0 == 0.5``) are
  dropped and the winner is put first, as in Diffusion-DPO.
- A folder with a JSONL file (default ``pairs.jsonl``) of ``{"prompt": ..., "chosen": ..., "rejected": ...}`` lines
  whose image paths are relative to the folder.

Images are decoded lazily. A pair whose image is missing or corrupt is skipped: the dataset returns the next
readable pair instead (so every batch keeps its size and every process keeps stepping together), counts the skip
in the item's ``skipped`` field, and remembers the first errors for the report. If no pair at all is readable it
raises a ValueError.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1", "caption")


class ImageTransform:
    """PIL image -> ((C, H, W) tensor in [-1, 1], SDXL time ids (6,)): resize the short side, centre crop.

    The time ids are (original height, original width, crop top, crop left, target height, target width) as SDXL's
    micro-conditioning expects them.
    """

    def __init__(self, resolution: int, channels: int):
        self.resolution, self.channels = resolution, channels

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.convert("L" if self.channels == 1 else "RGB")
        width, height = image.size
        scale = self.resolution / min(width, height)
        new_w, new_h = max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - self.resolution) // 2, (new_w - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W) or (H, W, 3)
        pixels = torch.from_numpy(array.reshape(self.resolution, self.resolution, -1)).permute(2, 0, 1)  # (C, H, W)
        time_ids = torch.tensor([height, width, top, left, self.resolution, self.resolution], dtype=torch.float32)
        return pixels.contiguous(), time_ids


def _open_image(value, root: Path | None) -> Image.Image:
    """Bytes, a ``datasets`` image dict ({'bytes', 'path'}), a PIL image, or a path relative to ``root``."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(root / value if root is not None else value)
    else:
        raise TypeError(f"cannot read an image from {type(value).__name__}")
    image.load()
    return image


class PickAPicSource:
    """Rows of a Pick-a-Pic-style ``datasets.Dataset``, ties dropped, as (prompt, winner, loser) on demand."""

    def __init__(self, dataset, origin: str):
        missing = [c for c in PICKAPIC_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"dataset {origin} lacks the Pick-a-Pic column(s) {missing}; it has {dataset.column_names}. Expected "
                f"{list(PICKAPIC_COLUMNS)} (jpg_* as image bytes, label_0 = 1 when jpg_0 is preferred, 0.5 for a "
                "tie), or pass a folder with a JSONL of {prompt, chosen, rejected}."
            )
        from datasets import Image as ImageFeature

        for column in ("jpg_0", "jpg_1"):
            if isinstance(dataset.features[column], ImageFeature):
                dataset = dataset.cast_column(column, ImageFeature(decode=False))
        label_0 = np.asarray(dataset.select_columns(["label_0"]).to_dict()["label_0"], dtype=np.float64)
        keep = np.flatnonzero(label_0 != 0.5)  # ties dropped
        self.dataset, self.rows, self.winner_first = dataset, keep, label_0[keep] > 0.5
        self.num_ties = len(label_0) - len(keep)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[str, Image.Image, Image.Image]:
        row = self.dataset[int(self.rows[i])]
        first, second = _open_image(row["jpg_0"], None), _open_image(row["jpg_1"], None)
        winner, loser = (first, second) if self.winner_first[i] else (second, first)
        return row["caption"], winner, loser


class JsonlSource:
    """A folder with a JSONL of ``{prompt, chosen, rejected}`` (image paths relative to the folder)."""

    def __init__(self, folder: Path, jsonl_name: str):
        path = folder / jsonl_name
        self.root, self.records = folder, []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
            if missing:
                raise ValueError(
                    f"{path} line {number} lacks key(s) {missing}; each line must be "
                    '{"prompt": str, "chosen": image path, "rejected": image path}.'
                )
            self.records.append((record["prompt"], record["chosen"], record["rejected"]))
        self.num_ties = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[str, Image.Image, Image.Image]:
        prompt, chosen, rejected = self.records[i]
        return prompt, _open_image(chosen, self.root), _open_image(rejected, self.root)


def load_source(dataset: str, split: str = "train", jsonl_name: str = "pairs.jsonl"):
    """The pair source for ``dataset``: a JSONL folder, a parquet file / folder, a saved dataset, or a hub id."""
    path = Path(dataset)
    if path.is_dir() and (path / jsonl_name).is_file():
        return JsonlSource(path, jsonl_name)
    import datasets

    if path.is_file() and path.suffix == ".parquet":
        data = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        data = datasets.load_from_disk(str(path))
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
    elif path.exists() and not path.is_dir():
        raise ValueError(f"dataset {dataset} is a file but not .parquet; pass a parquet file or a folder.")
    else:
        data = datasets.load_dataset(dataset, split=split)
    return PickAPicSource(data, dataset)


class PreferencePairs(torch.utils.data.Dataset):
    """Decoded pairs: ``{"index", "prompt", "pixels_w", "pixels_l", "time_ids_w", "time_ids_l", "skipped"}``.

    ``index`` is the requested index (it seeds the pair's timestep and noise); when that pair is unreadable the
    next readable one is returned and ``skipped`` counts the unreadable pairs passed over.
    """

    def __init__(self, source, transform: ImageTransform, max_samples: int | None = None):
        self.source, self.transform = source, transform
        self.length = len(source) if max_samples is None else min(max_samples, len(source))
        self.errors: list[str] = []
        if self.length == 0:
            raise ValueError(f"the dataset has no preference pairs ({getattr(source, 'num_ties', 0)} ties dropped).")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        for skipped in range(self.length):
            i = (index + skipped) % self.length
            try:
                prompt, winner, loser = self.source[i]
                (pixels_w, time_ids_w), (pixels_l, time_ids_l) = self.transform(winner), self.transform(loser)
            except (OSError, ValueError, TypeError, SyntaxError) as error:  # PIL raises these for bad files
                if len(self.errors) < 5:
                    self.errors.append(f"pair {i}: {type(error).__name__}: {error}")
                continue
            return dict(
                index=index,
                prompt=prompt,
                pixels_w=pixels_w,
                pixels_l=pixels_l,
                time_ids_w=time_ids_w,
                time_ids_l=time_ids_l,
                skipped=skipped,
            )
        raise ValueError(
            f"none of the {self.length} preference pairs has two readable images (missing or corrupt files); "
            f"first errors: {self.errors}. Check the image columns / paths of the dataset."
        )


def collate_pairs(items: list[dict]) -> dict:
    """Stack a list of pair dicts: tensors along a new batch axis, prompts as a list, ``skipped`` summed."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "skipped":
            batch[key] = sum(values)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], dict):
            batch[key] = {k: torch.stack([v[k] for v in values]) for k in values[0]}
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
