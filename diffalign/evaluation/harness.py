"""The eval harness behind ``diffalign eval``: a tuned model against its base from the same noise, scored by rewards.

Every (prompt, seed) cell is sampled twice, by the tuned model (the pipeline plus a LoRA, or a fully fine-tuned
pipeline) and by the base model, from the same initial noise (``randn`` seeded with ``cell_seed(prompt, seed)``),
with the same sampler, NFE and guidance. Each reward scores both images of a cell, and
``bootstrap.compare_scores`` reports per reward the mean and median of both models and the win-rate of tuned over
base, with paired percentile-bootstrap 95% intervals over the cells (the evaluation protocol of Diffusion-DPO,
Wallace et al. 2023: reward scores and win-rates against the base model on fixed prompts; here with intervals).
``score_pipeline`` is the sampling + scoring half alone, for use during training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..files import write_json
from ..models.digits import NUM_CLASSES, DigitsPipeline, load_digits_pipeline
from ..options import option, validate_choices
from ..samplers import swap_scheduler
from .bootstrap import compare_scores
from .report import write_grid, write_markdown
from .rewards import load_reward

EMBEDDED_MODEL = "digits-cond"
DIGITS_PROMPTS = tuple(f"a handwritten {d}" for d in range(NUM_CLASSES))
"""The default prompts of ``digits-cond``: one per digit."""
DIGITS_SAMPLING = {"sampler": "DDIMScheduler", "nfe": 2, "guidance_scale": 1.0}
"""digits-cond's default sampling: the Diffusion-DPO demo's (``alignment/digits_pairs.py``), where the base model is
~97% accurate and there is room to improve (at 50 guided steps it is ~99.8%)."""
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The LoRA file name diffusers' ``save_lora_weights`` writes (and ``diffalign train`` saves)."""
DIGITS_BATCH = 1000
"""digits-cond's default images per pipeline call (8x8 images: fewer, larger calls are much faster on a CPU)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SamplingOptions:
    """How ``diffalign eval`` and ``diffalign pairs`` sample: the prompts, the sampler, its NFE and guidance."""

    prompts: str | None = option(
        None,
        "text file, one prompt per line (blank lines skipped); default for digits-cond: its ten digit prompts",
        "sampling",
    )
    sampler: str | None = option(
        None,
        "diffalign.samplers registry name or diffusers scheduler class name (default: DDIMScheduler for "
        "digits-cond, the pipeline's own scheduler otherwise)",
        "sampling",
    )
    nfe: int | None = option(None, "sampling steps (default: 2 for digits-cond, the pipeline's default)", "sampling")
    guidance_scale: float | None = option(
        None,
        "classifier-free guidance scale (default: 1.0 = off for digits-cond, else the pipeline's default)",
        "sampling",
    )


@dataclass
class EvalConfig(SamplingOptions):
    """Options of one ``diffalign eval`` run: tuned vs base model on fixed prompts and seeds."""

    # models
    pipeline: str = option(
        EMBEDDED_MODEL,
        "base model: the embedded 'digits-cond', or a diffusers pipeline folder / hub id (SD 1.x/2.x, SDXL)",
        "models",
    )
    lora: str | None = option(
        None,
        "tuned model = the pipeline plus these LoRA weights (a folder or .safetensors file read by "
        "pipe.load_lora_weights, e.g. a `diffalign train` output folder)",
        "models",
    )
    weights: str | None = option(
        None, "tuned model = this fully fine-tuned pipeline folder (`diffalign train --finetune full`)", "models"
    )
    revision: str | None = option(None, "hub revision of the pipeline", "models")
    device: str | None = option(None, "device (default: cuda when available, else cpu)", "models")
    dtype: Literal["float32", "float16", "bfloat16"] = option("float32", "dtype of the pipelines", "models")
    # sampling
    num_seeds: int = option(10, "seeds per prompt: first_seed, first_seed + 1, ...", "sampling")
    first_seed: int = option(0, "first seed of the initial noise", "sampling")
    batch_size: int | None = option(
        None, "images per pipeline call (default: 1000 for digits-cond, 16 otherwise)", "sampling"
    )
    # scoring
    rewards: list[str] = option(
        ("digits",),
        "reward models (diffalign.evaluation.rewards.load_reward names: digits, clip, pickscore, hpsv2.1, "
        "imagereward, aesthetic, or name:folder_or_hub_id)",
        "scoring",
    )
    bootstrap: int = option(1000, "bootstrap resamples", "scoring")
    bootstrap_seed: int = option(0, "seed of the bootstrap resampling", "scoring")
    bootstrap_unit: Literal["cell", "prompt"] = option(
        "cell",
        "what the bootstrap draws: 'cell' (prompt, seed) pairs, or 'prompt': all seeds of a prompt together, so the "
        "intervals also cover the spread between prompts (for claims about new prompts; needs many prompts)",
        "scoring",
    )
    # output
    out: str = option("eval_out", "output folder for eval.json, eval.md and grid.png", "output")
    grid_prompts: int = option(4, "prompts shown in grid.png (a base row and a tuned row each)", "output")
    grid_seeds: int = option(8, "seeds (columns) shown in grid.png", "output")

    def __post_init__(self):
        validate_choices(self)
        if self.lora is not None and self.weights is not None:
            raise ValueError("pass either lora (adapter weights) or weights (a full pipeline) as the tuned model.")
        if self.lora is None and self.weights is None:
            raise ValueError(
                "no tuned model: pass lora=FOLDER (--lora) or weights=PIPELINE_FOLDER (--weights) to compare against "
                f"the base pipeline {self.pipeline!r}."
            )
        for name in ("num_seeds", "bootstrap", "batch_size", "nfe"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.rewards:
            raise ValueError("rewards is empty; name at least one reward model, e.g. 'digits'.")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.num_seeds))


def read_prompts(path: str | None, pipeline_name: str) -> tuple[list[str], str]:
    """The prompts of ``path`` (one per line, blank lines skipped) and the sha256 of the file's bytes.

    Without a file, ``digits-cond`` uses ``DIGITS_PROMPTS`` (hashed as the file that lists them would be).
    """
    if path is None:
        if pipeline_name != EMBEDDED_MODEL:
            raise ValueError(f"pass a prompt file (--prompts FILE, one prompt per line) to sample {pipeline_name}.")
        data = ("\n".join(DIGITS_PROMPTS) + "\n").encode()
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist; pass a text file with one prompt per line.")
        data = file.read_bytes()
    prompts = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt; write one prompt per line.")
    return prompts, hashlib.sha256(data).hexdigest()


def load_pipeline(name_or_path: str, revision: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """``digits-cond`` (embedded), a saved ``DigitsPipeline`` folder, or a diffusers text-to-image pipeline."""
    folder = Path(name_or_path)
    index = folder / "model_index.json"
    if name_or_path == EMBEDDED_MODEL:
        pipeline = load_digits_pipeline(conditional=True)
    elif index.is_file() and json.loads(index.read_text())["_class_name"] == DigitsPipeline.__name__:
        pipeline = load_digits_pipeline(conditional=True, path=folder)
    elif folder.exists() and not index.is_file():
        raise ValueError(f"{name_or_path} has no model_index.json; pass a pipeline folder saved with save_pretrained.")
    else:
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(name_or_path, revision=revision, torch_dtype=DTYPES[dtype])
    if getattr(pipeline, "unet", None) is None or getattr(pipeline, "text_encoder", None) is None:
        raise ValueError(
            f"{name_or_path} loaded as {type(pipeline).__name__}, which has no UNet with text conditioning; "
            "diffalign eval supports 'digits-cond' and SD 1.x/2.x / SDXL pipelines."
        )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    return pipeline if pipeline.unet.dtype == DTYPES[dtype] else pipeline.to(dtype=DTYPES[dtype])


def lora_source(path: str) -> tuple[str, str | None]:
    """(folder or hub id, weight file name) of LoRA weights given as a folder, a .safetensors file or a hub id."""
    source = Path(path)
    if source.is_file():
        return str(source.parent), source.name
    if source.is_dir():
        if not (source / LORA_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} has no {LORA_WEIGHTS}; pass the LoRA folder written by diffalign train.")
        return path, LORA_WEIGHTS
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"no LoRA file or folder at {path}; pass a LoRA folder, .safetensors file or hub id.")
    return path, None


def load_lora(pipeline, path: str) -> None:
    """Load LoRA weights (a folder, a .safetensors file or a hub id) into the pipeline's UNet, safetensors only."""
    folder, weight_name = lora_source(path)
    if hasattr(pipeline, "load_lora_weights"):
        pipeline.load_lora_weights(folder, weight_name=weight_name, use_safetensors=True)
    else:  # DigitsPipeline: the UNet's own adapter loader, same file and key prefix
        pipeline.unet.load_lora_adapter(folder, prefix="unet", weight_name=weight_name, use_safetensors=True)


