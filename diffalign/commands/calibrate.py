"""``diffalign calibrate``: DC-Solver's compensation ratios (and CPR coefficients) for an embedded model."""

from __future__ import annotations

from ..evaluation.calibration import DC_OUT, CalibrateConfig, run_calibration
from ..evaluation.grids import learn_grids

NAME = "calibrate"
HELP = "DC-Solver ratios (and CPR coefficients), or a GITS / LD3 time grid (--grid), for a model"
DESCRIPTION = (
    "Search DC-Solver's compensation ratios against an accurate ODE solution from n_datapoints seeded starting "
    "noises, for every NFE and guidance scale given, fit cascade polynomial regression over them (with >= 3 NFE "
    "values), and write dc_solver_ratios.safetensors + .json into --out (beside an existing scheduler_config.json, "
    "or as a full scheduler folder). Uses the benchmark's sampler settings. With --grid gits|ld3: learned time grids "
    "for --solver at each NFE, for an embedded model or a diffusers pipeline folder (--prompts and the first "
    "--guidance_scale for text pipelines), written as learned_grids.safetensors + .json into --out (default: the "
    "model's scheduler folder)."
)
CONFIG = CalibrateConfig


def run(config: CalibrateConfig) -> int:
    if config.grid != "dc":
        scale = config.guidance_scale[0] if config.model not in ("gmm", "digits") else None
        grids, out = learn_grids(
            config.model,
            config.solver,
            config.grid,
            config.nfe,
            scale,
            config.out,
            config.seed,
            config.prompts,
            config.grid_noises,
            config.grid_candidates,
        )
        for key, rhos in sorted(grids.grids.items()):
            print(f"  {key}: " + " ".join(f"{r:.4g}" for r in rhos))
        print(f"wrote {out}")
        return 0
    scheduler = run_calibration(config)
    print(f"DC-Solver ratios for {config.model} ({scheduler.config.model_fingerprint}):")
    for (nfe, g), ratios in sorted(scheduler.ratio_table.items()):
        print(f"  NFE {nfe:>2}  guidance {g:g}:  " + " ".join(f"{r:.3f}" for r in ratios))
    if scheduler.cpr_coeffs is not None:
        for nfe in config.cpr_preview or []:
            for g in config.guidance_scale:
                ratios, _ = scheduler.ratios_for(nfe, g)
                print(f"  CPR NFE {nfe:>2}  guidance {g:g}:  " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"wrote {config.out or DC_OUT}")
    return 0
