"""AdjointDPM use (a): optimise the starting noise so that digits-cond draws the prompted digit.

Gradient ascent on the classifier's log-probability of the prompted digit, through every DPM-Solver++ step
(``adjoint_sample``), with each x_T kept at its starting norm. Prints the classifier scores before and after.

    python scripts/adjoint_optimize_noise.py --digits 0 1 2 3 4 5 6 7 8 9 --steps 10 --nfe 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adjoint_digits import digits_setup, draw, optimize_noise  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--digits", type=int, nargs="+", default=list(range(10)), help="prompted digits, one per image"
    )
    parser.add_argument("--per-digit", type=int, default=2, help="images per prompted digit")
    parser.add_argument("--steps", type=int, default=10, help="Adam steps on x_T")
    parser.add_argument("--nfe", type=int, default=10, help="DPM-Solver++(2M) steps of each solve")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--guidance-scale", type=float, default=0.3, help="classifier-free guidance of digits-cond")
    parser.add_argument("--seed", type=int, default=20_000)
    args = parser.parse_args(argv)
    if any(d not in range(10) for d in args.digits):
        parser.error(f"--digits must be in 0..9, got {args.digits}")
    setup = digits_setup(args.guidance_scale)
    labels = torch.tensor(args.digits).repeat_interleave(args.per_digit)
    x_T, _ = draw(len(labels), args.seed)
    before = setup.score(x_T, labels, args.nfe)
    x_T_opt = optimize_noise(setup, x_T, labels, steps=args.steps, nfe=args.nfe, lr=args.lr)
    after = setup.score(x_T_opt, labels, args.nfe)
    print(
        f"| x_T | mean log p(digit) | mean p(digit) | classified as prompted |  ({len(labels)} images, NFE {args.nfe})"
    )
    print("|---|---|---|---|")
    for name, s in (("initial", before), (f"after {args.steps} steps", after)):
        print(f"| {name} | {s['log_prob']:.3f} | {s['prob']:.3f} | {s['accuracy']:.1%} |")


if __name__ == "__main__":
    main()
