"""Learn, measure and ship the GITS / LD3 time grids of the embedded models (issue 17).

For each model and NFE: GITS grids (one per solver: the dynamic programme's coefficient is chosen with that solver)
from 16 teacher trajectories, and one LD3 grid (backprop through DPM-Solver++(2M), soft loss, 100 noises, early
stopping on 50 validation noises, started from the best of the GITS, time_quadratic and logSNR grids). Per solver
the grid with the lowest MSE on 150 selection noises (default, time_quadratic, logSNR, GITS, LD3) is shipped, unless
it is the default grid. Every grid is then measured on 128 test noises that no learning or selection step saw,
against a dopri5 reference (the ODE error of ``diffalign bench``); the training-noise MSE is printed beside it
(overfitting check). Grids are written as ``learned_grids.safetensors`` + ``.json`` beside the model's
``scheduler_config.json``: the selected one per (solver, NFE), and the GITS and LD3 grids as alternatives (the
``grid=gits`` / ``grid=ld3`` rows of ``diffalign bench``). About 2 min for gmm and 15 min for digits on 2 shared
CPU cores (mostly references).

    python scripts/learn_grids.py --models gmm --nfe 5 6 8 10 --cache /tmp/grids/cache --out /tmp/grids/gmm.json
    python scripts/learn_grids.py --models digits --nfe 5 6 8 10 --cache /tmp/grids/cache --out /tmp/grids/digits.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffalign.evaluation.benchmark import make_scheduler
from diffalign.evaluation.targets import LEARNED_MODEL_RTOL, reference_for
from diffalign.models.loading import load_model
from diffalign.samplers import DPMSolverPPScheduler, DPMSolverV3Scheduler
from diffalign.samplers.ems import EMS_FILE
from diffalign.samplers.gits import candidate_sigmas, gits_grid, local_error_costs, solve, teacher_trajectory
from diffalign.samplers.ld3 import ld3_grid
from diffalign.samplers.learned_grid import LearnedGrids, integer_grid
from diffalign.samplers.schedule import NoiseScheduleVP, time_grid
from diffalign.samplers.side_info import has_side_info, schedule_fingerprint

SOLVERS = {
    "dpm_solver_pp": DPMSolverPPScheduler,
    "dpm_solver_v3": DPMSolverV3Scheduler,
    "diffusers UniPC": UniPCMultistepScheduler,
    "diffusers DPM-Solver++": DPMSolverMultistepScheduler,
}
BASELINES = {  # diffusers' own grids, NFE 5 and 10
    "diffusers UniPC (karras)": (UniPCMultistepScheduler, {"use_karras_sigmas": True}),
    "diffusers DPM-Solver++ (karras)": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "diffusers DPM-Solver++ (lu lambdas)": (DPMSolverMultistepScheduler, {"use_lu_lambdas": True}),
}
SEEDS = {"gits": (100, 16), "ld3": (200, 100), "val": (300, 50), "select": (500, 150), "test": (400, 128)}
FIXED = ("time_quadratic", "logSNR")
"""Fixed grid families (DPM-Solver's ``skip_type``) tried beside the learned grids and as LD3's starting point."""


def noises(seed: int, n: int, shape) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def mse(model, scheduler, x, reference, sigmas) -> float:
    """The ODE error of ``scheduler`` on the grid ``sigmas``: mean squared distance to the reference end points."""
    return (solve(model, scheduler, x, sigmas).double() - reference.double()).pow(2).mean().item()


def fixed_sigmas(schedule: NoiseScheduleVP, nfe: int, spacing: str) -> np.ndarray:
    """A ``spacing`` grid from ``t_max`` to ``t = 0``, then the jump to sigma 0 (``final_sigmas_type='zero'``)."""
    rhos = schedule.rho(time_grid(schedule, nfe, spacing=spacing))
    rhos[-1] = 0.0
    return rhos


def references(
    reference, name: str, guidance_scale: float, shape, rho_T: float, cache: Path | None, fraction: float = 1.0
) -> dict:
    """``{split: (x_T, reference end point)}`` for ``SEEDS`` (``fraction`` of each count), read from / written to
    ``cache`` when given."""
    data = {}
    for split, (seed, n) in SEEDS.items():
        n = max(8, round(n * fraction))
        path = None if cache is None else cache / f"{name}_g{guidance_scale:g}_{seed}_{n}.pt"
        x = noises(seed, n, shape)
        if path is not None and path.is_file():
            data[split] = (x, torch.load(path, weights_only=True))
            continue
        data[split] = (x, reference(x.double(), rho_T).float())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data[split][1], path)
    return data


def default_sigmas(scheduler, nfe: int) -> np.ndarray:
    scheduler.set_timesteps(nfe)
    return scheduler.sigmas.double().numpy()


def learn_model(
    name: str,
    nfes: list[int],
    guidance_scale: float = 1.0,
    ship: bool = True,
    other_scale: float | None = None,
    cache: Path | None = None,
    fraction: float = 1.0,
) -> dict:
    """Learn, select, measure and (with ``ship``) save the grids of ``name``; with ``other_scale`` also measure
    the grids learned at ``guidance_scale`` at that other scale (overfitting to the guidance scale). ``fraction``
    shrinks every set of noises (quick runs). DPM-Solver-v3 is left out for a model without shipped EMS (it would
    be DPM-Solver++)."""
    torch.set_num_threads(1)
    target = load_model(name)
    guided = target.with_guidance(guidance_scale)
    model = lambda x, t: guided(x, t).to(x.dtype)  # noqa: E731
    config = target.scheduler_config
    schedule = NoiseScheduleVP.from_config(config)
    rho_T = float(schedule.rho(schedule.t_max))
    rtol = 1e-7 if name == "gmm" else LEARNED_MODEL_RTOL
    reference = reference_for(model, config, rtol)
    start = time.perf_counter()
    data = references(reference, name, guidance_scale, target.sample_shape, rho_T, cache, fraction)
    log = {
        "model": name,
        "guidance_scale": guidance_scale,
        "fraction": fraction,
        "reference_s": time.perf_counter() - start,
        "rows": [],
    }
    print(f"{name}: references in {log['reference_s']:.0f} s", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        schedulers = {label: make_scheduler(cls, config, {}, target.scheduler_dir) for label, cls in SOLVERS.items()}
    if not has_side_info(target.scheduler_dir, EMS_FILE):
        del schedulers["dpm_solver_v3"]
    x_gits = data["gits"][0]
    start = time.perf_counter()
    teachers = {}
    for integer in (False, True):
        candidates = candidate_sigmas(schedule, 80, integer=integer)
        trajectory = teacher_trajectory(model, config, x_gits, candidates)
        teachers[integer] = (candidates, trajectory, local_error_costs(model, config, trajectory, candidates))
    log["gits_teacher_s"] = time.perf_counter() - start
    print(f"{name}: GITS teachers + cost matrices in {log['gits_teacher_s']:.0f} s", flush=True)

    grids = LearnedGrids(schedule=schedule_fingerprint(schedule), model=target.fingerprint)
    g = None if guidance_scale == 1.0 else guidance_scale
    for nfe in nfes:
        start = time.perf_counter()
        pp = schedulers["dpm_solver_pp"]
        candidates, trajectory, costs = teachers[False]
        gits_pp, _ = gits_grid(model, pp, nfe, x_gits, trajectory, candidates, costs=costs)
        starts = {"gits": gits_pp, **{spacing: fixed_sigmas(schedule, nfe, spacing) for spacing in FIXED}}
        init = min(starts, key=lambda k: mse(model, pp, *data["val"], starts[k]))
        x, y = data["ld3"]
        ld3, ld3_info = ld3_grid(model, config, starts[init], x, y, *data["val"], num_epochs=6, batch_size=25)
        ld3_info["init"] = init
        ld3_s = time.perf_counter() - start
        for label, scheduler in schedulers.items():
            ours = hasattr(scheduler, "learned_sigmas")
            candidates, trajectory, costs = teachers[not ours]
            t0 = time.perf_counter()
            gits, gits_info = gits_grid(model, scheduler, nfe, x_gits, trajectory, candidates, costs=costs)
            gits_s = time.perf_counter() - t0
            options = {
                "default": default_sigmas(scheduler, nfe),
                "gits": gits,
                "ld3": ld3 if ours else integer_grid(schedule, ld3),
                **{k: v if ours else integer_grid(schedule, v) for k, v in starts.items() if k in FIXED},
            }
            row = {"solver": label, "nfe": nfe, "gits_s": gits_s, "ld3_s": ld3_s, "gits_coeff": gits_info["coeff"]}
            for method, sigmas in options.items():
                for split in ("val", "select", "test"):
                    row[f"{method}_{split}"] = mse(model, scheduler, *data[split], sigmas)
            row["gits_train"] = mse(model, scheduler, *data["gits"], gits)
            row["ld3_train"] = mse(model, scheduler, *data["ld3"], options["ld3"])
            best = min(options, key=lambda m: row[f"{m}_select"])
            row["shipped"] = best
            if best != "default":
                info = {"gits": gits_info, "ld3": ld3_info}.get(best, {"method": f"fixed {best} grid"})
                record = {k: v for k, v in info.items() if k != "tried"}
                record.update(method=best, select_mse=row[f"{best}_select"], default_select_mse=row["default_select"])
                grids.add(scheduler, options[best], g, **record)
            for method, info in (("gits", gits_info), ("ld3", ld3_info)):  # the bench's `grid=gits|ld3` rows
                if best != method:
                    record = {k: v for k, v in info.items() if k != "tried"} | {"method": method}
                    grids.add(
                        scheduler, options[method], g, alternative=True, select_mse=row[f"{method}_select"], **record
                    )
            row["sigmas"] = {method: np.asarray(sigmas).tolist() for method, sigmas in options.items()}
            log["rows"].append(row)
            fixed = "  ".join(f"{k} {row[k + '_test']:.3e}" for k in FIXED)
            print(
                f"  NFE {nfe:>2} {label:<24} test MSE default {row['default_test']:.3e}  gits {row['gits_test']:.3e}"
                f" (train {row['gits_train']:.3e})  ld3 {row['ld3_test']:.3e} (train {row['ld3_train']:.3e}, "
                f"from {init})  {fixed}  -> {best}",
                flush=True,
            )
    for label, (cls, overrides) in BASELINES.items():
        scheduler = cls.from_config(config, **overrides)
        for nfe in (5, 10):
            err = mse(model, scheduler, *data["test"], default_sigmas(scheduler, nfe))
            log["rows"].append({"solver": label, "nfe": nfe, "default_test": err})
            print(f"  NFE {nfe:>2} {label:<36} test MSE {err:.3e}", flush=True)
    if other_scale is not None:
        other_guided = target.with_guidance(other_scale)
        other = lambda x, t: other_guided(x, t).to(x.dtype)  # noqa: E731
        x = data["test"][0]
        y = reference_for(other, config, rtol)(x.double(), rho_T).float()
        for row in [r for r in log["rows"] if "shipped" in r]:
            scheduler = schedulers[row["solver"]]
            for method in ("default", row["shipped"]):
                row[f"{method}_test_at_{other_scale:g}"] = mse(other, scheduler, x, y, row["sigmas"][method])
            shipped, suffix = row["shipped"], f"test_at_{other_scale:g}"
            print(
                f"  at guidance {other_scale:g}: NFE {row['nfe']:>2} {row['solver']:<24} default "
                f"{row['default_' + suffix]:.3e}  {shipped} {row[shipped + '_' + suffix]:.3e}",
                flush=True,
            )
    if ship and grids.grids:
        grids.save(target.scheduler_dir)
        log["shipped_to"] = str(target.scheduler_dir)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gmm"], choices=["gmm", "digits", "digits-cond"])
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance (digits-cond)")
    parser.add_argument("--other_guidance_scale", type=float, help="also measure the grids at this guidance scale")
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10])
    parser.add_argument("--no-ship", action="store_true", help="measure only; do not write the grids")
    parser.add_argument("--out", type=Path, help="JSON file for the measurements")
    parser.add_argument("--cache", type=Path, help="folder for the reference end points (reused across runs)")
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction of every set of noises (quick runs)")
    args = parser.parse_args()
    logs = [
        learn_model(
            name, args.nfe, args.guidance_scale, not args.no_ship, args.other_guidance_scale, args.cache, args.fraction
        )
        for name in args.models
    ]
    if args.out:
        args.out.write_text(json.dumps(logs, indent=1))


if __name__ == "__main__":
    main()
