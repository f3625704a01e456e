"""Preference records decoded into tensors, and the collate function that makes the batch every method receives.

Sources (``sources.py``) yield ``PreferenceRecord``s (``records.py``): a prompt with K candidate images, candidate 0
the preferred one for pairs. The datasets here decode them lazily: each image is resized on its short side and
centre-cropped (``ImageTransform``), its weight map (if any) with the same resize and crop. A record whose image or
map is missing or corrupt (truncated, not an image, a decompression bomb, ...) is skipped: the dataset returns the
next readable record instead (so every batch keeps its size and every process keeps stepping together), counts the
skip in the item's ``skipped`` field and logs the first few reasons (``logging``, logger ``diffalign.alignment.data``)
even when the other records load. If no record at all is readable it raises a ValueError. A malformed dataset
(``records.DatasetError``: a path outside the dataset folder, inconsistent K, ...) is refused, never skipped.

``collate_preferences`` stacks items into the batch of ``layout_contract.md``::

    prompt       list[str]                B prompts
    pixels       (B, K, C, H, W) float32  in [-1, 1]
    time_ids     (B, K, 6) float32        SDXL (orig h, w, crop top, left, target h, w) per candidate
    scores       (B, K) float32           optional, higher = better
    weight_maps  (B, K, 1, H, W) float32  optional, at the pixel resolution
    labels       (B, S) float32           optional, per-segment {+1, -1, 0}, +1: candidate 0 better
    index        (B,) int64               dataset index of each record (seeds its noise)
    skipped      int                      unreadable records passed over for this batch

and batches items of the latent cache (``cache.py``) the same way, with ``latents`` (B, K, c, h, w) and ``cond``
(dict of (B, ...)) in place of ``pixels``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .records import UNREADABLE, DatasetError, PreferenceRecord, open_image, open_weight_map
from .sources import StreamingTableSource, load_source

logger = logging.getLogger(__name__)
MAX_LOGGED_ERRORS = 5
"""Unreadable records whose reason is logged (and kept in ``errors``) per dataset object and worker."""


class ImageTransform:
    """PIL image -> ((C, H, W) tensor in [-1, 1], SDXL time ids (6,)): resize the short side, centre crop.

    The time ids are (original height, original width, crop top, crop left, target height, target width) as SDXL's
    micro-conditioning expects them (Podell et al. 2023, Sec. 2.2).
    """

    def __init__(self, resolution: int, channels: int):
        self.resolution, self.channels = resolution, channels

    def geometry(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop top, crop left) for an image of ``width`` x ``height``."""
        scale = self.resolution / min(width, height)
        new_w, new_h = max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale))
        return new_w, new_h, (new_h - self.resolution) // 2, (new_w - self.resolution) // 2

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.convert("L" if self.channels == 1 else "RGB")
        width, height = image.size
        new_w, new_h, top, left = self.geometry(width, height)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W) or (H, W, 3)
        pixels = torch.from_numpy(array.reshape(self.resolution, self.resolution, -1)).permute(2, 0, 1)  # (C, H, W)
        time_ids = torch.tensor([height, width, top, left, self.resolution, self.resolution], dtype=torch.float32)
        return pixels.contiguous(), time_ids

    def weight_map(self, array: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
        """A map (h, w) of an image of ``image_size`` = (width, height) -> (1, H, W): the image's resize and crop.

        The map may have any resolution of the image's aspect ratio (within 2%); it is resized bilinearly."""
        width, height = image_size
        h, w = array.shape
        if abs((w / h) / (width / height) - 1) > 0.02:
            raise ValueError(
                f"a weight map of {w}x{h} does not fit its {width}x{height} image (different aspect ratio); write the "
                "map at the image's size."
            )
        new_w, new_h, top, left = self.geometry(width, height)
        weights = torch.from_numpy(np.ascontiguousarray(array))[None, None]  # (1, 1, h, w)
        if (h, w) != (new_h, new_w):
            weights = torch.nn.functional.interpolate(weights, size=(new_h, new_w), mode="bilinear", antialias=True)
        return weights[0, :, top : top + self.resolution, left : left + self.resolution].contiguous()  # (1, H, W)


def decode_record(record: PreferenceRecord, transform: ImageTransform, base: Path | None, root: Path | None) -> dict:
    """A record's tensors: ``prompt``, ``pixels`` (K, C, H, W), ``time_ids`` (K, 6) and the optional ``scores`` (K,),
    ``weight_maps`` (K, 1, H, W), ``labels`` (S,)."""
    images = [open_image(value, base, root) for value in record.images]
    decoded = [transform(image) for image in images]
    item = dict(
        prompt=record.prompt,
        pixels=torch.stack([pixels for pixels, _ in decoded]),  # (K, C, H, W)
        time_ids=torch.stack([time_ids for _, time_ids in decoded]),  # (K, 6)
    )
    if record.scores is not None:
        item["scores"] = torch.tensor(record.scores, dtype=torch.float32)  # (K,)
    if record.weight_maps is not None:
        maps = [open_weight_map(value, base, root) for value in record.weight_maps]
        item["weight_maps"] = torch.stack(
            [transform.weight_map(array, image.size) for array, image in zip(maps, images, strict=True)]
        )  # (K, 1, H, W)
    if record.labels is not None:
        item["labels"] = torch.tensor(record.labels, dtype=torch.float32)  # (S,)
    return item


class _SkipLog:
    """The first few reasons records were unreadable: kept in ``errors`` and logged as they happen."""

    def __init__(self):
        self.errors: list[str] = []

    def add(self, where: str, error: BaseException) -> None:
        if len(self.errors) < MAX_LOGGED_ERRORS:
            self.errors.append(f"{where}: {type(error).__name__}: {error}")
            logger.warning("skipping unreadable %s: %s: %s", where, type(error).__name__, error)


class PreferenceDataset(torch.utils.data.Dataset):
    """Decoded records of a map-style source: ``{"index", "prompt", "pixels", "time_ids", "skipped"}`` plus the
    optional ``"scores"``, ``"weight_maps"``, ``"labels"``.

    ``index`` is the requested index (it seeds the record's timestep and noise); when that record is unreadable the
    next readable one is returned and ``skipped`` counts the unreadable records passed over.
    """

    def __init__(self, source, transform: ImageTransform, max_samples: int | None = None):
        self.source, self.transform = source, transform
        self.num_candidates = source.num_candidates
        self.length = len(source) if max_samples is None else min(max_samples, len(source))
        self.log = _SkipLog()
        if self.length == 0:
            raise ValueError(f"the dataset has no preference records ({getattr(source, 'num_ties', 0)} ties dropped).")

    @property
    def errors(self) -> list[str]:
        return self.log.errors

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        for skipped in range(self.length):
            i = (index + skipped) % self.length
            record = self.source[i]
            if record.num_candidates != self.num_candidates:
                raise DatasetError(
                    f"record {i} has {record.num_candidates} images, the dataset {self.num_candidates}; every record "
                    "of a dataset must have the same number of candidates K."
                )
            try:
                item = decode_record(record, self.transform, self.source.base, self.source.root)
            except DatasetError:
                raise
            except UNREADABLE as error:
                self.log.add(f"record {i}", error)
                continue
            return dict(index=index, skipped=skipped, **item)
        raise ValueError(
            f"none of the {self.length} preference records has readable images (missing or corrupt files); "
            f"first errors: {self.errors}. Check the image columns / paths of the dataset."
        )


class StreamingPreferenceDataset(torch.utils.data.IterableDataset):
    """Decoded records of a streamed table (this process's share): the items of ``PreferenceDataset`` plus their
    ``position`` in the epoch's stream, shuffled with a buffer seeded by (``seed``, epoch) when ``seed`` is given;
    call ``set_epoch`` before each epoch. Setting ``start`` makes the next passes begin at that position without
    decoding the records before it (a resume).

    An unreadable record is passed over and counted in the next item's ``skipped``; a Pick-a-Pic tie is dropped
    silently. With DataLoader workers ``datasets`` gives each worker its own parquet shards of the share (so use at
    most as many workers as the share has shards).
    """

    def __init__(
        self, source: StreamingTableSource, transform: ImageTransform, seed: int | None = None, buffer_size: int = 1000
    ):
        self.source, self.transform, self.seed, self.buffer_size, self.epoch = source, transform, seed, buffer_size, 0
        self.start = 0
        self.log = _SkipLog()

    @property
    def errors(self) -> list[str]:
        return self.log.errors

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def decoded(self, start: int = 0):
        """(position, item or None if unreadable) for this process's (and worker's) records from position ``start``
        on, ties dropped; positions count the records before decoding, so a reader can resume without decoding the
        first ``start``."""
        stream = self.source.iterate(self.seed, self.epoch, self.buffer_size)
        records = ((index, record) for index, record in stream if record is not None)
        for position, (index, record) in enumerate(records):
            if position < start:
                continue
            try:
                item = decode_record(record, self.transform, self.source.base, self.source.root)
            except DatasetError:
                raise
            except UNREADABLE as error:
                self.log.add(f"record {index}", error)
                yield position, None
                continue
            yield position, dict(index=index, **item)

    def __iter__(self):
        skipped = 0
        for position, item in self.decoded(self.start):
            if item is None:
                skipped += 1
                continue
            yield dict(item, skipped=skipped, position=position)
            skipped = 0


def load_preferences(
    dataset: str,
    resolution: int,
    channels: int,
    split: str = "train",
    jsonl_name: str = "pairs.jsonl",
    image_root: str | Path | None = None,
    max_samples: int | None = None,
    streaming: bool = False,
    process_index: int = 0,
    num_processes: int = 1,
    seed: int | None = None,
    buffer_size: int = 1000,
):
    """The decoded dataset for ``dataset`` (any source of ``sources.load_source``): a ``PreferenceDataset``, or with
    ``streaming`` a ``StreamingPreferenceDataset`` over this process's share, shuffled with a ``buffer_size``-record
    buffer seeded by (``seed``, epoch) when ``seed`` is given (``max_samples`` then not supported)."""
    source = load_source(dataset, split, jsonl_name, image_root, streaming, process_index, num_processes)
    transform = ImageTransform(resolution, channels)
    if streaming:
        if max_samples is not None:
            raise ValueError("max_samples needs a dataset of known length; it cannot be used with streaming.")
        return StreamingPreferenceDataset(source, transform, seed, buffer_size)
    return PreferenceDataset(source, transform, max_samples)


def collate_preferences(items: list[dict]) -> dict:
    """Stack dataset items into the preference batch: tensors (B, K, ...), ``cond`` tensors (B, ...), prompts as a
    list, ``index`` (and a stream's ``position``) (B,) int64, ``skipped`` summed. Every item must carry the same keys
    (one dataset, one K)."""
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
        elif key in ("index", "position"):
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
