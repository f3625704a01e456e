"""Diffusion-DRO on the embedded digits-cond model: reward against the number of policy samples drawn, beside
Diffusion-DPO trained offline on pairs of the same number of images, and a reversed control.

DRO's experts are real digits (``load_digits_data("train")`` with their prompts, ``digits_experts.py``); each
micro-step the lagged copy draws one DPM-Solver++ sample per record, so after s steps of batch B the run has drawn
s B policy samples. The run is stopped and resumed at each budget (the resume continues the same run) and the policy
is evaluated there (the EMA at the last budget). DRO runs with the official defaults (``DROOptions``: online latent
before the drawn step, per-sample perturbed grids, 20% prompt dropping) unless ``--dro-options`` overrides some
(any ``TrainConfig`` field of the DRO runs, e.g. ``{"seed": 1}``). The reversed control trains with
``--dro_swap_roles`` (the online samples take the experts' place in the hinge and the expert images the online
side). At each budget N, Diffusion-DPO trains for the same number of steps at the same
learning rate on the N / 2 best-vs-worst pairs of N digits-cond samples ranked by the digits classifier
(``digits_pairs.py``). Every model is evaluated with the eval harness (``diffalign eval``: held-out seeds, the same
initial noise for every model, the digits reward log p(prompted digit), paired bootstrap intervals, win-rate).

Each part writes ``rows_<part>.json``, so the parts can run as separate processes (``--parts``); every call writes
``demo.md`` and ``reward_vs_samples.png`` from the rows found in ``--out``.

    python scripts/demo_dro_digits.py --out demo_dro
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_experts import EXPERTS_JSONL, make_digits_experts
from diffalign.alignment.digits_pairs import EVAL_SEED_OFFSET, make_digits_pairs
from diffalign.alignment.trainer import train
from diffalign.evaluation.harness import EvalConfig, run_eval
from diffalign.models.digits import load_digits_pipeline

COMMON = dict(
    train_batch_size=16,
    lora_rank=8,
    lora_target_modules="to_v,to_out.0,conv1,conv2",
    progress_bar=False,
)
"""Options of both methods: the LoRA of the Diffusion-DPO demo and a batch of 16 (learning rate: --learning-rate)."""
DPO_CONFIG = dict(beta=500.0, checkpointing_steps=0)
PARTS = ("dro", "dro_reversed", "dpo")
NAMES = {"dro": "DRO", "dro_reversed": "DRO reversed (--dro_swap_roles)", "dpo": "DPO (offline pairs)"}
NAMES |= {f"{part}_ema": f"{NAMES[part]}, EMA" for part in ("dro", "dro_reversed")}


def evaluate(lora: Path, out: Path, num_seeds: int) -> dict:
    """``diffalign eval`` of a LoRA folder against digits-cond on held-out seeds."""
    report = run_eval(EvalConfig(lora=str(lora), first_seed=EVAL_SEED_OFFSET, num_seeds=num_seeds, out=str(out)))
    return report["rewards"]["digits"]


def run_dro(out: Path, part: str, stages: list[int], num_seeds: int, common: dict, dro_options: dict) -> list[dict]:
    """One DRO run stopped and resumed at each stage; the policy evaluated there, the EMA at the last stage."""
    experts = make_digits_experts(out / "experts")
    rows, seconds = [], 0.0
    for steps in stages:
        config = TrainConfig(
            method="dro",
            dataset=str(experts),
            jsonl_name=EXPERTS_JSONL,
            output_dir=str(out / part),
            max_train_steps=steps,
            checkpointing_steps=steps,
            resume_from_checkpoint="latest",
            dro_swap_roles=part == "dro_reversed",
            **dro_options,
            **common,
        )
        start = time.perf_counter()
        train(config)
        seconds += time.perf_counter() - start
        samples = steps * config.train_batch_size
        folders = [(part, out / part)] + [(f"{part}_ema", out / part / "ema")] * (steps == stages[-1])
        for model, folder in folders:
            reward = evaluate(folder, out / f"eval_{model}_{samples}", num_seeds)
            row = dict(model=model, samples=samples, steps=steps, train_seconds=seconds, reward=reward)
            rows.append(row | dict(learning_rate=config.learning_rate, dro_options=dro_options))
            print(model, samples, reward["mean_difference"], flush=True)
    return rows


def run_dpo(out: Path, stages: list[int], num_seeds: int, common: dict) -> list[dict]:
    """Diffusion-DPO on pairs of N digits-cond samples, for each budget N, for the same number of steps."""
    pipeline, rows = load_digits_pipeline(conditional=True), []
    for steps in stages:
        samples = steps * COMMON["train_batch_size"]
        pairs = make_digits_pairs(out / f"pairs_{samples}", pipeline, samples_per_digit=samples // 10)
        config = TrainConfig(
            dataset=str(pairs), output_dir=str(out / f"dpo_{samples}"), max_train_steps=steps, **common, **DPO_CONFIG
        )
        start = time.perf_counter()
        train(config)
        seconds = time.perf_counter() - start
        reward = evaluate(out / f"dpo_{samples}", out / f"eval_dpo_{samples}", num_seeds)
        row = dict(model="dpo", samples=samples, steps=steps, train_seconds=seconds, reward=reward)
        rows.append(row | dict(learning_rate=config.learning_rate))
        print("dpo", samples, reward["mean_difference"], flush=True)
    return rows


def interval(stats: dict, key: str) -> str:
    low, high = stats[f"{key}_ci"]
    return f"{stats[key]:.3f} [{low:.3f}, {high:.3f}]"


def setting(rows: list[dict]) -> str:
    """The learning rates and DRO options the rows were trained with, in one line."""
    rates = sorted({row["learning_rate"] for row in rows})
    options = sorted({json.dumps(row["dro_options"]) for row in rows if "dro_options" in row})
    official = [option if option != "{}" else "the official defaults" for option in options]
    return f"lr {', '.join(f'{rate:g}' for rate in rates)}; DRO options: {', '.join(official) or '-'}"


def markdown(rows: list[dict], num_seeds: int) -> str:
    """One row per (model, budget): mean log p(digit) with its interval, the gain over the base model, win-rate."""
    base = rows[0]["reward"]["base"]
    lines = [
        f"Setting: {setting(rows)}.",
        "",
        f"Held-out seeds {EVAL_SEED_OFFSET}..{EVAL_SEED_OFFSET + num_seeds - 1} per digit ({10 * num_seeds} samples "
        "per model), DDIM 2 steps, no guidance, the same initial noise for every model; [95% bootstrap interval]. "
        f"Base digits-cond: mean log p(digit) {interval(base, 'mean')}.",
        "",
        "| model | policy samples / images | steps | mean log p(digit) | tuned - base | win-rate vs base | "
        "train time (s, cumulative for DRO) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["samples"], r["model"])):
        reward = row["reward"]
        lines.append(
            f"| {NAMES[row['model']]} | {row['samples']} | {row['steps']} | {interval(reward['tuned'], 'mean')} | "
            f"{interval(reward, 'mean_difference')} | {interval(reward, 'win_rate')} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Left: tuned - base log p(digit); right: win-rate vs base; both with their 95% intervals, against policy samples
    (DRO) / training images (DPO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    curves = (
        ("dpo", "Diffusion-DPO (offline)"),
        ("dro", "Diffusion-DRO (online)"),
        ("dro_reversed", "Diffusion-DRO reversed (--dro_swap_roles)"),
    )
    for (key, start, label), axis in zip(
        (("mean_difference", 0.0, "log p(digit): tuned - base"), ("win_rate", None, "win-rate vs base")),
        axes,
        strict=True,
    ):
        for model, name in curves:
            points = sorted((row for row in rows if row["model"] == model), key=lambda row: row["samples"])
            first = [] if start is None else [start]
            samples = torch.tensor(([0] if first else []) + [row["samples"] for row in points])
            value = torch.tensor(first + [row["reward"][key] for row in points])
            low = torch.tensor(first + [row["reward"][f"{key}_ci"][0] for row in points])
            high = torch.tensor(first + [row["reward"][f"{key}_ci"][1] for row in points])
            axis.errorbar(samples, value, yerr=[value - low, high - value], marker="o", capsize=3, label=name)
        axis.axhline(0.0 if start is not None else 0.5, color="grey", linewidth=0.5)
        axis.set_xlabel("policy samples drawn (DRO) / training images (DPO)")
        axis.set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_dro", help="output folder (default: %(default)s)")
    parser.add_argument("--stages", default="30,60,120,240", help="steps at which to evaluate (x 16 = samples)")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="parts to run now; empty: only redraw from the saved rows (default: %(default)s)",
    )
    parser.add_argument("--num-seeds", type=int, default=100, help="held-out seeds per digit (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=3e-5, help="of both methods (default: %(default)s)")
    parser.add_argument(
        "--dro-options",
        default="{}",
        help="JSON of training options of the DRO runs over the defaults, e.g. '{\"dro_perturb_timesteps\": false}'",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [int(s) for s in args.stages.split(",")]
    common, dro_options = COMMON | {"learning_rate": args.learning_rate}, json.loads(args.dro_options)
    for part in filter(None, args.parts.split(",")):
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}.")
        if part == "dpo":
            rows = run_dpo(out, stages, args.num_seeds, common)
        else:
            rows = run_dro(out, part, stages, args.num_seeds, common, dro_options)
        (out / f"rows_{part}.json").write_text(json.dumps(rows, indent=2))
    rows = [
        row
        for part in PARTS
        if (out / f"rows_{part}.json").is_file()
        for row in json.loads((out / f"rows_{part}.json").read_text())
    ]
    table = markdown(rows, args.num_seeds)
    (out / "demo.md").write_text(table, encoding="utf-8")
    plot(rows, out / "reward_vs_samples.png")
    print("\n" + table)


if __name__ == "__main__":
    main()
