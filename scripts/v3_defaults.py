"""Choose DPM-Solver-v3's defaults by measurement: v3 settings x EMS budgets against diffusers' UniPC at its defaults.

For each model (``digits``; ``digits-cond`` at the benchmark's guidance 7.5) every sampler starts from the same
``x_T`` and is scored, as ``diffalign bench`` scores it, by the mean squared error to the dopri5 solution of the
probability-flow ODE (``evaluation/reference.py``), at NFE 5 / 6 / 8 / 10. The baseline is
``UniPCMultistepScheduler.from_config(model keys)``: UniPC exactly as diffusers builds it (linspace grid, bh2,
order 2, corrector, final sigma 0). v3 runs each candidate setting on statistics computed here at a few CPU budgets
(grid points x samples, ``compute_ems`` on one thread), on the shipped statistics where the model has them, and on
none (its DPM-Solver++ fallback). ``v3 defaults`` is ``DPMSolverV3Scheduler`` with no overrides at all.

Then a second UNet, trained here for this check only (never shipped, never tuned on): a small ``UNet2DModel`` on
8x8 anti-aliased disks and squares, ``--toy_steps`` AdamW steps, with statistics at ``--toy_budget``, compared in
the same way.

Conditional statistics need each data row paired with the prompt the guided model gives it (``GuidedUNet`` gives
row ``i`` the digit ``i % 10``): the digits are interleaved by class and the batch size is a multiple of 10.

    python scripts/v3_defaults.py --toy_steps 0          # digits and digits-cond: ~8 min CPU on one thread
    python scripts/v3_defaults.py --models --out docs/bench/v3_defaults_second_unet.json   # the second UNet only
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel, UniPCMultistepScheduler

from diffalign.evaluation.benchmark import run_sampler, steps_for_nfe
from diffalign.evaluation.targets import reference_for
from diffalign.models.adapters import plain_unet
from diffalign.models.digits import build_scheduler, load_digits_data
from diffalign.models.loading import load_model, schedule_config
from diffalign.samplers import DPMSolverV3Scheduler, NoiseScheduleVP, compute_ems, keep_model_keys
from diffalign.samplers.ems import EMS_FILE
from diffalign.samplers.side_info import has_side_info, read_side_info, save_side_info

OLD_DEFAULTS = dict(
    timestep_spacing="linspace",
    use_corrector=True,
    predictor_pseudo=None,
    lower_order_final=True,
    final_sigmas_type="zero",
    solver_order=2,
)
"""v3's defaults before this measurement; every candidate below is a change of these."""
CANDIDATES = {
    "linspace (old defaults)": {},
    "linspace, no corrector": dict(use_corrector=False),
    "time_quadratic": dict(timestep_spacing="time_quadratic"),
    "time_quadratic, order 3 pseudo": dict(timestep_spacing="time_quadratic", solver_order=3, predictor_pseudo=True),
    "time_quadratic, no corrector": dict(timestep_spacing="time_quadratic", use_corrector=False),
    "time_quadratic, no corrector, order 3": dict(
        timestep_spacing="time_quadratic", use_corrector=False, solver_order=3
    ),
    "time_quadratic, no corrector, order 3 pseudo": dict(
        timestep_spacing="time_quadratic", use_corrector=False, solver_order=3, predictor_pseudo=True
    ),
    "time_quadratic, no corrector, sigma_min end": dict(
        timestep_spacing="time_quadratic", use_corrector=False, final_sigmas_type="sigma_min"
    ),
    "logSNR, no corrector": dict(timestep_spacing="logSNR", use_corrector=False),
}
"""Each NFE is a separate run, so "corrector off at NFE >= 9" (the official CIFAR-10 rule) is read off the rows
without corrector at NFE 10."""
DEFAULTS = "v3 defaults"
PROMPT_CYCLE = 10  # GuidedUNet.for_digits gives batch row i the digit i % 10


