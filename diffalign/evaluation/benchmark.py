"""``diffalign bench``: samplers x NFE on one model, with ODE error, Fréchet distance and wall time.

Every sampler starts from the same ``x_T`` (per seed) at the same noise level (``timestep_spacing='linspace'``, first
timestep ``T - 1``) and is compared with an accurate solution of the probability-flow ODE from that ``x_T``
(``reference.py``) for the first ``reference_samples`` of them: the mean squared error isolates solver error
(research/benchmark.md). Where the model has a feature space (``digits``), the Fréchet distance of all samples to
the real data is reported too, beside its floors (a 100-NFE solution's FD, i.e. the model's own, and real-vs-real).
NFE counts model calls, so two-evaluation solvers (Heun) get the largest step count whose calls fit the budget.
A sampler with ``grid=...`` (``dpm_solver_v3:grid=ld3``) runs on the model's learned time grids instead
(``samplers/learned_grid.py``, docs/learned_grids.md), one row per NFE for which a grid is stored.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers
import torch
from tqdm.auto import tqdm

from ..models.loading import DEFAULT_GUIDANCE, EMBEDDED
from ..options import option, validate_choices
from ..samplers import SCHEDULERS, LearnedGrids, NoiseScheduleVP, get_scheduler_class, keep_model_keys, model_output
from ..samplers.learned_grid import GRIDS_FILE
from ..samplers.side_info import SideInfoMixin, has_side_info
from .sampling import sample, sample_on_grid
from .targets import BenchTarget, load_target

DIFFUSERS_BASELINES = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
)
EXTRA_VARIANTS = (
    "dpm_solver_v3:timestep_spacing=time_quadratic",
    "dpm_solver_pp:solver_order=3",
    "dpm_solver_pp:solver_order=3,taylor_third_order=true,timestep_spacing=logSNR,final_sigmas_type=sigma_min",
)
DEFAULT_NFE = (5, 6, 8, 10, 15, 20, 50)
REFERENCE_SAMPLES = 128
REFERENCE = "high-NFE solution (100 NFE)"
FLOOR_SAMPLER = (
    "dpm_solver_pp:solver_order=3,taylor_third_order=true,timestep_spacing=logSNR,final_sigmas_type=sigma_min"
)


def default_samplers() -> list[str]:
    """Every registered scheduler at its defaults, a few of our variants, then the diffusers baselines.

    ``adjoint_dpm`` is left out: its forward solve is ``dpm_solver_pp``'s.
    """
    ours = [name for name in sorted(SCHEDULERS) if name != "adjoint_dpm"]
    return ours + list(EXTRA_VARIANTS) + list(DIFFUSERS_BASELINES)


def parse_sampler(spec: str) -> tuple[str, type, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (label, scheduler class, config overrides)."""
    name, _, options = spec.partition(":")
    overrides = {}
    for item in filter(None, options.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"sampler option {item!r} in {spec!r} must look like key=value.")
        overrides[key.strip()] = _parse_value(raw.strip())
    label = name if not overrides else f"{name} ({', '.join(f'{k}={v}' for k, v in overrides.items())})"
    if name in DIFFUSERS_BASELINES or (hasattr(diffusers, name) and name not in SCHEDULERS):
        label = f"diffusers {label}"
    return label, get_scheduler_class(name), overrides


GRID_OPTIONS = ("grid", "grid_guidance")
"""Sampler options that are not scheduler config keys. ``grid=learned`` runs the sampler on the learned grid that
``set_timesteps(n)`` would pick from the model's ``learned_grids.*`` (whichever method won its selection);
``grid=gits`` / ``grid=ld3`` on that method's grid; ``grid_guidance=s`` takes the grids learned at guidance scale
``s`` instead of the run's (a grid evaluated at a guidance scale it was not learned for)."""


