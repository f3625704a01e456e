"""On-disk cache of VAE latents and text embeddings, so that later epochs and runs skip the encoders.

Layout of ``cache_dir``: ``meta.json`` (what was encoded: model, resolution, dataset, number of pairs, shard size)
and ``shard_00000.safetensors``, ... each holding ``SHARD_SIZE`` pairs as stacked tensors: ``latents_w``,
``latents_l``, ``time_ids_w``, ``time_ids_l``, ``index``, ``skipped`` and one ``cond.<name>`` per conditioning
tensor. Shards are written atomically (temporary file, then ``os.replace``) and split over processes by index, so
an interrupted cache build resumes where it stopped and every process encodes its share.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import collate_pairs

SHARD_SIZE = 256


def _shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / f"shard_{shard:05d}.safetensors"


@torch.no_grad()
def build_cache(dataset, backbone, cache_dir: str | Path, meta: dict, accelerator, batch_size: int = 16) -> None:
    """Encode every pair of ``dataset`` into ``cache_dir`` (shards already there are kept). Collective call."""
    cache_dir = Path(cache_dir)
    meta = dict(meta, num_pairs=len(dataset), shard_size=SHARD_SIZE)
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        found = json.loads(meta_path.read_text())
        if found != meta:
            raise ValueError(
                f"cache {cache_dir} was built for {found}, not for {meta}; delete it or pass another --cache_dir."
            )
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    device = accelerator.device
    num_shards = -(-len(dataset) // SHARD_SIZE)
    for shard in range(accelerator.process_index, num_shards, accelerator.num_processes):
        path = _shard_path(cache_dir, shard)
        if path.is_file():
            continue
        indices = range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, len(dataset)))
        tensors: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start : start + batch_size]]
            batch = collate_pairs(items)
            encoded = {
                "latents_w": backbone.encode_images(batch["pixels_w"].to(device)),
                "latents_l": backbone.encode_images(batch["pixels_l"].to(device)),
                "time_ids_w": batch["time_ids_w"],
                "time_ids_l": batch["time_ids_l"],
                "index": batch["index"],
                "skipped": torch.tensor([item["skipped"] for item in items]),
            }
            cond = backbone.encode_prompts(batch["prompt"], device)
            encoded.update({f"cond.{name}": value for name, value in cond.items()})
            for key, value in encoded.items():
                tensors.setdefault(key, []).append(value.detach().cpu())
        stacked = {key: torch.cat(values).contiguous() for key, values in tensors.items()}
        stacked = {key: v.float() if v.is_floating_point() else v for key, v in stacked.items()}
        temporary = path.with_suffix(".tmp")
        save_file(stacked, str(temporary))
        os.replace(temporary, path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        temporary = meta_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(meta, indent=2))
        os.replace(temporary, meta_path)
    accelerator.wait_for_everyone()


class CachedPairs(torch.utils.data.Dataset):
    """Pairs read back from a cache: ``{"index", "latents_w", "latents_l", "time_ids_w", "time_ids_l", "cond",
    "skipped"}``."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        meta = json.loads((self.cache_dir / "meta.json").read_text())
        self.length, self.shard_size = meta["num_pairs"], meta["shard_size"]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        shard, row = divmod(index, self.shard_size)
        if shard not in self._handles:  # memory-mapped; a row read touches only that row's bytes
            self._handles[shard] = safe_open(str(_shard_path(self.cache_dir, shard)), framework="pt")
        handle = self._handles[shard]
        tensors = {key: handle.get_slice(key)[row : row + 1][0] for key in handle.keys()}
        item = {key: value for key, value in tensors.items() if not key.startswith("cond.")}
        item["cond"] = {key[5:]: value for key, value in tensors.items() if key.startswith("cond.")}
        item["index"], item["skipped"] = int(item["index"]), int(item["skipped"])
        return item
