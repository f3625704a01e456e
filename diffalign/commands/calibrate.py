"""``diffalign calibrate``: DC-Solver's compensation ratios (and CPR coefficients) for an embedded model."""

from __future__ import annotations

from ..evaluation.calibration import CalibrateConfig, run_calibration

NAME = "calibrate"
HELP = "DC-Solver: calibrate compensation ratios (and CPR coefficients) on a few datapoints"
DESCRIPTION = (
    "Search DC-Solver's compensation ratios against an accurate ODE solution from n_datapoints seeded starting "
    "noises, for every NFE and guidance scale given, fit cascade polynomial regression over them (with >= 3 NFE "
    "values), and write dc_solver_ratios.safetensors + .json into --out (beside an existing scheduler_config.json, "
    "or as a full scheduler folder). Uses the benchmark's sampler settings."
)
CONFIG = CalibrateConfig


def run(config: CalibrateConfig) -> int:
    scheduler = run_calibration(config)
    print(f"DC-Solver ratios for {config.model} ({scheduler.config.model_fingerprint}):")
    for (nfe, g), ratios in sorted(scheduler.ratio_table.items()):
        print(f"  NFE {nfe:>2}  guidance {g:g}:  " + " ".join(f"{r:.3f}" for r in ratios))
    if scheduler.cpr_coeffs is not None:
        for nfe in config.cpr_preview or []:
            for g in config.guidance_scale:
                ratios, _ = scheduler.ratios_for(nfe, g)
                print(f"  CPR NFE {nfe:>2}  guidance {g:g}:  " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"wrote {config.out}")
    return 0
