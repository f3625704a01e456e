"""Learned scheduler side information for a model: the jobs behind ``diffalign ems`` and ``diffalign calibrate``.

``run_ems``: DPM-Solver-v3's empirical model statistics. Data: the embedded models use their own (the digits
training split; exact draws from the mixture); a pipeline needs a folder of images, encoded by its VAE when it has
one, and for text pipelines the prompts and guidance scale it will be sampled with (the statistics of a guided model
depend on both).

``calibrate_model``: DC-Solver's compensation ratios (and CPR coefficients), calibrated with the benchmark's sampler
settings (``benchmark.ODE_SETTINGS`` plus overrides) so that ``diffalign bench`` uses the result.

Both write into the model's scheduler folder (beside its ``scheduler_config.json``, which is left alone) or, for a
new folder, a full ``save_pretrained`` scheduler that ``from_pretrained`` loads. The options' defaults are those of
the library functions they feed (``compute_ems``, ``calibrate_dc``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..models.loading import DEFAULT_GUIDANCE, EMBEDDED, ModelSpec, load_model
from ..options import option, validate_choices
from ..samplers import DCSolverScheduler, DPMSolverV3Scheduler, calibrate_dc, compute_ems, keep_model_keys
from ..samplers.dc_calibrate import fit_cpr_coefficients
from ..samplers.ems import EMS_FILE
from ..samplers.side_info import save_side_info
from .benchmark import ODE_SETTINGS, parse_sampler


def _default(function, name: str):
    """The default of ``function``'s parameter ``name``: an option re-uses the library's default, never a copy."""
    return inspect.signature(function).parameters[name].default


@dataclass
class EMSConfig:
    """Options of ``diffalign ems``."""

    model: str = option("digits", "'digits', 'gmm', 'digits-cond' or a diffusers pipeline folder")
    out: str | None = option(None, "folder to write; None: the model's scheduler folder")
    grid_size: int = option(_default(compute_ems, "num_grid"), "lambda steps N")
    num_samples: int = option(_default(compute_ems, "num_samples"), "noised data samples per grid point")
    batch_size: int = option(_default(compute_ems, "batch_size"), "model batch size")
    seed: int = option(_default(compute_ems, "seed"), "seed of the noise and probes")
    t_start: float | None = option(
        _default(compute_ems, "t_start"), "first grid time in training timesteps; None: the last one"
    )
    t_end: float = option(_default(compute_ems, "t_end"), "last grid time")
    fd_step: float = option(_default(compute_ems, "fd_step"), "finite-difference step of the JVPs")
    data: str | None = option(None, "pipelines: folder of images from the model's domain")
    prompts: list[str] | None = option(None, "text pipelines: prompts, cycled over the samples")
    guidance_scale: float = option(DEFAULT_GUIDANCE, "text pipelines: CFG scale")
    device: str = option("cpu", "device")
    quiet: bool = option(False, "no progress bar")


def run_ems(config: EMSConfig) -> Path:
    """Compute and save EMS for ``config.model``; returns the folder written (default: the model's scheduler folder).

    The analytic ``gmm`` is evaluated in float64, learned models in float32 (or their own dtype when wider).
    """
    spec = load_model(
        config.model,
        prompts=config.prompts,
        guidance_scale=config.guidance_scale,
        device=config.device,
        data=config.data,
    )
    if spec.data is None:
        raise ValueError("a pipeline needs --data FOLDER of images (its training domain) to compute EMS on.")
    name = spec.name if spec.guided is None else f"{spec.name} (guidance {spec.guidance_scale})"
    # batch row k is conditioned on prompt k % period and data row k is of that prompt's class: keep them in step
    batch_size = max(spec.period, config.batch_size - config.batch_size % spec.period)
    ems = compute_ems(
        spec.model,
        spec.data(),
        spec.scheduler_config,
        num_grid=config.grid_size,
        num_samples=config.num_samples,
        batch_size=batch_size,
        seed=config.seed,
        t_start=config.t_start,
        t_end=config.t_end,
        fd_step=config.fd_step,
        model_name=name,
        fingerprint=spec.fingerprint,
        dtype=torch.promote_types(spec.dtype, torch.float32),
        device=config.device,
        progress=not config.quiet,
    )
    folder = Path(config.out) if config.out is not None else spec.scheduler_dir
    if folder is None:
        raise ValueError(f"{config.model} has no local scheduler folder to write into; pass --out FOLDER.")
    if not (folder / "scheduler_config.json").is_file():  # a fresh folder: make it loadable by from_pretrained
        DPMSolverV3Scheduler(**spec.scheduler_config).save_pretrained(folder)
    save_side_info(folder, EMS_FILE, *ems.state())
    return folder


DC_OUT = "dc_calibration"
"""Where ``diffalign calibrate`` writes DC-Solver ratios unless ``--out`` is given."""


@dataclass
class CalibrateConfig:
    """Options of ``diffalign calibrate``."""

    model: str = option("gmm", "'gmm', 'digits', 'digits-cond'; with --grid also a diffusers pipeline folder")
    nfe: list[int] = option(_default(calibrate_dc, "nfe"), "NFE values")
    guidance_scale: list[float] = option(
        [_default(calibrate_dc, "guidance_scale")],
        "CFG scales of conditional models (digits-cond, text pipelines); --grid uses the first",
    )
    prompts: list[str] | None = option(None, "--grid on a text pipeline: prompts, cycled over the batch")
    options: str | None = option(None, "DC-Solver config overrides 'key=value,...', e.g. 'solver_order=3,dc_order=1'")
    n_datapoints: int = option(_default(calibrate_dc, "n_datapoints"), "starting noises searched on")
    seed: int = option(_default(calibrate_dc, "seed"), "seed of the starting noises")
    num_iters: int = option(_default(calibrate_dc, "num_iters"), "Adam iterations per step")
    lr: float = option(_default(calibrate_dc, "lr"), "Adam learning rate")
    cpr_preview: list[int] | None = option(None, "also print the CPR ratios for these NFE values")
    grid: Literal["dc", "gits", "ld3"] = option("dc", "what to calibrate: DC-Solver ratios, or a GITS / LD3 time grid")
    solver: str = option("dpm_solver_v3", "--grid only: the scheduler the grid is for (ours or a diffusers class)")
    grid_noises: int | None = option(
        None, "--grid only: noises learned on; None: 16 GITS teachers, 100 LD3 training noises (+ half for validation)"
    )
    grid_candidates: int = option(80, "--grid gits only: candidate sigmas (about 9 model calls each)")
    out: str | None = option(
        None, f"output folder; None: '{DC_OUT}' for DC ratios, the model's scheduler folder for --grid"
    )

    def __post_init__(self):
        validate_choices(self)
        if min(self.nfe) < 1:
            raise ValueError(f"--nfe must be >= 1, got {self.nfe}")
        if self.grid == "dc" and self.model not in EMBEDDED:
            raise ValueError(
                f"DC-Solver ratios are calibrated for the embedded models {EMBEDDED}, not {self.model!r}; "
                "a pipeline folder takes --grid gits|ld3."
            )
        self.overrides()  # a malformed --options fails here, before any work

    def overrides(self) -> dict:
        """The DC-Solver config overrides of ``options``."""
        return parse_sampler("dc_solver:" + (self.options or ""))[2]


def calibrate_model(
    name: str,
    nfe: Sequence[int],
    guidance_scales: Sequence[float] = (1.0,),
    overrides: dict | None = None,
    **calibrate_kwargs,
) -> tuple[DCSolverScheduler, ModelSpec]:
    """Calibrate ``name`` at every (NFE, guidance scale), with the benchmark's settings; fit CPR over all of them.

    ``calibrate_kwargs`` go to ``calibrate_dc`` (``n_datapoints``, ``seed``, ``num_iters``, ``lr``, ``substeps``).
    """
    if name not in EMBEDDED:
        raise ValueError(f"unknown model {name!r} for calibration; use 'gmm', 'digits' or 'digits-cond'.")
    spec = load_model(name)
    settings = {**ODE_SETTINGS, **(overrides or {})}
    scheduler = DCSolverScheduler.from_config(keep_model_keys(spec.scheduler_config), **settings)
    for g in guidance_scales:
        model = spec.with_guidance(float(g))
        scheduler = calibrate_dc(
            lambda x, t, model=model: model(x, t).to(x.dtype),
            scheduler,
            nfe=list(nfe),
            guidance_scale=float(g),
            sample_shape=spec.sample_shape,
            fingerprint=spec.fingerprint,
            cpr=False,
            **calibrate_kwargs,
        )
    if len(set(nfe)) >= 3:
        fit_cpr_coefficients(scheduler)
    return scheduler, spec


def run_calibration(config: CalibrateConfig) -> DCSolverScheduler:
    """Calibrate ``config.model`` and write the ratios (and CPR coefficients) into ``config.out``."""
    scheduler, _ = calibrate_model(
        config.model,
        config.nfe,
        config.guidance_scale,
        config.overrides(),
        n_datapoints=config.n_datapoints,
        seed=config.seed,
        num_iters=config.num_iters,
        lr=config.lr,
    )
    write_calibration(scheduler, config.out or DC_OUT)
    return scheduler


def write_calibration(scheduler: DCSolverScheduler, out: str | Path) -> Path:
    """Side information beside an existing ``scheduler_config.json`` in ``out``; else a full scheduler folder."""
    out = Path(out)
    if (out / "scheduler_config.json").is_file():
        save_side_info(out, scheduler.side_info_name, *scheduler.side_info_state())
    else:
        scheduler.save_pretrained(out)
    return out
