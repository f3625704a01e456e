"""Learned time grid + DC-Solver ratios in sequence (issue 17): is the combination better than either alone?

Per NFE: a GITS grid for DC-Solver's UniPC (ratios 1) from 16 teacher noises (seed 100), then DC-Solver's ratios
calibrated on that grid (``calibrate_dc``, 10 noises of seed 600). Measured, with DPM-Solver-v3 + EMS on its shipped
learned grid beside it, as the ODE error of ``diffalign bench`` on the bench's noises (seeds 0 and 1, 128 each;
mean ± std over the seeds):

    python scripts/grid_then_dc.py --model gmm --nfe 5 6 8 10
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from diffalign.evaluation.benchmark import make_scheduler, run_sampler
from diffalign.evaluation.targets import load_target
from diffalign.samplers import DCSolverScheduler, DPMSolverV3Scheduler, LearnedGrids, NoiseScheduleVP, calibrate_dc
from diffalign.samplers.gits import gits_grid
from diffalign.samplers.side_info import schedule_fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gmm", choices=["gmm", "digits"])
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10])
    parser.add_argument("--samples", type=int, default=128, help="noises per seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)  # DC-Solver without ratios says so at every set_timesteps
    target = load_target(args.model)
    config, schedule = target.scheduler_config, NoiseScheduleVP.from_config(target.scheduler_config)
    rho_T = float(schedule.rho(schedule.t_max))
    seeds = {
        s: torch.randn((args.samples, *target.sample_shape), generator=torch.Generator().manual_seed(s))
        for s in (0, 1)
    }
    references = {s: target.reference(x.to(target.dtype), rho_T).double() for s, x in seeds.items()}
    shipped = LearnedGrids.load(target.side_info)
    x_gits = torch.randn((16, *target.sample_shape), generator=torch.Generator().manual_seed(100))

    def error(scheduler, nfe, sigmas=None) -> str:
        values = []
        for s, x in seeds.items():
            x0, _, _ = run_sampler(
                scheduler, target.model, x.to(target.dtype), None if sigmas is not None else nfe, sigmas
            )
            values.append((x0.double() - references[s]).pow(2).mean().item())
        return f"{statistics.fmean(values):.2e} ± {statistics.pstdev(values):.1e}"

    print(
        "| NFE | DC, default grid, shipped ratios | UniPC (DC, ratios 1) on the GITS grid "
        "| DC, GITS grid, ratios calibrated on it | v3 + EMS, shipped learned grid |"
    )
    print("|---|---|---|---|---|")
    for nfe in args.nfe:
        dc_default = make_scheduler(DCSolverScheduler, config, {}, target.side_info)
        unipc = make_scheduler(DCSolverScheduler, config, {}, None)  # no ratios: UniPC exactly
        sigmas, _ = gits_grid(target.model, unipc, nfe, x_gits)
        grids = LearnedGrids(schedule=schedule_fingerprint(schedule), model=target.fingerprint)
        grids.add(unipc, sigmas, method="gits")
        joint = make_scheduler(DCSolverScheduler, config, {}, None)
        joint.learned_grids = grids
        model = lambda x, t: target.model(x, t).to(x.dtype)  # noqa: E731
        joint = calibrate_dc(model, joint, nfe, sample_shape=target.sample_shape, seed=600, cpr=False)
        v3 = make_scheduler(DPMSolverV3Scheduler, config, {}, target.side_info)
        cells = [
            error(dc_default, nfe),
            error(unipc, nfe, sigmas),  # DC-Solver's ratios belong to its default grid: on another one it runs UniPC
            error(joint, nfe),
            error(v3, nfe, shipped.get(v3, nfe)),
        ]
        print(f"| {nfe} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
