"""``diffalign`` command line: ``diffalign sample`` (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import sys


def _sample(args: argparse.Namespace) -> int:
    from .pipelines.demo import run_sample_demo

    results = run_sample_demo(args.out, nfe=args.nfe, num_images=args.num_images, seed=args.seed)
    width = max(len(name) for name, _ in results)
    print(f"RMS distance to the exact ODE solution at NFE {args.nfe} (embedded gmm digits model):")
    for name, err in sorted(results, key=lambda r: r[1]):
        print(f"  {name:<{width}}  {err:.4f}")
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Fast diffusion samplers as diffusers schedulers, and preference-alignment trainers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "sample",
        help="run every registered scheduler on the embedded model and write a PNG grid",
        description="Sample the embedded analytic digits model (no download) with every registered scheduler and "
        "diffusers' DDIM / DPMSolverMultistep at the same NFE and starting noise; print each one's RMS distance to "
        "the exact ODE solution and write a PNG grid.",
    )
    p.add_argument("--out", default="diffalign_samples.png", help="PNG file to write (default: %(default)s)")
    p.add_argument("--nfe", type=int, default=6, help="model evaluations per sample (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=8, help="samples per scheduler (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: %(default)s)")
    p.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "nfe", 1) < 1:
        parser.error(f"--nfe must be >= 1, got {args.nfe}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