def resolve_sampling(pipeline, sampler: str | None, nfe: int | None, guidance_scale: float | None) -> dict:
    """Fill unset sampling options: digits-cond's ``DIGITS_SAMPLING``, else the pipeline's scheduler and defaults."""
    if isinstance(pipeline, DigitsPipeline):
        defaults = DIGITS_SAMPLING
    else:
        parameters = inspect.signature(pipeline.__call__).parameters
        defaults = {
            "sampler": type(pipeline.scheduler).__name__,
            "nfe": parameters["num_inference_steps"].default,
            "guidance_scale": parameters["guidance_scale"].default,
        }
    given = {"sampler": sampler, "nfe": nfe, "guidance_scale": guidance_scale}
    return {key: defaults[key] if value is None else value for key, value in given.items()}


def cell_seed(prompt: str, seed: int) -> int:
    """The noise seed of cell (prompt, seed): the first 63 bits of sha256("<seed>\\n<prompt>").

    Every cell gets its own noise, which depends on nothing but its prompt and seed (not on the other prompts or
    their order). Sharing one noise per seed across prompts would correlate the cells of a seed, and the cell
    bootstrap would then understate the intervals (measured 2.4x on the digits demo).
    """
    return int.from_bytes(hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()[:8], "big") >> 1


def initial_noise(pipeline, seeds: Sequence[int]) -> torch.Tensor:
    """(len(seeds), C, h, w) float32 CPU noise, each row drawn from its own generator seeded with its seed."""
    config = pipeline.unet.config
    size = config.sample_size
    shape = (config.in_channels, *((size, size) if isinstance(size, int) else size))
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


