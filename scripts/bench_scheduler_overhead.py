"""Scheduler overhead: time of `set_timesteps` + every `step` of our schedulers against their diffusers counterparts.

The model is trivial (the output is a fixed tensor), so only scheduler arithmetic and bookkeeping is timed. Prints a
Markdown table of milliseconds per sampling run and the ratio ours / diffusers (below 1 = we are faster).

    python scripts/bench_scheduler_overhead.py                      # CPU, SD-1.5 latent shape (1, 4, 64, 64)
    python scripts/bench_scheduler_overhead.py --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

from diffalign.samplers import DPMSolverPPScheduler, DPMSolverScheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PAIRS = [
    # (label, ours, diffusers) built with the same algorithm settings
    ("DPM-Solver++(2M)", lambda: DPMSolverPPScheduler(**SD), lambda: DPMSolverMultistepScheduler(**SD)),
    (
        "DPM-Solver++(3M)",
        lambda: DPMSolverPPScheduler(**SD, solver_order=3),
        lambda: DPMSolverMultistepScheduler(**SD, solver_order=3),
    ),
    (
        "DPM-Solver(2M), noise",
        lambda: DPMSolverScheduler(**SD, final_sigmas_type="sigma_min"),
        lambda: DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    ),
    (
        "DPM-Solver++(2S)",
        lambda: DPMSolverPPScheduler(**SD, solver_mode="singlestep"),
        lambda: DPMSolverSinglestepScheduler(**SD, lower_order_final=True),
    ),
    (
        "DPM-Solver++(3S)",
        lambda: DPMSolverPPScheduler(**SD, solver_mode="singlestep", solver_order=3, solver_type="heun"),
        lambda: DPMSolverSinglestepScheduler(**SD, solver_order=3, solver_type="heun", lower_order_final=True),
    ),
]


def time_run(scheduler, x, model_out, steps: int, device: str) -> float:
    """Seconds for one `set_timesteps` + `steps` calls of `step`."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        x = scheduler.step(model_out, t, x).prev_sample
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="latent height = width (64: SD 1.5, 128: SDXL)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(args.device, dtype)
    model_out = (0.1 * torch.randn(x.shape, generator=g)).to(args.device, dtype)
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
        f"latents {tuple(x.shape)} {args.dtype}, {args.steps} steps, median of {args.repeats} runs\n"
    )
    print("| solver | ours (ms/run) | diffusers (ms/run) | ours / diffusers |")
    print("|---|---|---|---|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, make_ours, make_theirs in PAIRS:
            ours, theirs = make_ours(), make_theirs()
            times = {"ours": [], "theirs": []}
            for _ in range(args.repeats + 3):  # interleaved; the first 3 are warm-up
                times["ours"].append(time_run(ours, x, model_out, args.steps, args.device))
                times["theirs"].append(time_run(theirs, x, model_out, args.steps, args.device))
            a, b = (statistics.median(v[3:]) * 1e3 for v in (times["ours"], times["theirs"]))
            print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