def split_grid_options(overrides: dict) -> tuple[dict, dict]:
    """A parsed sampler's overrides -> (scheduler config overrides, ``GRID_OPTIONS`` given)."""
    grid = {k: v for k, v in overrides.items() if k in GRID_OPTIONS}
    if grid and "grid" not in grid:
        raise ValueError(f"grid_guidance={grid['grid_guidance']} needs grid=learned|gits|ld3 in the same sampler.")
    return {k: v for k, v in overrides.items() if k not in GRID_OPTIONS}, grid


def load_bench_grids(target: BenchTarget, label: str) -> LearnedGrids:
    """The learned grids in the model's scheduler folder, checked against its schedule and weights."""
    if target.side_info is None or not has_side_info(target.side_info, GRIDS_FILE):
        raise ValueError(
            f"sampler {label!r} runs on learned grids, but {target.name} has no {GRIDS_FILE}.safetensors/.json in "
            f"its scheduler folder ({target.side_info}); compute them with `diffalign calibrate --model "
            f"{target.name} --grid gits|ld3 --solver NAME --nfe ...`."
        )
    grids = LearnedGrids.load(target.side_info)
    grids.check_schedule(NoiseScheduleVP.from_config(target.scheduler_config), f" in {target.side_info}")
    if target.fingerprint is not None:
        grids.check_model(target.fingerprint)
    return grids


def grid_for(grids: LearnedGrids, cls: type, nfe: int, grid: dict, guidance_scale: float | None):
    """The sigmas a ``grid=...`` sampler runs on at ``nfe`` (``GRID_OPTIONS``), or None."""
    method = None if grid["grid"] == "learned" else grid["grid"]
    return grids.get(cls.__name__, nfe, grid.get("grid_guidance", guidance_scale), method)


def _parse_value(raw: str):
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


class _CountingModel:
    """Counts model calls, so that the reported NFE is what was actually spent."""

    def __init__(self, model: Callable):
        self.model, self.calls = model, 0

    def __call__(self, x, t):
        self.calls += 1
        return model_output(self.model, x, t)


ODE_SETTINGS = {"timestep_spacing": "linspace", "clip_sample": False, "thresholding": False}
"""Common to every sampler in a run: the same grid family and start, and no clipping of the data prediction
(DDIM and DDPM default to ``clip_sample=True``, which changes the ODE being solved)."""


def make_scheduler(cls: type, base_config: dict, overrides: dict, side_info: Path | None = None):
    """The scheduler a user gets by swapping ``cls`` into the model's pipeline, with ``ODE_SETTINGS``.

    A scheduler with learned side information loads it from ``side_info`` when that folder has it; if it was
    computed for other settings than ``overrides`` ask for, the scheduler keeps its fallback and says so.
    """
    scheduler = cls.from_config(keep_model_keys(base_config), **{**ODE_SETTINGS, **overrides})
    if side_info is not None and isinstance(scheduler, SideInfoMixin):
        if has_side_info(side_info, scheduler.side_info_name):
            try:
                scheduler.load_side_info(side_info)
            except ValueError as err:
                warnings.warn(f"{cls.__name__}{overrides or ''}: side information not used: {err}", stacklevel=2)
    return scheduler


def steps_for_nfe(scheduler, nfe: int) -> int:
    """Largest ``num_inference_steps`` whose timesteps (= model calls) fit in ``nfe``."""
    for steps in range(nfe, 0, -1):
        scheduler.set_timesteps(steps)
        if len(scheduler.timesteps) <= nfe:
            return steps
    raise ValueError(f"{type(scheduler).__name__} cannot run within {nfe} model evaluations.")


@torch.no_grad()
def run_sampler(
    scheduler, model: Callable, x_T: torch.Tensor, steps: int | None = None, sigmas=None
) -> tuple[torch.Tensor, int, float]:
    """Sample from ``x_T`` (B, ...) with ``steps`` steps or on the grid ``sigmas``; returns (x_0, model calls,
    seconds)."""
    counted = _CountingModel(model)
    start = time.perf_counter()
    x = sample(counted, x_T, scheduler, steps) if sigmas is None else sample_on_grid(counted, x_T, scheduler, sigmas)
    return x, counted.calls, time.perf_counter() - start


