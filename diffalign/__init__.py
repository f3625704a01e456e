"""diffalign: fast diffusion ODE samplers as drop-in diffusers schedulers, and preference-alignment trainers.

Scheduler classes are exported here so that a diffusers pipeline saved with one of them reloads with
``DiffusionPipeline.from_pretrained`` (its ``model_index.json`` names the library ``diffalign``).
"""

from .samplers import SCHEDULERS, DPMSolverPPScheduler, DPMSolverScheduler, swap_scheduler

__version__ = "0.1.0"

__all__ = ["SCHEDULERS", "DPMSolverPPScheduler", "DPMSolverScheduler", "swap_scheduler", "__version__"]
