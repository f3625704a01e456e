"""``diffalign pairs``: preference data made by a model and a reward, when no human labels exist.

For every prompt the pipeline draws K candidates, candidate k of prompt p from its own seed
``candidate_seed(seed, p, k)`` (initial noise and any sampler noise), so a record does not depend on the batch size,
the device order or which other prompts were sampled. A reward model (``diffalign.evaluation.rewards.load_reward``)
scores each candidate against its prompt. The records are written as parquet shards that ``sources.load_source``
reads back (the K-candidate table format: ``prompt``, ``images`` = K PNG bytes, ``scores`` = K floats, stored in
candidate order, higher = better), plus ``seeds`` and ``prompt_index`` columns. This is how RankDPO's and SmPO's
training data are made from a model's own samples (Karthik et al. 2024, Sec. 3.1; Lu et al. 2025).

``generation.json`` beside the shards is written FIRST and records the settings (pipeline, revision, sampler, NFE,
guidance, K, seed rule, prompt-file sha256) and the reward's name and version; a rerun with the same settings resumes
after the shards already written, a rerun with other settings into the same folder is refused.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..evaluation.harness import SamplingOptions, read_prompts, resolve_sampling
from ..files import settings_difference, write_json
from ..options import option
from .config import EMBEDDED_MODEL

INFO_NAME = "generation.json"


@dataclass
class PairsConfig(SamplingOptions):
    """Options of one ``diffalign pairs`` run."""

    # model
    pipeline: str = option(
        EMBEDDED_MODEL,
        "the embedded 'digits-cond', or a diffusers pipeline folder / hub id (SD 1.x/2.x, SDXL)",
        "model",
    )
    revision: str | None = option(None, "hub revision of the pipeline", "model")
    variant: str | None = option(None, "weights variant of the pipeline, e.g. 'fp16'", "model")
    device: str | None = option(None, "device (default: cuda when available, else cpu)", "model")
    # sampling
    num_candidates: int = option(4, "K: candidates sampled per prompt (>= 2)", "sampling")
    seed: int = option(0, "base seed; candidate k of prompt p uses seed (seed, p, k)", "sampling")
    batch_size: int = option(16, "images per pipeline call", "sampling")
    # scoring and output
    reward: str = option(
        "digits",
        "reward model (load_reward name: digits, clip, pickscore, hpsv2.1, imagereward, aesthetic, or "
        "name:folder_or_hub_id)",
        "scoring",
    )
    reward_revision: str | None = option(None, "hub revision of the reward model", "scoring")
    out: str = option("diffalign-pairs", "output folder: parquet shards + generation.json", "output")
    shard_size: int = option(1000, "prompts per parquet shard", "output")

    def __post_init__(self):
        if self.num_candidates < 2:
            raise ValueError(
                f"num_candidates must be >= 2 (a preference needs two candidates), got {self.num_candidates}."
            )
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.nfe is not None and self.nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {self.nfe}.")


def candidate_seed(seed: int, prompt_index: int, candidate: int) -> int:
    """The seed of candidate ``candidate`` of prompt ``prompt_index``: independent streams from one base seed."""
    return int(np.random.SeedSequence([seed, prompt_index, candidate]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def sample_candidates(pipeline, prompts: list[str], seeds: list[int], settings: dict) -> torch.Tensor:
    """(N, C, H, W) uint8 images, image i of ``prompts[i]`` from a generator seeded with ``seeds[i]`` (its initial
    noise, then the sampler's noise)."""
    config = pipeline.unet.config
    size = config.sample_size
    shape = (config.in_channels, *((size, size) if isinstance(size, int) else size))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = torch.stack([torch.randn(shape, generator=generator) for generator in generators])  # (N, c, h, w)
    images = pipeline(
        prompt=prompts,
        latents=latents.to(pipeline.device, pipeline.unet.dtype),
        num_inference_steps=settings["nfe"],
        guidance_scale=settings["guidance_scale"],
        generator=generators,
        output_type="pt",
    ).images  # (N, C, H, W) in [0, 1]
    return (images.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def png_bytes(pixels: torch.Tensor) -> tuple[bytes, Image.Image]:
    """(C, H, W) uint8 -> (PNG bytes, the PIL image they decode to): grey for C = 1, RGB for C = 3."""
    array = pixels.permute(1, 2, 0).numpy()  # (H, W, C)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), image


def _claim(out: Path, info: dict) -> None:
    """Write ``generation.json`` first; refuse a folder made with other settings."""
    path = out / INFO_NAME
    if path.is_file():
        difference = settings_difference(json.loads(path.read_text()), info)
        if difference:
            raise ValueError(
                f"{out} was generated with {difference[0]}; this run has {difference[1]}. Pass another --out, or "
                "delete the folder."
            )
        return
    if out.is_dir() and any(out.glob("*.parquet")):
        raise ValueError(f"{out} holds parquet files but no {INFO_NAME}; pass another --out.")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, info)


def _write_shard(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt": pa.array(columns["prompt"], pa.string()),
            "images": pa.array(columns["images"], pa.list_(pa.binary())),
            "scores": pa.array(columns["scores"], pa.list_(pa.float32())),
            "seeds": pa.array(columns["seeds"], pa.list_(pa.int64())),
            "prompt_index": pa.array(columns["prompt_index"], pa.int64()),
        }
    )
    temporary = path.with_name(path.name + ".tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def make_pairs(config: PairsConfig, progress: bool = True) -> Path:
    """Sample, score and write the records of ``config`` (see the module docstring); returns the output folder."""
    from tqdm.auto import tqdm

    from ..evaluation.rewards import load_reward
    from .models import load_backbone

    out = Path(config.out)
    prompts, prompts_sha256 = read_prompts(config.prompts, config.pipeline)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward = load_reward(config.reward, device=device, revision=config.reward_revision)  # before sampling: fail fast
    pipeline = load_backbone(config.pipeline, config.revision, config.variant).pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    settings = resolve_sampling(pipeline, config.sampler, config.nfe, config.guidance_scale)
    if settings["sampler"] != type(pipeline.scheduler).__name__:
        from ..samplers import swap_scheduler

        swap_scheduler(pipeline, settings["sampler"])
    info = dict(
        pipeline=config.pipeline,
        revision=config.revision,
        variant=config.variant,
        scheduler_config=dict(pipeline.scheduler.config),
        **settings,
        num_candidates=config.num_candidates,
        seed=config.seed,
        seed_rule="candidate k of prompt p: numpy SeedSequence([seed, p, k]).generate_state(1, uint64)[0] >> 1",
        num_prompts=len(prompts),
        prompts_sha256=prompts_sha256,
        reward=reward.name,
        reward_version=reward.version,
        shard_size=config.shard_size,
        columns=["prompt", "images", "scores", "seeds", "prompt_index"],
    )
    info = json.loads(json.dumps(info, default=str))  # the form it has on disk, for the comparison
    _claim(out, info)
    k = config.num_candidates
    num_shards = -(-len(prompts) // config.shard_size)
    bar = tqdm(total=len(prompts) * k, desc="pairs", disable=not progress)
    for shard in range(num_shards):
        path = out / f"data-{shard:05d}-of-{num_shards:05d}.parquet"
        indices = range(shard * config.shard_size, min((shard + 1) * config.shard_size, len(prompts)))
        if path.is_file():
            bar.update(len(indices) * k)
            continue
        cells = [(p, c) for p in indices for c in range(k)]  # prompt-major: candidate c of prompt p
        encoded, scores = [], []
        for start in range(0, len(cells), config.batch_size):
            batch = cells[start : start + config.batch_size]
            batch_prompts = [prompts[p] for p, _ in batch]
            seeds = [candidate_seed(config.seed, p, c) for p, c in batch]
            pixels = sample_candidates(pipeline, batch_prompts, seeds, settings)  # (b, C, H, W) uint8
            files, images = zip(*(png_bytes(image) for image in pixels), strict=True)
            scores.append(reward.score(list(images), batch_prompts))  # (b,) on the stored 8-bit images
            encoded += files
            bar.update(len(batch))
        scores = torch.cat(scores).reshape(len(indices), k).tolist()
        columns = dict(
            prompt=[prompts[p] for p in indices],
            images=[list(encoded[i * k : (i + 1) * k]) for i in range(len(indices))],
            scores=scores,
            seeds=[[candidate_seed(config.seed, p, c) for c in range(k)] for p in indices],
            prompt_index=list(indices),
        )
        _write_shard(path, columns)
    bar.close()
    return out


def summary(config: PairsConfig) -> dict:
    """Mean best-minus-worst score gap and the number of records of a written folder (for the command's report)."""
    import pyarrow.parquet as pq

    scores = [
        s for path in sorted(Path(config.out).glob("*.parquet")) for s in pq.read_table(path)["scores"].to_pylist()
    ]
    gaps = [max(row) - min(row) for row in scores]
    return {"records": len(scores), "mean_gap": float(np.mean(gaps)) if gaps else float("nan")}