def run_benchmark(
    target: BenchTarget,
    samplers: Sequence[str] | None = None,
    nfes: Sequence[int] = DEFAULT_NFE,
    *,
    num_samples: int,
    seeds: Sequence[int],
    progress: bool = True,
    reference_samples: int | None = REFERENCE_SAMPLES,
) -> list[dict]:
    """One row per (sampler, NFE, seed): mse to the reference, fd (or None), nfe actually used, ms per sample.

    The reference ODE solution (the expensive part on learned models) is computed for the first
    ``reference_samples`` starting noises of each seed, and the MSE is averaged over those; FD uses all samples.
    """
    specs = []
    for spec in samplers or default_samplers():
        label, cls, overrides = parse_sampler(spec)
        overrides, grid = split_grid_options(overrides)
        grids = load_bench_grids(target, label) if grid else None
        if grid and all(grid_for(grids, cls, nfe, grid, target.guidance_scale) is None for nfe in nfes):
            raise ValueError(
                f"no {grid['grid']} grid for {label!r} at NFE {list(nfes)} in {target.side_info}; the file has "
                f"{sorted(grids.grids)}."
            )
        specs.append((label, cls, overrides, grid, grids))
    rows = []
    bar = tqdm(total=len(specs) * len(nfes) * len(seeds), disable=not progress, desc=f"bench {target.name}")
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn((num_samples, *target.sample_shape), generator=g).to(target.dtype)
        schedule = NoiseScheduleVP.from_config(target.scheduler_config)
        rho_T = float(schedule.rho(schedule.t_max))  # every linspace grid starts at t = T - 1
        bar.set_postfix_str("reference solution")
        k = num_samples if reference_samples is None else min(reference_samples, num_samples)
        reference = target.reference(x_T[:k], rho_T).to(torch.float64)
        if target.fd is not None:  # the model's own FD: a high-NFE solution of all samples
            bar.set_postfix_str("high-NFE FD floor")
            label, cls, overrides = parse_sampler(FLOOR_SAMPLER)
            x_floor, _, _ = run_sampler(
                make_scheduler(cls, target.scheduler_config, overrides, target.side_info), target.model, x_T, 100
            )
            rows.append(dict(sampler=REFERENCE, nfe=100, nfe_used=100, seed=seed, mse=None, fd=target.fd(x_floor)))
        for label, cls, overrides, grid, grids in specs:
            scheduler = make_scheduler(cls, target.scheduler_config, overrides, target.side_info)
            for nfe in nfes:
                bar.set_postfix_str(f"{label} NFE {nfe}")
                if grid:
                    sigmas = grid_for(grids, cls, nfe, grid, target.guidance_scale)
                    if sigmas is None:  # no row: nothing was learned for this NFE
                        bar.update()
                        continue
                    x0, calls, seconds = run_sampler(scheduler, target.model, x_T, sigmas=sigmas)
                else:
                    x0, calls, seconds = run_sampler(scheduler, target.model, x_T, steps_for_nfe(scheduler, nfe))
                x0 = x0.to(torch.float64)
                rows.append(
                    dict(
                        sampler=label,
                        nfe=nfe,
                        nfe_used=calls,
                        seed=seed,
                        mse=(x0[:k] - reference).pow(2).mean().item(),
                        fd=target.fd(x0.float()) if target.fd else None,
                        ms_per_sample=1e3 * seconds / num_samples,
                    )
                )
                bar.update()
    bar.close()
    return rows


