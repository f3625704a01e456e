"""diffalign: fast diffusion ODE samplers as drop-in diffusers schedulers, and preference-alignment trainers.

A diffusers pipeline saved with one of our schedulers reloads with ``DiffusionPipeline.from_pretrained``: its
``model_index.json`` names the scheduler's module (e.g. ``diffalign.samplers.dpm_solver_pp``).
"""

from .samplers import (
    SCHEDULERS,
    AdjointDPMScheduler,
    DCSolverScheduler,
    DPMSolverPPScheduler,
    DPMSolverScheduler,
    DPMSolverV3Scheduler,
    adjoint_sample,
    calibrate_dc,
    compute_ems,
    swap_scheduler,
)

__version__ = "0.1.0"

__all__ = [
    "SCHEDULERS",
    "AdjointDPMScheduler",
    "DCSolverScheduler",
    "DPMSolverPPScheduler",
    "DPMSolverScheduler",
    "DPMSolverV3Scheduler",
    "adjoint_sample",
    "calibrate_dc",
    "compute_ems",
    "swap_scheduler",
    "__version__",
]
