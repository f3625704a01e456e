"""``diffalign ems``: DPM-Solver-v3's empirical model statistics for an embedded model or a diffusers pipeline."""

from __future__ import annotations

from ..evaluation.calibration import EMSConfig, run_ems

NAME = "ems"
HELP = "compute DPM-Solver-v3's empirical model statistics for a model"
DESCRIPTION = (
    "Compute DPM-Solver-v3's empirical model statistics (l, s, b on a lambda grid) from a model and data, and save "
    "them (safetensors + JSON) into the model's scheduler folder (or --out), where "
    "DPMSolverV3Scheduler.from_pretrained and `diffalign bench` find them. 5 model calls per sample and grid point."
)
CONFIG = EMSConfig


def run(config: EMSConfig) -> int:
    folder = run_ems(config)
    print(f"wrote DPM-Solver-v3 EMS to {folder}; load with DPMSolverV3Scheduler.from_pretrained({str(folder)!r})")
    return 0
