"""Preference pairs from disk: the Pick-a-Pic format and a folder of images with a JSONL of pairs.

Two sources, one dataset class:

- Pick-a-Pic (Kirstain et al. 2023; ``yuvalkirstain/pickapic_v2``): columns ``jpg_0``, ``jpg_1`` (encoded image
  bytes), ``label_0``, ``label_1`` and ``caption``, read from a parquet file, a folder of parquet shards, a folder
  written by ``Dataset.save_to_disk`` or anything ``datasets.load_dataset`` reads. Ties (``label_0 == 0.5``) are
  dropped and the winner is put first, as in Diffusion-DPO.
- A folder with a JSONL file (default ``pairs.jsonl``) of ``{"prompt": ..., "chosen": ..., "rejected": ...}`` lines
  whose image paths are relative to the folder.

Each source yields ``PreferenceRecord``s (``records.py``): a prompt with K candidate images, candidate 0 the
preferred one for pairs. Images are decoded lazily. A record whose image is missing or corrupt is skipped: the
dataset returns the next readable record instead (so every batch keeps its size and every process keeps stepping
together), counts the skip in the item's ``skipped`` field, and remembers the first errors for the report. If no
record at all is readable it raises a ValueError. ``collate_preferences`` stacks items into the batch of
``layout_contract.md``: ``pixels`` (B, K, C, H, W), ``time_ids`` (B, K, 6), optional ``scores`` (B, K), ``index``
(B,) and ``skipped``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .records import PreferenceRecord

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
    """Rows of a Pick-a-Pic-style ``datasets.Dataset``, ties dropped, as K = 2 records with the winner first."""

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

    def __getitem__(self, i: int) -> PreferenceRecord:
        row = self.dataset[int(self.rows[i])]
        first, second = row["jpg_0"], row["jpg_1"]
        images = [first, second] if self.winner_first[i] else [second, first]
        return PreferenceRecord(row["caption"], images)


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
            self.records.append(PreferenceRecord(record["prompt"], [record["chosen"], record["rejected"]]))
        self.num_ties = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PreferenceRecord:
        return self.records[i]


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


class PreferenceDataset(torch.utils.data.Dataset):
    """Decoded records: ``{"index", "prompt", "pixels" (K, C, H, W), "time_ids" (K, 6), "skipped"}`` plus
    ``"scores"`` (K,) when the source has them.

    ``index`` is the requested index (it seeds the record's timestep and noise); when that record is unreadable the
    next readable one is returned and ``skipped`` counts the unreadable records passed over.
    """

    def __init__(self, source, transform: ImageTransform, max_samples: int | None = None):
        self.source, self.transform = source, transform
        self.root = getattr(source, "root", None)
        self.length = len(source) if max_samples is None else min(max_samples, len(source))
        self.errors: list[str] = []
        if self.length == 0:
            raise ValueError(f"the dataset has no preference records ({getattr(source, 'num_ties', 0)} ties dropped).")

    def __len__(self) -> int:
        return self.length

    def decode(self, record: PreferenceRecord) -> dict:
        """A record's tensors: pixels (K, C, H, W), time_ids (K, 6) and the optional extras."""
        decoded = [self.transform(_open_image(image, self.root)) for image in record.images]
        item = dict(
            prompt=record.prompt,
            pixels=torch.stack([pixels for pixels, _ in decoded]),  # (K, C, H, W)
            time_ids=torch.stack([time_ids for _, time_ids in decoded]),  # (K, 6)
        )
        if record.scores is not None:
            item["scores"] = torch.tensor(record.scores, dtype=torch.float32)  # (K,)
        return item

    def __getitem__(self, index: int) -> dict:
        for skipped in range(self.length):
            i = (index + skipped) % self.length
            try:
                item = self.decode(self.source[i])
            except (OSError, ValueError, TypeError, SyntaxError) as error:  # PIL raises these for bad files
                if len(self.errors) < 5:
                    self.errors.append(f"record {i}: {type(error).__name__}: {error}")
                continue
            return dict(index=index, skipped=skipped, **item)
        raise ValueError(
            f"none of the {self.length} preference records has readable images (missing or corrupt files); "
            f"first errors: {self.errors}. Check the image columns / paths of the dataset."
        )


def collate_preferences(items: list[dict]) -> dict:
    """Stack dataset items into the preference batch: tensors (B, K, ...), ``cond`` tensors (B, ...), prompts as a
    list, ``index`` (B,) int64, ``skipped`` summed. Every item must carry the same keys (one dataset, one K)."""
    keys = set(items[0])
    for item in items[1:]:
        if set(item) != keys:
            raise ValueError(
                f"cannot batch records with different fields: {sorted(keys)} vs {sorted(item)}; every record of a "
                "dataset must have the same optional fields (scores, weight_maps, labels)."
            )
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "skipped":
            batch[key] = sum(values)
        elif key == "index":
            batch[key] = torch.tensor(values, dtype=torch.int64)
        elif key == "prompt":
            batch[key] = list(values)
        elif isinstance(values[0], dict):
            batch[key] = {name: torch.stack([value[name] for value in values]) for name in values[0]}
        else:
            shapes = {tuple(value.shape) for value in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot batch {key!r} of shapes {sorted(shapes)}: every record of a dataset needs the same "
                    "number of candidates K (and of labels)."
                )
            batch[key] = torch.stack(values)
    return batch