@torch.no_grad()
def sample_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: str | None,
    nfe: int,
    guidance_scale: float,
    batch_size: int = 16,
) -> torch.Tensor:
    """(P * S, C, H, W) float32 images in [0, 1], prompt-major: cell (p, s) from ``randn(cell_seed(p, s))``.

    The cells are cut into batches the same way for every pipeline, so stochastic samplers (their ``generator`` is
    seeded with each batch's first cell seed) see the same randomness too. ``sampler`` replaces the pipeline's
    scheduler for the call (``None``: keep it); the pipeline is left as it was.
    """
    cell_seeds = [cell_seed(prompt, seed) for prompt in prompts for seed in seeds]
    cells = list(zip([prompt for prompt in prompts for _ in seeds], cell_seeds, strict=True))
    scheduler = pipeline.scheduler
    if sampler is not None:
        swap_scheduler(pipeline, sampler)
    images = []
    try:
        for start in range(0, len(cells), batch_size):
            batch = cells[start : start + batch_size]
            latents = initial_noise(pipeline, [seed for _, seed in batch]).to(pipeline.device, pipeline.unet.dtype)
            output = pipeline(
                prompt=[prompt for prompt, _ in batch],
                latents=latents,  # (b, C, h, w)
                num_inference_steps=nfe,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(batch[0][1]),
                output_type="pt",
            )
            images.append(output.images.float().cpu())  # (b, C, H, W)
    finally:
        pipeline.scheduler = scheduler
    return torch.cat(images)


def load_rewards(names: Sequence[str], device: str = "cpu") -> dict:
    """``{name: RewardModel}`` from ``load_reward`` names (loaded before any sampling, so a bad name fails fast)."""
    return {name: load_reward(name, device=device) for name in dict.fromkeys(names)}


def score_images(images: torch.Tensor, prompts: Sequence[str], rewards: Mapping) -> dict:
    """``{reward name: (N,) float32 scores}`` of images (N, C, H, W) in [0, 1] for their N prompts."""
    return {name: reward.score(images, list(prompts)) for name, reward in rewards.items()}