def reference_fd(rows: list[dict]) -> tuple[float, float] | None:
    """Mean and std across seeds of a 100-NFE solution's FD: the model's own FD, the floor for any sampler."""
    values = [r["fd"] for r in rows if r["sampler"] == REFERENCE]
    return (statistics.fmean(values), statistics.pstdev(values)) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and spread (population std across seeds) per (sampler, NFE), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in (r for r in rows if r["sampler"] != REFERENCE):
        groups.setdefault((row["sampler"], row["nfe"]), []).append(row)
    out = []
    for (sampler, nfe), group in groups.items():
        summary = dict(sampler=sampler, nfe=nfe, nfe_used=group[0]["nfe_used"], seeds=len(group))
        for key in ("mse", "fd", "ms_per_sample"):
            values = [r[key] for r in group if r[key] is not None]
            summary[key] = statistics.fmean(values) if values else None
            summary[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else None
        out.append(summary)
    return out


def markdown_table(summary: list[dict], metric: str, fmt: str = "{:.2e}") -> str:
    """Samplers as rows, NFE as columns; cells ``mean ± std`` of ``metric`` across seeds."""
    nfes = sorted({r["nfe"] for r in summary})
    samplers = list(dict.fromkeys(r["sampler"] for r in summary))
    cell = {(r["sampler"], r["nfe"]): r for r in summary}
    lines = [f"| sampler | {' | '.join(f'NFE {n}' for n in nfes)} |", "|---" * (len(nfes) + 1) + "|"]
    for s in samplers:
        cells = []
        for n in nfes:
            r = cell.get((s, n))
            if r is None or r[metric] is None:
                cells.append("–")
                continue
            text = fmt.format(r[metric])
            if r.get(f"{metric}_std") is not None:
                text += f" ± {fmt.format(r[f'{metric}_std'])}"
            if r["nfe_used"] != n:
                text += f" ({r['nfe_used']} used)"
            cells.append(text)
        lines.append(f"| {s} | {' | '.join(cells)} |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], target: BenchTarget, out_dir: str | Path, meta: dict) -> dict[str, Path]:
    """CSV (summary), JSON (meta + per-seed rows + summary), Markdown tables and a PNG plot in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {k: out_dir / f"bench_{target.name}.{k}" for k in ("csv", "json", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    floors = dict(target.fd_floors)
    if reference_fd(rows) is not None:
        floors[f"{REFERENCE} (± {reference_fd(rows)[1]:.2f})"] = reference_fd(rows)[0]
    meta = {**meta, "model": target.name, "fd_floors": floors}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    md = [f"### {target.name}: mean squared error to the reference ODE solution (mean ± std over seeds)", ""]
    md += [markdown_table(summary, "mse"), ""]
    if target.fd is not None:
        text = ", ".join(f"{k} {v:.2f}" for k, v in floors.items())
        md += [
            f"### {target.name}: {target.fd_name} (floors: {text})",
            "",
            markdown_table(summary, "fd", "{:.2f}"),
            "",
        ]
    md += [f"### {target.name}: wall time per sample (ms)", "", markdown_table(summary, "ms_per_sample", "{:.3f}")]
    paths["md"].write_text("\n".join(md) + "\n")
    plot_summary(summary, floors if target.fd is not None else None, target.name, target.fd_name, paths["png"])
    return paths


def plot_summary(summary: list[dict], fd_floors: dict | None, name: str, fd_name: str, path: Path) -> None:
    """Error (and FD, with its floors, when ``fd_floors`` is given) against NFE on log axes, one line per sampler."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["mse"] + (["fd"] if fd_floors is not None else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 6.2), squeeze=False)
    samplers = list(dict.fromkeys(r["sampler"] for r in summary))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, s in enumerate(samplers):
            pts = sorted((r["nfe"], r[metric]) for r in summary if r["sampler"] == s and r[metric] is not None)
            style = "-" if not s.startswith("diffusers") else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, label=s, color=f"C{i % 10}")
        if metric == "fd":
            for k, (label, value) in enumerate(fd_floors.items()):
                ax.axhline(value, color="gray", ls=":" if k else "-.", lw=1, label=f"floor: {label}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        nfes = sorted({r["nfe"] for r in summary})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE (model evaluations)")
        ax.set_ylabel("MSE to reference ODE solution" if metric == "mse" else fd_name)
        ax.set_title(f"{name}: {'ODE error' if metric == 'mse' else 'Fréchet distance'} vs NFE")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class BenchConfig:
    """Options of ``diffalign bench``: which model, samplers, NFE grid and seeds, and where the outputs go."""

    model: str = option(
        "digits",
        "embedded 'digits' (small UNet, FD-digits) or 'gmm' (analytic, exact reference), or a diffusers pipeline "
        "folder / hub id",
    )
    samplers: list[str] | None = option(
        None,
        "names or 'name:key=value,...'; 'name:grid=learned|gits|ld3[,grid_guidance=S]' runs on the model's learned "
        "time grids; None: ours + diffusers'",
    )
    nfe: list[int] = option(DEFAULT_NFE, "NFE grid")
    num_samples: int = option(400, "samples per seed")
    seeds: list[int] = option((0, 1), "starting-noise seeds")
    reference_samples: int = option(REFERENCE_SAMPLES, "samples per seed solved accurately for the ODE error")
    out: str = option("bench_out", "output folder")
    prompts: list[str] | None = option(None, "prompts for text-conditioned pipelines (repeated over the batch)")
    guidance_scale: float = option(DEFAULT_GUIDANCE, "CFG scale for text pipelines")
    device: str = option("cpu", "device for pipeline models (the embedded ones run on CPU)")
    fid: Literal["default", "inception"] = option(
        "default", "'default': FD-digits on digits, none elsewhere; 'inception': real FID for pipeline models"
    )
    inception_weights: str | None = option(None, "torch-fidelity pt_inception-2015-12-05 weights file (offline)")
    fid_stats: str | None = option(
        None, "real-data Inception statistics: .npz with 'mu' (2048,), 'sigma' (2048, 2048)"
    )
    attention: str | None = option(
        None,
        "attention backend for UNet models: default, sdpa, sdpa:flash|efficient|cudnn|math, xformers, fused, "
        "fused:<kernel> (see diffalign.kernels); None: leave the model's own",
    )
    quiet: bool = option(False, "no progress bar")

    def __post_init__(self):
        validate_choices(self)
        if min(self.nfe) < 1:
            raise ValueError(f"--nfe must be >= 1, got {self.nfe}")
        if self.fid == "inception" and self.model in EMBEDDED:
            raise ValueError(
                "--fid inception applies to diffusers pipelines; the embedded models use FD-digits / none."
            )
        if self.attention is not None:
            if self.model == "gmm":
                raise ValueError(
                    "--attention applies to UNet models (digits, diffusers pipelines); 'gmm' has no attention."
                )
            from ..kernels.backends import parse_backend

            parse_backend(self.attention)


def run_bench(config: BenchConfig, command: str | None = None) -> dict[str, Path]:
    """Load ``config.model``, run every sampler at every NFE and seed, write the outputs (``command`` in the meta)."""
    kwargs = dict(attention=config.attention, prompts=config.prompts, guidance_scale=config.guidance_scale)
    if config.model not in EMBEDDED:
        kwargs.update(device=config.device)
        if config.fid == "inception":
            kwargs.update(inception_weights=config.inception_weights, fid_stats=config.fid_stats)
    target = load_target(config.model, **kwargs)
    rows = run_benchmark(
        target,
        config.samplers,
        config.nfe,
        num_samples=config.num_samples,
        seeds=config.seeds,
        progress=not config.quiet,
        reference_samples=config.reference_samples,
    )
    meta = dict(command=command, num_samples=config.num_samples, seeds=config.seeds, nfe=config.nfe)
    return write_outputs(rows, target, config.out, meta)
