"""Scheduler registry: names users type on the command line, and the one-line scheduler swap."""

from __future__ import annotations

import diffusers

from .adjoint_scheduler import AdjointDPMScheduler
from .config import keep_model_keys
from .dc_solver import DCSolverScheduler
from .dpm_solver import DPMSolverScheduler
from .dpm_solver_pp import DPMSolverPPScheduler
from .dpm_solver_v3 import DPMSolverV3Scheduler

SCHEDULERS: dict[str, type] = {
    "dpm_solver": DPMSolverScheduler,
    "dpm_solver_pp": DPMSolverPPScheduler,
    "dpm_solver_v3": DPMSolverV3Scheduler,
    "adjoint_dpm": AdjointDPMScheduler,
    "dc_solver": DCSolverScheduler,
}
"""Our schedulers by registry name. Later solvers add themselves here."""


def get_scheduler_class(name_or_class: str | type) -> type:
    """A scheduler class from a registry name, one of our class names, or a diffusers class name / class."""
    if isinstance(name_or_class, type):
        return name_or_class
    if name_or_class in SCHEDULERS:
        return SCHEDULERS[name_or_class]
    ours = {cls.__name__: cls for cls in SCHEDULERS.values()}
    if name_or_class in ours:
        return ours[name_or_class]
    cls = getattr(diffusers, name_or_class, None)
    if isinstance(cls, type) and name_or_class.endswith("Scheduler"):
        return cls
    raise ValueError(
        f"unknown scheduler {name_or_class!r}; use one of {sorted(SCHEDULERS)} or a diffusers scheduler class name "
        "such as 'DDIMScheduler'."
    )


def swap_scheduler(pipe, name_or_class: str | type, **overrides):
    """Replace ``pipe.scheduler`` by ``name_or_class`` built from the pipeline's scheduler config; returns ``pipe``.

    ``overrides`` change config keys, e.g. ``swap_scheduler(pipe, "dpm_solver_pp", solver_order=3)``. The noise
    schedule and prediction type always carry over, also into diffusers classes (see ``keep_model_keys``), and so
    does the side information (v3's EMS, DC-Solver's ratios) of the replaced scheduler when it fits the new one. A
    DC-Solver follows the pipeline's guidance scale (``DCSolverScheduler.follow_pipeline``).
    """
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"{type(pipe).__name__} has no `scheduler` attribute; pass a diffusers pipeline.")
    cls = get_scheduler_class(name_or_class)
    scheduler = cls.from_config(keep_model_keys(pipe.scheduler.config), **overrides)
    if hasattr(scheduler, "carry_side_info"):  # EMS / DC ratios of the replaced scheduler, when they fit
        scheduler.carry_side_info(pipe.scheduler)
    if hasattr(scheduler, "follow_pipeline"):  # DC-Solver: the ratios of the guidance the pipeline runs with
        scheduler.follow_pipeline(pipe)
    pipe.scheduler = scheduler
    return pipe
