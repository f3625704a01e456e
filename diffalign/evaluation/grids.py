"""``diffalign calibrate --grid gits|ld3``: a learned time grid (``samplers.gits`` / ``samplers.ld3``) for one solver
of an embedded model, written as ``learned_grids.safetensors`` + ``.json`` beside the scheduler config in ``out``."""

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
    out: str | Path = "learned_grids",
    seed: int = 0,
) -> LearnedGrids:
    """Learn ``method``'s grid for ``solver`` on model ``name`` at each NFE and add it to ``out``'s grids.

    GITS: 16 teacher trajectories on 80 candidates. LD3: 100 training + 50 validation noises, teacher end points by
    DPM-Solver++(3M) with 200 steps, started from the ``time_quadratic`` grid (see docs/learned_grids.md).
    """
    if method not in GRID_METHODS:
        raise ValueError(f"--grid {method!r}; use one of {GRID_METHODS}.")
    spec = load_model(name)
    guided = spec.with_guidance(1.0 if guidance_scale is None else float(guidance_scale))

    def model(x, t):
        return guided(x, t).to(x.dtype)

    config = spec.scheduler_config
    scheduler = make_scheduler(get_scheduler_class(solver), config, {}, spec.scheduler_dir)
    schedule = NoiseScheduleVP.from_config(config)
    out = Path(out)
    grids = LearnedGrids(schedule=schedule_fingerprint(schedule), model=spec.fingerprint)
    if has_side_info(out, GRIDS_FILE):
        grids = LearnedGrids.load(out)
        grids.check_schedule(schedule, f" in {out}")
    generator = torch.Generator().manual_seed(seed)
    ours = hasattr(scheduler, "learned_sigmas")
    for nfe in nfes:
        if method == "gits":
            x = torch.randn((16, *spec.sample_shape), generator=generator)
            sigmas, info = gits_grid(model, scheduler, nfe, x)
        else:
            x, x_val = (torch.randn((n, *spec.sample_shape), generator=generator) for n in (100, 50))
            ends = [
                teacher_trajectory(model, config, z, [schedule.rho(schedule.t_max), 0.0], 200)[-1].float()
                for z in (x, x_val)
            ]
            init = schedule.rho(time_grid(schedule, nfe, spacing="time_quadratic"))
            init[-1] = 0.0
            sigmas, info = ld3_grid(model, config, init, x, ends[0], x_val, ends[1])
            sigmas = sigmas if ours else integer_grid(schedule, sigmas)
        grids.add(scheduler, np.asarray(sigmas), guidance_scale, **{k: v for k, v in info.items() if k != "tried"})
    if (out / "scheduler_config.json").is_file():
        grids.save(out)
    else:
        scheduler.learned_grids = grids
        scheduler.save_pretrained(out)
        grids.save(out)
    return grids
