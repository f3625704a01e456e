"""Drop-in diffusers schedulers and the VP-schedule maths they share."""

from .adjoint import adjoint_sample, model_output
from .adjoint_scheduler import AdjointDPMScheduler
from .base import eps_from_model_output
from .config import MODEL_KEYS, keep_model_keys
from .dc_calibrate import calibrate_dc
from .dc_solver import DCSolverScheduler
from .dpm_solver import DPMSolverScheduler
from .dpm_solver_pp import DPMSolverPPScheduler
from .dpm_solver_v3 import DPMSolverV3Scheduler
from .ems import EmpiricalModelStatistics, compute_ems
from .gits import gits_grid
from .ld3 import ld3_grid
from .learned_grid import LearnedGrids, pipeline_grid_kwargs, set_grid
from .registry import SCHEDULERS, get_scheduler_class, swap_scheduler
from .schedule import NoiseScheduleVP, time_grid

__all__ = [
    "MODEL_KEYS",
    "eps_from_model_output",
    "keep_model_keys",
    "model_output",
    "AdjointDPMScheduler",
    "DCSolverScheduler",
    "DPMSolverPPScheduler",
    "DPMSolverScheduler",
    "DPMSolverV3Scheduler",
    "EmpiricalModelStatistics",
    "compute_ems",
    "LearnedGrids",
    "gits_grid",
    "ld3_grid",
    "pipeline_grid_kwargs",
    "set_grid",
    "NoiseScheduleVP",
    "SCHEDULERS",
    "get_scheduler_class",
    "swap_scheduler",
    "adjoint_sample",
    "calibrate_dc",
    "time_grid",
]
