"""On-disk cache of VAE latents and text embeddings, so that later epochs and runs skip the encoders.

Layout of ``cache_dir``:

- ``meta.json``, written FIRST: what is encoded (model, revision, resolution, VAE dtype, dataset, ... as the caller
  gives them, plus K, the number of records and the shard size). A build finding a ``meta.json`` that differs, or
  shards without one (an older or foreign build), refuses the folder with a message instead of reusing its shards;
  a build finding its own ``meta.json`` resumes, encoding only the shards that are missing.
- ``shard_*.safetensors``: stacked records: ``latents`` (N, K, c, h, w), ``time_ids`` (N, K, 6), ``index``,
  ``skipped``, ``scores`` / ``weight_maps`` / ``labels`` when the data has them, one ``cond.<name>`` per
  conditioning tensor, and the prompts in the shard's metadata. Written atomically (temporary file, then
  ``os.replace``). A map-style dataset is split into shards by index and the shards over processes; a streamed
  dataset is encoded by every process from its own share (``shard_p<process>_<n>``).
- ``shards.json``, written LAST: the shard files and their record counts. A cache without it is incomplete and is
  not read.

Read back (``CachedPreferences``), an item is ``{"latents" (K, c, h, w), "time_ids", "cond", "prompt", "index",
"skipped", ...}`` and ``collate_preferences`` batches it like a decoded item, with ``latents`` (B, K, c, h, w) and
``cond`` in place of ``pixels``.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import settings_difference, write_json
from .data import PreferenceDataset, StreamingPreferenceDataset, collate_preferences

SHARD_SIZE = 256
CACHE_VERSION = 2
REQUIRED_META = ("model", "revision", "resolution", "vae_dtype", "dataset")
"""What the caller must name in ``meta``: a cache built under other values of these is refused."""


@torch.no_grad()
def encode_batch(batch: dict, backbone, device) -> dict[str, torch.Tensor]:
    """A collated batch -> its cache tensors: the K candidates' latents (B, K, c, h, w), the prompt's conditioning."""
    pixels = batch["pixels"]  # (B, K, C, H, W)
    size, num_candidates = pixels.shape[:2]
    latents = backbone.encode_images(pixels.flatten(0, 1).to(device))  # (B K, c, h, w)
    encoded = {"latents": latents.unflatten(0, (size, num_candidates))}  # (B, K, c, h, w)
    encoded.update({key: value for key, value in batch.items() if key not in ("pixels", "prompt", "skipped")})
    cond = backbone.encode_prompts(batch["prompt"], device)
    encoded.update({f"cond.{name}": value for name, value in cond.items()})
    return encoded


def _write_shard(path: Path, items: list[dict], backbone, device, batch_size: int) -> None:
    """Encode ``items`` (decoded records, each with its own ``skipped``) into one safetensors shard, atomically."""
    tensors: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        encoded = encode_batch(collate_preferences(chunk), backbone, device)
        encoded["skipped"] = torch.tensor([item["skipped"] for item in chunk])  # per record, not summed
        for key, value in encoded.items():
            tensors.setdefault(key, []).append(value.detach().cpu())
    stacked = {key: torch.cat(values).contiguous() for key, values in tensors.items()}
    stacked = {key: v.float() if v.is_floating_point() else v for key, v in stacked.items()}
    temporary = path.with_name(path.name + ".tmp")
    save_file(stacked, str(temporary), metadata={"prompts": json.dumps([item["prompt"] for item in items])})
    os.replace(temporary, path)


def _claim(cache_dir: Path, meta: dict, accelerator) -> bool:
    """Check ``cache_dir`` against ``meta`` on every process, write ``meta.json`` first if it is new. Collective.
    Returns True when the cache is already complete."""
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"cache meta lacks {missing}; name at least {list(REQUIRED_META)} of what is encoded.")
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        difference = settings_difference(json.loads(meta_path.read_text()), meta)
        if difference:
            raise ValueError(
                f"cache {cache_dir} was built for {difference[0]}; this run needs {difference[1]}. Delete the folder "
                "or pass another --cache_dir."
            )
    elif cache_dir.is_dir() and any(cache_dir.glob("shard_*")):
        raise ValueError(
            f"cache {cache_dir} holds shards but no meta.json (built by an older version, or not a diffalign cache), "
            "so what they encode is unknown; delete the folder or pass another --cache_dir."
        )
    accelerator.wait_for_everyone()  # everyone has checked before anyone writes
    if accelerator.is_main_process and not meta_path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json(meta_path, meta)
    accelerator.wait_for_everyone()
    return (cache_dir / "shards.json").is_file()


def _finish(cache_dir: Path, accelerator) -> None:
    """After every process wrote its shards: ``shards.json`` with each shard's record count. Collective."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = []
        for path in sorted(cache_dir.glob("shard_*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                shards.append([path.name, len(json.loads(handle.metadata()["prompts"]))])
        write_json(cache_dir / "shards.json", shards)
    accelerator.wait_for_everyone()


@torch.no_grad()
def build_cache(
    dataset: PreferenceDataset, backbone, cache_dir: str | Path, meta: dict, accelerator, batch_size: int = 16
) -> None:
    """Encode every record of ``dataset`` into ``cache_dir``; shards already there (same meta) are kept. Collective.

    ``meta`` names what is encoded (at least ``REQUIRED_META``); K, the record count and the shard size are added.
    """
    cache_dir = Path(cache_dir)
    meta = dict(meta, version=CACHE_VERSION, num_records=len(dataset), shard_size=SHARD_SIZE)
    meta["num_candidates"] = dataset.num_candidates
    if _claim(cache_dir, meta, accelerator):
        return
    num_shards = -(-len(dataset) // SHARD_SIZE)
    for shard in range(accelerator.process_index, num_shards, accelerator.num_processes):
        path = cache_dir / f"shard_{shard:05d}.safetensors"
        if not path.is_file():
            items = [dataset[i] for i in range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, len(dataset)))]
            _write_shard(path, items, backbone, accelerator.device, batch_size)
    _finish(cache_dir, accelerator)


@torch.no_grad()
def build_streaming_cache(
    dataset: StreamingPreferenceDataset,
    backbone,
    cache_dir: str | Path,
    meta: dict,
    accelerator,
    batch_size: int = 16,
) -> None:
    """Encode a streamed dataset into ``cache_dir``: every process its own share (``dataset`` is that share, not
    shuffled), ``SHARD_SIZE`` records per shard; a rerun resumes after the last complete shard. Collective."""
    if dataset.seed is not None:
        raise ValueError("build the cache from an unshuffled stream (seed=None); the cache is shuffled when read.")
    cache_dir = Path(cache_dir)
    meta = dict(meta, version=CACHE_VERSION, streamed=True, shard_size=SHARD_SIZE)
    meta["num_processes"] = accelerator.num_processes  # each process's share depends on it
    if _claim(cache_dir, meta, accelerator):
        return
    rank = accelerator.process_index

    def shard_path(number: int) -> Path:  # shard n holds the readable records of positions [n S, (n + 1) S)
        return cache_dir / f"shard_p{rank:03d}_{number:05d}.safetensors"

    written = [int(path.stem.rsplit("_", 1)[1]) for path in cache_dir.glob(f"shard_p{rank:03d}_*.safetensors")]
    start = max(written) + 1 if written else 0
    items, skipped, position = [], 0, 0
    for position, item in dataset.decoded(start=start * SHARD_SIZE):
        if item is None:
            skipped += 1
        else:
            items.append(dict(item, skipped=skipped))
            skipped = 0
        if position % SHARD_SIZE == SHARD_SIZE - 1:
            if items:
                _write_shard(shard_path(position // SHARD_SIZE), items, backbone, accelerator.device, batch_size)
            items = []
    if items:
        _write_shard(shard_path(position // SHARD_SIZE), items, backbone, accelerator.device, batch_size)
    _finish(cache_dir, accelerator)


class CachedPreferences(torch.utils.data.Dataset):
    """Records read back from a complete cache: ``{"index", "prompt", "latents" (K, c, h, w), "time_ids" (K, 6),
    "cond", "skipped"}`` plus the optional ``"scores"``, ``"weight_maps"``, ``"labels"``."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        if not (self.cache_dir / "shards.json").is_file():
            raise ValueError(
                f"cache {self.cache_dir} is incomplete (no shards.json: its build was interrupted); run the build "
                "again (training with the same --cache_dir resumes it)."
            )
        self.meta = json.loads((self.cache_dir / "meta.json").read_text())
        self.shards = json.loads((self.cache_dir / "shards.json").read_text())
        self.starts = [0]
        for _, count in self.shards:
            self.starts.append(self.starts[-1] + count)
        self._handles: dict[int, tuple[object, list[str]]] = {}
        self.num_candidates = self._open(0)[0].get_slice("latents").get_shape()[1] if self.shards else None

    def __len__(self) -> int:
        return self.starts[-1]

    def _open(self, shard: int) -> tuple[object, list[str]]:
        """The shard's memory-mapped handle (a row read touches only that row's bytes) and its prompts."""
        if shard not in self._handles:
            handle = safe_open(str(self.cache_dir / self.shards[shard][0]), framework="pt")
            self._handles[shard] = handle, json.loads(handle.metadata()["prompts"])
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} records")
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        handle, prompts = self._open(shard)
        tensors = {key: handle.get_slice(key)[row : row + 1][0] for key in handle.keys()}
        item = {key: value for key, value in tensors.items() if not key.startswith("cond.")}
        item["cond"] = {key[5:]: value for key, value in tensors.items() if key.startswith("cond.")}
        item["index"], item["skipped"], item["prompt"] = int(item["index"]), int(item["skipped"]), prompts[row]
        return item