def score_pipeline(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rewards: Mapping,
    sampler: str | None = None,
    nfe: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 16,
) -> dict:
    """``{reward name: (P * S,) scores}`` of the pipeline's samples of every (prompt, seed), prompt-major.

    ``rewards`` maps names to loaded reward models (``load_rewards``); unset sampling options take
    ``resolve_sampling``'s defaults. For a model in training, put its UNet in eval mode first.
    """
    settings = resolve_sampling(pipeline, sampler, nfe, guidance_scale)
    images = sample_images(pipeline, prompts, seeds, batch_size=batch_size, **settings)
    return score_images(images, [p for p in prompts for _ in seeds], rewards)


def eval_metrics(
    tuned: Mapping, base: Mapping, resamples: int = 1000, seed: int = 0, group_size: int = 1
) -> dict[str, float]:
    """Flat ``{"eval/<reward>/<statistic>": value}`` of ``compare_scores`` per reward, for a training log.

    ``tuned`` and ``base`` are ``score_pipeline`` results on the same prompts and seeds (base: the model before
    training, or with its LoRA disabled); ``group_size`` as in ``compare_scores`` (the number of seeds: a prompt
    bootstrap). Intervals become ``..._low`` / ``..._high`` entries.
    """
    metrics = {}
    for name in tuned:
        result = compare_scores(tuned[name], base[name], resamples, seed, group_size)
        flat = {f"{model}_{key}": value for model in ("tuned", "base") for key, value in result[model].items()}
        flat |= {key: value for key, value in result.items() if key not in ("tuned", "base", "num_samples")}
        for key, value in flat.items():
            if key.endswith("_ci"):
                low, high = value
                metrics[f"eval/{name}/{key[:-3]}_low"], metrics[f"eval/{name}/{key[:-3]}_high"] = low, high
            else:
                metrics[f"eval/{name}/{key}"] = value
    return metrics


def run_eval(config: EvalConfig) -> dict:
    """Sample, score and compare tuned vs base; write eval.json, eval.md and grid.png into ``config.out``."""
    start = time.perf_counter()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts, prompts_sha256 = read_prompts(config.prompts, config.pipeline)
    seeds = config.seeds
    if config.lora is not None:
        lora_source(config.lora)  # a bad path fails before any sampling
    rewards = load_rewards(config.rewards, device)
    cell_prompts = [p for p in prompts for _ in seeds]

    pipeline = load_pipeline(config.pipeline, config.revision, config.dtype, device)
    settings = resolve_sampling(pipeline, config.sampler, config.nfe, config.guidance_scale)
    batch_size = config.batch_size or (DIGITS_BATCH if isinstance(pipeline, DigitsPipeline) else 16)
    images = {"base": sample_images(pipeline, prompts, seeds, batch_size=batch_size, **settings)}
    if config.lora is not None:
        load_lora(pipeline, config.lora)
    else:
        del pipeline
        pipeline = load_pipeline(config.weights, None, config.dtype, device)
    images["tuned"] = sample_images(pipeline, prompts, seeds, batch_size=batch_size, **settings)
    scores = {model: score_images(images[model], cell_prompts, rewards) for model in images}

    group = len(seeds) if config.bootstrap_unit == "prompt" else 1
    results = {
        name: {
            "version": reward.version,
            **compare_scores(
                scores["tuned"][name], scores["base"][name], config.bootstrap, config.bootstrap_seed, group
            ),
        }
        for name, reward in rewards.items()
    }
    report = {
        "pipeline": config.pipeline,
        "revision": config.revision,
        "lora": config.lora,
        "weights": config.weights,
        "prompts_file": config.prompts,
        "prompts_sha256": prompts_sha256,
        "prompts": prompts,
        "seeds": seeds,
        **settings,
        "dtype": config.dtype,
        "device": device,
        "bootstrap": {
            "resamples": config.bootstrap,
            "seed": config.bootstrap_seed,
            "unit": config.bootstrap_unit,
            "confidence": 0.95,
        },
        "rewards": results,
        "scores": {name: {m: scores[m][name].tolist() for m in ("base", "tuned")} for name in rewards},
        "config": dataclasses.asdict(config),
        "seconds": time.perf_counter() - start,
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = write_grid(
        out / "grid.png", images["base"], images["tuned"], prompts, config.grid_prompts, config.grid_seeds
    )
    report["files"] = {
        "json": str(out / "eval.json"),
        "markdown": str(write_markdown(out / "eval.md", report)),
        "grid": str(grid),
    }
    write_json(out / "eval.json", report)
    return report
