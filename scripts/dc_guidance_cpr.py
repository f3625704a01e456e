"""DC-Solver under classifier-free guidance on ``digits-cond``: 2-D cascade polynomial regression over NFE x CFG.

Calibrates the ratios at every (NFE, guidance scale) of a grid, fits CPR over all of them (DC-Solver Sec. 3.4), and
prints a Markdown table of the mean squared error to a dopri5 solution of the guided probability-flow ODE, on
starting noises that calibration never saw: UniPC, DC-Solver with directly calibrated ratios and DC-Solver with CPR
ratios, on the calibrated settings and on held-out ones (CPR fitted without them; the direct row calibrates them only
for comparison). Batches cycle through the prompts 0..9. About 10 minutes on 2 CPU cores.

    python scripts/dc_guidance_cpr.py [--out FOLDER]   # FOLDER: also save the ratios + CPR as a scheduler folder
"""

from __future__ import annotations

import argparse
import warnings

import torch

from diffalign.evaluation.benchmark import run_sampler
from diffalign.evaluation.calibration import calibrate_model
from diffalign.evaluation.targets import LEARNED_MODEL_RTOL, reference_for
from diffalign.models import load_model
from diffalign.samplers import DCSolverScheduler
from diffalign.samplers.dc_calibrate import calibrate_dc, fit_cpr_coefficients

CAL_NFE, CAL_CFG = (5, 6, 8, 10), (2.0, 4.0, 6.0)
HELD_OUT = ((7, 3.0), (5, 5.0), (6, 3.0))
SETTINGS = dict(n_datapoints=10, seed=0, num_iters=60, lr=0.05, substeps=20)


def _mse(scheduler, model, noise: torch.Tensor, reference: torch.Tensor, nfe: int) -> float:
    return (run_sampler(scheduler, model, noise, nfe)[0].double() - reference).pow(2).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=64, help="unseen starting noises per setting")
    parser.add_argument("--out", help="save the calibrated scheduler (ratios + CPR) to this folder")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    scheduler, target = calibrate_model("digits-cond", nfe=CAL_NFE, guidance_scales=CAL_CFG, **SETTINGS)
    if args.out:
        scheduler.save_pretrained(args.out)
    noise = torch.randn(args.num_samples, *target.sample_shape, generator=torch.Generator().manual_seed(1234))
    rho_T = float(scheduler.noise_schedule.rho(scheduler.noise_schedule.t_max))
    held = load_model("digits-cond")
    fit_cpr_coefficients(scheduler)
    rows = ["| NFE | CFG | setting | UniPC | DC (calibrated) | DC (CPR) | UniPC / DC-CPR |", "|---" * 7 + "|"]
    references = {}
    for nfe, g in [(n, g) for g in CAL_CFG for n in CAL_NFE[:2]] + list(HELD_OUT):
        model = target.with_guidance(g)
        if g not in references:
            references[g] = reference_for(model, target.scheduler_config, LEARNED_MODEL_RTOL)(noise, rho_T).double()
        unipc = DCSolverScheduler.from_config(scheduler.config)
        unipc.set_dc_ratios(nfe, [1.0] * nfe, g)
        cpr = DCSolverScheduler.from_config(scheduler.config, guidance_scale=g)
        cpr.cpr_coeffs = scheduler.cpr_coeffs
        if (nfe, g) in HELD_OUT:
            direct = DCSolverScheduler.from_config(scheduler.config, guidance_scale=g)
            direct = calibrate_dc(
                held.with_guidance(g),
                direct,
                nfe=nfe,
                guidance_scale=g,
                sample_shape=held.sample_shape,
                cpr=False,
                **SETTINGS,
            )
            label = "held out"
        else:
            direct = DCSolverScheduler.from_config(scheduler.config, guidance_scale=g)
            direct.ratio_table = dict(scheduler.ratio_table)
            label = "calibrated"
        e_u, e_d, e_c = (_mse(s, model, noise, references[g], nfe) for s in (unipc, direct, cpr))
        rows.append(f"| {nfe} | {g:g} | {label} | {e_u:.3e} | {e_d:.3e} | {e_c:.3e} | {e_u / e_c:.2f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
