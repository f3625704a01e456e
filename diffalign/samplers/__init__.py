"""Drop-in diffusers schedulers and the VP-schedule maths they share."""

from .dc_calibrate import calibrate_dc
from .dc_solver import DCSolverScheduler
from .dpm_solver import DPMSolverScheduler
from .dpm_solver_pp import DPMSolverPPScheduler
from .registry import SCHEDULERS, get_scheduler_class, swap_scheduler
from .schedule import NoiseScheduleVP, time_grid

__all__ = [
    "DCSolverScheduler",
    "DPMSolverPPScheduler",
    "DPMSolverScheduler",
    "NoiseScheduleVP",
    "SCHEDULERS",
    "get_scheduler_class",
    "swap_scheduler",
    "calibrate_dc",
    "time_grid",
]
