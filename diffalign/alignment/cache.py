"""On-disk cache of VAE latents and text embeddings, so that later epochs and runs skip the encoders.

Layout of ``cache_dir``: ``meta.json`` (what was encoded: model, resolution, dataset, number of records, K, shard
size) and ``shard_00000.safetensors``, ... each holding ``SHARD_SIZE`` records as stacked tensors: ``latents``
(N, K, c, h, w), ``time_ids`` (N, K, 6), ``index``, ``skipped``, ``scores`` (N, K) when the data has scores, and one
``cond.<name>`` per conditioning tensor; the prompts are in the shard's metadata. Shards are written atomically
(temporary file, then ``os.replace``) and split over processes by index, so an interrupted cache build resumes
where it stopped and every process encodes its share. Read back, an item is ``{"latents" (K, c, h, w),
"time_ids", "cond", ...}`` and ``collate_preferences`` batches it like a decoded item, with ``latents``
(B, K, c, h, w) in place of ``pixels``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import collate_preferences

SHARD_SIZE = 256


def _shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / f"shard_{shard:05d}.safetensors"


@torch.no_grad()
def encode_batch(batch: dict, backbone, device) -> dict[str, torch.Tensor]:
    """A collated batch -> its cache tensors: the K candidates' latents (B, K, c, h, w), the prompt's conditioning."""
    pixels = batch["pixels"]  # (B, K, C, H, W)
    size, num_candidates = pixels.shape[:2]
    latents = backbone.encode_images(pixels.flatten(0, 1).to(device))  # (B K, c, h, w)
    encoded = {"latents": latents.unflatten(0, (size, num_candidates))}  # (B, K, c, h, w)
    encoded.update({key: value for key, value in batch.items() if key not in ("pixels", "prompt")})
    encoded["skipped"] = torch.as_tensor(batch["skipped"])
    cond = backbone.encode_prompts(batch["prompt"], device)
    encoded.update({f"cond.{name}": value for name, value in cond.items()})
    return encoded


@torch.no_grad()
def build_cache(dataset, backbone, cache_dir: str | Path, meta: dict, accelerator, batch_size: int = 16) -> None:
    """Encode every record of ``dataset`` into ``cache_dir`` (shards already there are kept). Collective call."""
    cache_dir = Path(cache_dir)
    meta = dict(meta, num_records=len(dataset), shard_size=SHARD_SIZE)
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
        prompts: list[str] = []
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start : start + batch_size]]
            batch = collate_preferences(items)
            encoded = encode_batch(batch, backbone, device)
            prompts += batch["prompt"]
            encoded["skipped"] = torch.tensor([item["skipped"] for item in items])  # per record, not summed
            for key, value in encoded.items():
                tensors.setdefault(key, []).append(value.detach().cpu())
        stacked = {key: torch.cat(values).contiguous() for key, values in tensors.items()}
        stacked = {key: v.float() if v.is_floating_point() else v for key, v in stacked.items()}
        temporary = path.with_suffix(".tmp")
        save_file(stacked, str(temporary), metadata={"prompts": json.dumps(prompts)})
        os.replace(temporary, path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        temporary = meta_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(meta, indent=2))
        os.replace(temporary, meta_path)
    accelerator.wait_for_everyone()


class CachedPreferences(torch.utils.data.Dataset):
    """Records read back from a cache: ``{"index", "prompt", "latents" (K, c, h, w), "time_ids" (K, 6), "cond",
    "skipped"}``
    plus ``"scores"`` (K,) when cached."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        meta = json.loads((self.cache_dir / "meta.json").read_text())
        self.length, self.shard_size = meta["num_records"], meta["shard_size"]
        self._handles: dict[int, tuple[object, list[str]]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        shard, row = divmod(index, self.shard_size)
        if shard not in self._handles:  # memory-mapped; a row read touches only that row's bytes
            handle = safe_open(str(_shard_path(self.cache_dir, shard)), framework="pt")
            self._handles[shard] = handle, json.loads(handle.metadata()["prompts"])
        handle, prompts = self._handles[shard]
        tensors = {key: handle.get_slice(key)[row : row + 1][0] for key in handle.keys()}
        item = {key: value for key, value in tensors.items() if not key.startswith("cond.")}
        item["cond"] = {key[5:]: value for key, value in tensors.items() if key.startswith("cond.")}
        item["index"], item["skipped"], item["prompt"] = int(item["index"]), int(item["skipped"]), prompts[row]
        return item