def parse_budget(text: str) -> tuple[int, int]:
    """``"100x256"`` -> (grid points N, samples K)."""
    grid, sep, samples = text.partition("x")
    if not sep or not grid.isdigit() or not samples.isdigit():
        raise argparse.ArgumentTypeError(f"budget {text!r} must look like GRIDxSAMPLES, e.g. 100x256.")
    return int(grid), int(samples)


def ems_data(name: str) -> torch.Tensor:
    """The training digits (K, 1, 8, 8); for ``digits-cond`` interleaved by class: row ``i`` shows ``i % 10``."""
    images, labels = load_digits_data("train")
    if name != "digits-cond":
        return images
    per_class = [images[labels == c] for c in range(PROMPT_CYCLE)]
    m = min(len(p) for p in per_class)
    return torch.stack([p[:m] for p in per_class], 1).reshape(-1, *images.shape[1:])  # (10 m, 1, 8, 8)


def statistics_folder(model, data, config: dict, budget: tuple[int, int], folder: Path, fingerprint=None) -> float:
    """Compute EMS at ``budget`` into ``folder`` unless it has them; returns the CPU seconds they took (one thread:
    the time on an idle core), kept beside them so that a rerun on the same ``--cache`` reports it too."""
    seconds_file = folder / "cpu_seconds.json"
    if has_side_info(folder, EMS_FILE) and seconds_file.is_file():
        return json.loads(seconds_file.read_text())
    start = time.process_time()
    ems = compute_ems(
        model,
        data,
        config,
        num_grid=budget[0],
        num_samples=budget[1],
        batch_size=25 * PROMPT_CYCLE,
        fingerprint=fingerprint,
        progress=False,
    )
    seconds = time.process_time() - start
    save_side_info(folder, EMS_FILE, *ems.state())
    seconds_file.write_text(json.dumps(seconds))
    return seconds


def v3_scheduler(config: dict, overrides: dict | None, folder: Path | None) -> DPMSolverV3Scheduler:
    """v3 at ``OLD_DEFAULTS`` plus ``overrides`` (None: the class defaults), on the EMS in ``folder`` (None: none)."""
    settings = {} if overrides is None else {**OLD_DEFAULTS, **overrides}
    scheduler = DPMSolverV3Scheduler.from_config(keep_model_keys(config), **settings)
    return scheduler if folder is None else scheduler.load_side_info(folder)


