"""``diffalign`` command line: ``sample``, ``bench``, ``ems``, ``calibrate`` and ``train``."""

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


def _ems(args: argparse.Namespace) -> int:
    from .pipelines.ems_job import run_ems

    folder = run_ems(
        args.model,
        args.out,
        num_grid=args.grid_size,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        t_start=args.t_start,
        t_end=args.t_end,
        fd_step=args.fd_step,
        data=args.data,
        prompts=args.prompts,
        guidance_scale=args.guidance_scale,
        device=args.device,
        progress=not args.quiet,
    )
    print(f"wrote DPM-Solver-v3 EMS to {folder}; load with DPMSolverV3Scheduler.from_pretrained({str(folder)!r})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from .pipelines.bench_targets import load_target
    from .pipelines.benchmark import run_benchmark, write_outputs

    kwargs = {}
    if args.model not in ("gmm", "digits"):
        kwargs = dict(prompts=args.prompts, guidance_scale=args.guidance_scale, device=args.device)
        if args.fid == "inception":
            kwargs.update(inception_weights=args.inception_weights, fid_stats=args.fid_stats)
    elif args.fid == "inception":
        raise SystemExit("--fid inception applies to diffusers pipelines; the embedded models use FD-digits / none.")
    if args.attention is not None and args.model == "gmm":
        raise SystemExit("--attention applies to UNet models (digits, diffusers pipelines); 'gmm' has no attention.")
    target = load_target(args.model, attention=args.attention, **kwargs)
    rows = run_benchmark(
        target, args.samplers, args.nfe, args.num_samples, args.seeds, not args.quiet, args.reference_samples
    )
    command = "diffalign bench " + " ".join(shlex.quote(a) for a in args.argv)
    meta = dict(command=command.strip(), num_samples=args.num_samples, seeds=args.seeds, nfe=args.nfe)
    paths = write_outputs(rows, target, args.out, meta)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .alignment.config import TrainConfig
    from .alignment.trainer import train
    from .options import from_args

    result = train(from_args(TrainConfig, args))
    if result.history:
        last = result.history[-1]
        print(f"step {result.global_step}: loss {last['loss']:.4f}, implicit accuracy {last['implicit_accuracy']:.3f}")
    print(f"wrote {result.output_dir}")
    return 0


def _attention_backend(name: str) -> str:
    from .kernels.backends import parse_backend

    try:
        parse_backend(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def _calibrate(args: argparse.Namespace) -> int:
    from .pipelines.benchmark import parse_sampler
    from .pipelines.dc_calibration import calibrate_model, write_calibration

    _, _, overrides = parse_sampler("dc_solver:" + (args.options or ""))
    scheduler, _ = calibrate_model(
        args.model,
        nfe=args.nfe,
        guidance_scales=args.guidance_scale,
        overrides=overrides,
        n_datapoints=args.n_datapoints,
        seed=args.seed,
        num_iters=args.num_iters,
        lr=args.lr,
    )
    print(f"DC-Solver ratios for {args.model} ({scheduler.config.model_fingerprint}):")
    for (nfe, g), ratios in sorted(scheduler.ratio_table.items()):
        print(f"  NFE {nfe:>2}  guidance {g:g}:  " + " ".join(f"{r:.3f}" for r in ratios))
    if scheduler.cpr_coeffs is not None:
        for nfe in args.cpr_preview or []:
            for g in args.guidance_scale:
                ratios, _ = scheduler.ratios_for(nfe, g)
                print(f"  CPR NFE {nfe:>2}  guidance {g:g}:  " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"wrote {write_calibration(scheduler, args.out)}")
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

    from .samplers.ems import DEFAULT_GRID, DEFAULT_SAMPLES

    e = sub.add_parser(
        "ems",
        help="compute DPM-Solver-v3's empirical model statistics for a model",
        description="Compute DPM-Solver-v3's empirical model statistics (l, s, b on a lambda grid) from a model and "
        "data, and save them (safetensors + JSON) into the model's scheduler folder (or --out), where "
        "DPMSolverV3Scheduler.from_pretrained and `diffalign bench` find them. 5 model calls per sample and grid "
        "point.",
    )
    e.add_argument("--model", default="digits", help="'digits', 'gmm' or a diffusers pipeline folder (%(default)s)")
    e.add_argument("--out", help="folder to write (default: the model's scheduler folder)")
    e.add_argument("--grid-size", type=int, default=DEFAULT_GRID, help="lambda steps N (default: %(default)s)")
    e.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help="noised data samples per grid point (default: %(default)s)",
    )
    e.add_argument("--batch-size", type=int, default=256, help="model batch size (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="seed of the noise and probes (default: %(default)s)")
    e.add_argument("--t-start", type=float, help="first grid time in training timesteps (default: the last one)")
    e.add_argument("--t-end", type=float, default=0.0, help="last grid time (default: %(default)s)")
    e.add_argument("--fd-step", type=float, default=1e-3, help="finite-difference step of the JVPs (%(default)s)")
    e.add_argument("--data", help="pipelines: folder of images from the model's domain")
    e.add_argument("--prompts", nargs="+", help="text pipelines: prompts, cycled over the samples")
    e.add_argument("--guidance-scale", type=float, default=7.5, help="text pipelines: CFG scale (%(default)s)")
    e.add_argument("--device", default="cpu", help="device (default: %(default)s)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_ems)

    from .pipelines.benchmark import DEFAULT_NFE

    b = sub.add_parser(
        "bench",
        help="samplers x NFE: ODE error, Fréchet distance and wall time, as CSV / JSON / Markdown / PNG",
        description="Benchmark samplers against an accurate probability-flow ODE solution from the same starting "
        "noise (and FD-digits on the digits model) over a grid of NFE.",
    )
    b.add_argument(
        "--model",
        default="digits",
        help="embedded 'digits' (small UNet, FD-digits) or 'gmm' (analytic, exact reference), or a diffusers "
        "pipeline folder / hub id "
        "(default: %(default)s)",
    )
    b.add_argument("--samplers", nargs="+", help="names or 'name:key=value,...' (default: ours + diffusers')")
    b.add_argument("--nfe", nargs="+", type=int, default=list(DEFAULT_NFE), help="NFE grid (default: %(default)s)")
    b.add_argument("--num-samples", type=int, default=400, help="samples per seed (default: %(default)s)")
    b.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="starting-noise seeds (default: %(default)s)")
    b.add_argument(
        "--reference-samples",
        type=int,
        default=128,
        help="samples per seed solved accurately for the ODE error (default: %(default)s)",
    )
    b.add_argument("--out", default="bench_out", help="output folder (default: %(default)s)")
    b.add_argument("--prompts", nargs="+", help="prompts for text-conditioned pipelines (repeated over the batch)")
    b.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale for text pipelines (%(default)s)")
    b.add_argument("--device", default="cpu", help="device for pipeline models (default: %(default)s)")
    b.add_argument(
        "--fid",
        choices=["default", "inception"],
        default="default",
        help="'default': FD-digits on digits, none elsewhere; 'inception': real FID for pipeline models",
    )
    b.add_argument("--inception-weights", help="torch-fidelity pt_inception-2015-12-05 weights file (offline)")
    b.add_argument("--fid-stats", help="real-data Inception statistics: .npz with 'mu' (2048,), 'sigma' (2048, 2048)")
    b.add_argument(
        "--attention",
        type=_attention_backend,
        help="attention backend for UNet models: default, sdpa, sdpa:flash|efficient|cudnn|math, xformers, fused, "
        "fused:<kernel> (see diffalign.kernels; default: leave the model's own)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_bench)

    from .alignment.config import TrainConfig
    from .options import add_arguments

    t = sub.add_parser(
        "train",
        help="preference training (Diffusion-DPO) of SD 1.5 / SDXL / digits-cond, LoRA or full",
        description="Preference-train a diffusers pipeline's UNet on pairs (Pick-a-Pic format or a JSONL folder). "
        "Multi-GPU: accelerate launch -m diffalign.train with the same options.",
    )
    add_arguments(t, TrainConfig)
    t.set_defaults(func=_train)
    c = sub.add_parser(
        "calibrate",
        help="DC-Solver: calibrate compensation ratios (and CPR coefficients) on a few datapoints",
        description="Search DC-Solver's compensation ratios against an accurate ODE solution from n-datapoints "
        "seeded starting noises, for every NFE and guidance scale given, fit cascade polynomial regression over them "
        "(with >= 3 NFE values), and write dc_solver_ratios.safetensors + .json into --out (beside an existing "
        "scheduler_config.json, or as a full scheduler folder). Uses the benchmark's sampler settings.",
    )
    c.add_argument("--model", default="gmm", help="'gmm', 'digits' or 'digits-cond' (default: %(default)s)")
    c.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10], help="NFE values (default: %(default)s)")
    c.add_argument(
        "--guidance-scale", nargs="+", type=float, default=[1.0], help="CFG scales, digits-cond only (%(default)s)"
    )
    c.add_argument("--options", help="DC-Solver config overrides 'key=value,...', e.g. 'solver_order=3,dc_order=1'")
    c.add_argument("--n-datapoints", type=int, default=10, help="starting noises searched on (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed of the starting noises (default: %(default)s)")
    c.add_argument("--num-iters", type=int, default=60, help="Adam iterations per step (default: %(default)s)")
    c.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default: %(default)s)")
    c.add_argument("--cpr-preview", nargs="*", type=int, help="also print the CPR ratios for these NFE values")
    c.add_argument("--out", default="dc_calibration", help="output folder (default: %(default)s)")
    c.set_defaults(func=_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    nfes = args.nfe if isinstance(getattr(args, "nfe", None), list) else [getattr(args, "nfe", 1)]
    if min(nfes) < 1:
        parser.error(f"--nfe must be >= 1, got {args.nfe}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
