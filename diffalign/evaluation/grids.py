"""``diffalign calibrate --grid gits|ld3``: a learned time grid (``samplers.gits`` / ``samplers.ld3``) for one solver
of an embedded model or a diffusers pipeline folder, written as ``learned_grids.safetensors`` + ``.json`` beside the
scheduler config in ``out`` (default: the model's own scheduler folder, so that ``from_pretrained`` finds it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..models.loading import load_model
from ..samplers import get_scheduler_class
from ..samplers.gits import gits_grid, teacher_trajectory
from ..samplers.ld3 import ld3_grid
from ..samplers.learned_grid import GRIDS_FILE, LearnedGrids, integer_grid
from ..samplers.schedule import NoiseScheduleVP, time_grid
from ..samplers.side_info import has_side_info, schedule_fingerprint
from .benchmark import make_scheduler

GRID_METHODS = ("gits", "ld3")


def learn_grids(
    name: str,
    solver: str,
    method: str,
    nfes: Sequence[int],
    guidance_scale: float | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    prompts: list[str] | None = None,
    noises: int | None = None,
    candidates: int = 80,
) -> tuple[LearnedGrids, Path]:
    """Learn ``method``'s grid for ``solver`` on model ``name`` at each NFE and add it to ``out``'s grids.

    ``name``: an embedded model or a diffusers pipeline folder (text pipelines need ``prompts``); conditional models
    run at ``guidance_scale`` and their grids are stored for it. ``out`` None: the model's scheduler folder.
    GITS: ``noises`` (default 16) teacher trajectories on ``candidates`` candidate sigmas (about 9 model calls per
    candidate). LD3: ``noises`` (default 100) training + half as many validation noises, teacher end points by
    DPM-Solver++(3M) with 200 steps, started from the ``time_quadratic`` grid (see docs/learned_grids.md).
    Returns the grids and the folder written.
    """
    if method not in GRID_METHODS:
        raise ValueError(f"--grid {method!r}; use one of {GRID_METHODS}.")
    spec = load_model(name, prompts=prompts, **({} if guidance_scale is None else {"guidance_scale": guidance_scale}))
    if spec.guided is None and guidance_scale not in (None, 1.0):
        raise ValueError(f"{name} is unconditional: its grids take no guidance scale (got {guidance_scale}).")
    scale = spec.guidance_scale  # None for unconditional models

    def model(x, t):
        return spec.model(x, t).to(x.dtype)

    if out is None and spec.scheduler_dir is None:
        raise ValueError(f"{name} has no local scheduler folder to write the grids into; pass --out FOLDER.")
    out = Path(out) if out is not None else spec.scheduler_dir
    config = spec.scheduler_config
    scheduler = make_scheduler(get_scheduler_class(solver), config, {}, spec.scheduler_dir)
    schedule = NoiseScheduleVP.from_config(config)
    grids = LearnedGrids(schedule=schedule_fingerprint(schedule), model=spec.fingerprint)
    if has_side_info(out, GRIDS_FILE):
        grids = LearnedGrids.load(out)
        grids.check_schedule(schedule, f" in {out}")
        grids.check_model(spec.fingerprint)
    generator = torch.Generator().manual_seed(seed)
    ours = hasattr(scheduler, "learned_sigmas")
    for nfe in nfes:
        if method == "gits":
            x = torch.randn((noises or 16, *spec.sample_shape), generator=generator)
            sigmas, info = gits_grid(model, scheduler, nfe, x, num_candidates=candidates)
        else:
            n = noises or 100
            x, x_val = (torch.randn((k, *spec.sample_shape), generator=generator) for k in (n, max(1, n // 2)))
            ends = [
                teacher_trajectory(model, config, z, [schedule.rho(schedule.t_max), 0.0], 200)[-1].float()
                for z in (x, x_val)
            ]
            init = schedule.rho(time_grid(schedule, nfe, spacing="time_quadratic"))
            init[-1] = 0.0
            sigmas, info = ld3_grid(model, config, init, x, ends[0], x_val, ends[1])
            sigmas = sigmas if ours else integer_grid(schedule, sigmas)
        record = {k: v for k, v in info.items() if k != "tried"} | {"method": method, "description": info["method"]}
        grids.add(scheduler, np.asarray(sigmas), scale, **record)
    if not (out / "scheduler_config.json").is_file():  # a fresh folder: make it loadable by from_pretrained
        scheduler.save_pretrained(out)
    grids.save(out)
    return grids, out