def errors(scheduler, model, x_T: torch.Tensor, reference: torch.Tensor, nfes) -> list[float]:
    """MSE to ``reference`` at each NFE (steps that fit the budget, as ``diffalign bench`` counts them)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "no EMS" warning, once per NFE
        for nfe in nfes:
            x0, _, _ = run_sampler(scheduler, model, x_T, steps_for_nfe(scheduler, nfe))
            out.append((x0.double() - reference).pow(2).mean().item())
    return out


def shapes(n: int, generator: torch.Generator, size: int = 8, supersample: int = 4) -> torch.Tensor:
    """(n, 1, size, size) in [-1, 1]: one filled disk or square of random centre, size and brightness, anti-aliased."""
    square = torch.rand(n, generator=generator) < 0.5
    centre = 2.0 + torch.rand(n, 2, generator=generator) * (size - 4)  # (n, 2)
    radius = 1.2 + torch.rand(n, generator=generator) * 1.8
    brightness = 0.4 + 0.6 * torch.rand(n, generator=generator)
    coords = (torch.arange(size * supersample) + 0.5) / supersample
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dy, dx = yy - centre[:, 0, None, None], xx - centre[:, 1, None, None]  # (n, S, S)
    r = radius[:, None, None]
    inside = torch.where(
        square[:, None, None], (dx.abs() <= 0.886 * r) & (dy.abs() <= 0.886 * r), dx**2 + dy**2 <= r**2
    )
    coverage = F.avg_pool2d(inside.float()[:, None], supersample)  # (n, 1, size, size)
    return coverage * 2 * brightness[:, None, None, None] - 1


def train_toy_unet(steps: int, seed: int = 0, batch_size: int = 64) -> tuple[UNet2DModel, torch.Tensor]:
    """A small UNet2DModel trained on ``shapes`` with the digits' DDPM schedule (epsilon loss), and its data."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = shapes(4096, generator)  # (4096, 1, 8, 8)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
    )
    alphas_cumprod = build_scheduler().alphas_cumprod  # (1000,)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (batch_size,), generator=generator)]  # (B, 1, 8, 8)
        t = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        loss = F.mse_loss(unet(a * x0 + (1 - a**2).sqrt() * noise, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr.step()
    return unet.eval().requires_grad_(False), data


def compare(name, model, config, data, budgets, shipped, args, cache: Path, fingerprint=None) -> dict:
    """Every candidate on every budget against UniPC; the JSON record of one model."""
    schedule = NoiseScheduleVP.from_config(config)
    x_T = torch.randn((args.num_samples, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    reference = reference_for(model, config, args.reference_rtol)(x_T, float(schedule.rho(schedule.t_max)))
    record = dict(model=name, reference_seconds=time.perf_counter() - start, budgets={}, rows=[])
    unipc = UniPCMultistepScheduler.from_config(keep_model_keys(config))
    record["rows"].append(
        dict(budget="-", sampler="diffusers UniPC (defaults)", mse=errors(unipc, model, x_T, reference, args.nfe))
    )
    folders = {"none": None} | ({"shipped 600x4096 (GPU)": shipped} if shipped is not None else {})
    for budget in budgets:
        label = f"{budget[0]}x{budget[1]}"
        folders[label] = cache / f"{name.split()[0]}_{label}"
        record["budgets"][label] = statistics_folder(model, data, config, budget, folders[label], fingerprint)
    candidates = {DEFAULTS: None} | (CANDIDATES if args.candidates else {})
    for label, folder in folders.items():
        for sampler, overrides in candidates.items():
            mse = errors(v3_scheduler(config, overrides, folder), model, x_T, reference, args.nfe)
            record["rows"].append(dict(budget=label, sampler=sampler, mse=mse))
    return record


def coarsened(shipped: Path, every: int, folder: Path) -> Path:
    """The shipped statistics at every ``every``-th grid point: a coarser grid with the same sampling noise."""
    tensors, meta = read_side_info(shipped, EMS_FILE)
    tensors = {k: v[::every].contiguous() for k, v in tensors.items()}
    save_side_info(folder, EMS_FILE, tensors, {**meta, "num_grid": len(tensors["lambdas"]) - 1})
    return folder


def grid_coarseness(model, config, shipped: Path, args, cache: Path) -> dict:
    """``v3 defaults`` on the shipped statistics thinned to coarser grids, NFE 5-20 (``MIN_CELLS_PER_STEP``'s basis).

    Each row also gives the fewest EMS cells any step of the grid spans (the number the warning checks).
    """
    schedule = NoiseScheduleVP.from_config(config)
    x_T = torch.randn((args.num_samples, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
    reference = reference_for(model, config, args.reference_rtol)(x_T, float(schedule.rho(schedule.t_max)))
    nfes, rows = (5, 8, 10, 15, 20), []
    for every in (1, 2, 4, 8, 12):
        scheduler = v3_scheduler(config, None, coarsened(shipped, every, cache / f"coarse_{every}"))
        cells, warned = [], []
        for nfe in nfes:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scheduler.set_timesteps(nfe)
            index = scheduler.ems.index_of(-torch.log(scheduler.sigmas[:-1].double()).numpy())
            cells.append(int((index[1:] - index[:-1]).min()))
            warned.append(any("too coarse" in str(w.message) for w in caught))
        mse = errors(scheduler, model, x_T, reference, nfes)
        rows.append(dict(num_grid=scheduler.ems.num_grid, nfe=list(nfes), mse=mse, min_cells=cells, warns=warned))
    return dict(rows=rows)


def table(record: dict, nfes) -> str:
    """Markdown: one row per (budget, sampler), MSE and its ratio to UniPC at each NFE."""
    base = record["rows"][0]["mse"]
    head = f"| statistics | sampler | {' | '.join(f'NFE {n}' for n in nfes)} |"
    lines = [head, "|---" * (len(nfes) + 2) + "|"]
    for row in record["rows"]:
        cells = [
            f"{m:.2e} ({m / b:.2f}x)" if row is not record["rows"][0] else f"{m:.2e}"
            for m, b in zip(row["mse"], base, strict=True)
        ]
        lines.append(f"| {row['budget']} | {row['sampler']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def coarseness_table(study: dict) -> str:
    """Markdown: MSE per grid size and NFE, with the fewest cells per step (and * where the warning fires)."""
    nfes = study["rows"][0]["nfe"]
    lines = [f"| EMS grid | {' | '.join(f'NFE {n}' for n in nfes)} |", "|---" * (len(nfes) + 1) + "|"]
    for row in study["rows"]:
        cells = [
            f"{m:.2e} ({c}{'*' if w else ''})"
            for m, c, w in zip(row["mse"], row["min_cells"], row["warns"], strict=True)
        ]
        lines.append(f"| {row['num_grid']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits", "digits-cond"], choices=["digits", "digits-cond"])
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10])
    parser.add_argument("--budgets", nargs="+", type=parse_budget, default=["50x64", "100x256", "400x64"])
    parser.add_argument("--num_samples", type=int, default=32, help="starting noises scored against the reference")
    parser.add_argument("--reference_rtol", type=float, default=1e-5, help="dopri5 tolerance of the reference")
    parser.add_argument("--toy_steps", type=int, default=2500, help="training steps of the second UNet (0: skip it)")
    parser.add_argument("--toy_budget", type=parse_budget, default="400x64", help="EMS budget of the second UNet")
    parser.add_argument("--no_coarsen", dest="coarsen", action="store_false", help="skip the thinned-grid study")
    parser.add_argument("--no_candidates", dest="candidates", action="store_false", help="only v3 defaults vs UniPC")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="folder keeping the computed statistics between runs")
    parser.add_argument("--out", default="docs/bench/v3_defaults.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.budgets = [parse_budget(b) if isinstance(b, str) else b for b in args.budgets]
    args.toy_budget = parse_budget(args.toy_budget) if isinstance(args.toy_budget, str) else args.toy_budget
    torch.set_num_threads(args.threads)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="v3_defaults_"))
    start = time.perf_counter()
    records = []
    for name in args.models:
        spec = load_model(name)
        shipped = spec.scheduler_dir if has_side_info(spec.scheduler_dir, EMS_FILE) else None
        record = compare(
            name,
            spec.model,
            spec.scheduler_config,
            ems_data(name),
            args.budgets,
            shipped,
            args,
            cache,
            spec.fingerprint,
        )
        records.append(record)
        print(f"\n### {name}\n\n{table(record, args.nfe)}", flush=True)
        if shipped is not None and args.coarsen:
            record["grid_coarseness"] = grid_coarseness(spec.model, spec.scheduler_config, shipped, args, cache)
            print(f"\n### {name}: v3 defaults on the shipped statistics thinned\n")
            print(coarseness_table(record["grid_coarseness"]), flush=True)
    if args.toy_steps:
        t0 = time.perf_counter()
        unet, data = train_toy_unet(args.toy_steps, args.seed)
        train_seconds = time.perf_counter() - t0
        record = compare(
            "shapes (second UNet)",
            plain_unet(unet),
            schedule_config(build_scheduler().config),
            data,
            [args.toy_budget],
            None,
            args,
            cache / f"toy{args.toy_steps}",
        )
        record["train_seconds"] = train_seconds
        records.append(record)
        print(
            f"\n### second UNet (shapes, {args.toy_steps} steps, {train_seconds:.0f} s)\n\n{table(record, args.nfe)}"
        )
    meta = dict(vars(args), budgets=[f"{g}x{k}" for g, k in args.budgets], seconds=time.perf_counter() - start)
    meta["toy_budget"] = "{}x{}".format(*args.toy_budget)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    print(f"\n{meta['seconds'] / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
