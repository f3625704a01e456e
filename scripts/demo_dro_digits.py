"""Diffusion-DRO on the embedded digits-cond model: reward against the number of policy samples drawn, beside
Diffusion-DPO trained offline on pairs of the same number of images.

DRO's experts are real digits (``load_digits_data("train")`` with their prompts, ``digits_experts.py``); each
micro-step the lagged copy draws one DPM-Solver++ sample per record, so after s steps of batch B the run has drawn
s B policy samples. The run is stopped and resumed at each budget (the resume continues the same run), and the
policy and its EMA are evaluated there. At each budget N, Diffusion-DPO trains for the same number of steps on the
N / 2 best-vs-worst pairs of N digits-cond samples ranked by the digits classifier (``digits_pairs.py``). Every
model is evaluated with the eval harness (``diffalign eval``: held-out seeds, the same initial noise for every model,
the digits reward log p(prompted digit), paired bootstrap intervals, win-rate) and a Markdown table is printed.

    python scripts/demo_dro_digits.py --out demo_dro
"""

from __future__ import annotations

import argparse
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
    learning_rate=1e-4,
    lora_rank=8,
    lora_target_modules="to_v,to_out.0,conv1,conv2",
    progress_bar=False,
)
"""Options of both methods (the LoRA and learning rate of the Diffusion-DPO demo, a batch of 16)."""
DPO_CONFIG = dict(beta=500.0, checkpointing_steps=0)
STAGES = (15, 30, 60, 120)
"""DRO steps at which both methods are compared (x 16 = policy samples drawn / images DPO trains on)."""


def evaluate(lora: Path, out: Path, num_seeds: int) -> dict:
    """``diffalign eval`` of a LoRA folder against digits-cond on held-out seeds."""
    report = run_eval(EvalConfig(lora=str(lora), first_seed=EVAL_SEED_OFFSET, num_seeds=num_seeds, out=str(out)))
    return report["rewards"]["digits"]


def run_dro(out: Path, num_seeds: int) -> list[dict]:
    """One DRO run stopped and resumed at each stage; the policy and its EMA evaluated there."""
    experts = make_digits_experts(out / "experts")
    rows, seconds = [], 0.0
    for steps in STAGES:
        config = TrainConfig(
            method="dro",
            dataset=str(experts),
            jsonl_name=EXPERTS_JSONL,
            output_dir=str(out / "dro"),
            max_train_steps=steps,
            checkpointing_steps=steps,
            resume_from_checkpoint="latest",
            **COMMON,
        )
        start = time.perf_counter()
        train(config)
        seconds += time.perf_counter() - start
        samples = steps * config.train_batch_size
        for name, folder in (("DRO policy", out / "dro"), ("DRO EMA", out / "dro" / "ema")):
            reward = evaluate(folder, out / f"eval_{name.split()[1].lower()}_{samples}", num_seeds)
            rows.append(dict(model=name, samples=samples, steps=steps, train_seconds=seconds, reward=reward))
    return rows


def run_dpo(out: Path, num_seeds: int) -> list[dict]:
    """Diffusion-DPO on pairs of N digits-cond samples, for each budget N, for the same number of steps."""
    pipeline, rows = load_digits_pipeline(conditional=True), []
    for steps in STAGES:
        samples = steps * COMMON["train_batch_size"]
        pairs = make_digits_pairs(out / f"pairs_{samples}", pipeline, samples_per_digit=samples // 10)
        config = TrainConfig(
            dataset=str(pairs), output_dir=str(out / f"dpo_{samples}"), max_train_steps=steps, **COMMON, **DPO_CONFIG
        )
        start = time.perf_counter()
        train(config)
        seconds = time.perf_counter() - start
        reward = evaluate(out / f"dpo_{samples}", out / f"eval_dpo_{samples}", num_seeds)
        row = dict(model="DPO (offline pairs)", samples=samples, steps=steps, train_seconds=seconds)
        rows.append(dict(row, reward=reward))
    return rows


def interval(stats: dict, key: str) -> str:
    low, high = stats[f"{key}_ci"]
    return f"{stats[key]:.3f} [{low:.3f}, {high:.3f}]"


def markdown(rows: list[dict], num_seeds: int) -> str:
    """One row per (model, budget): mean log p(digit) with its interval, the gain over the base model, win-rate."""
    base = rows[0]["reward"]["base"]
    lines = [
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
            f"| {row['model']} | {row['samples']} | {row['steps']} | {interval(reward['tuned'], 'mean')} | "
            f"{interval(reward, 'mean_difference')} | {interval(reward, 'win_rate')} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_dro", help="output folder (default: %(default)s)")
    parser.add_argument("--num-seeds", type=int, default=200, help="held-out seeds per digit (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = run_dro(out, args.num_seeds) + run_dpo(out, args.num_seeds)
    table = markdown(rows, args.num_seeds)
    (out / "demo.md").write_text(table, encoding="utf-8")
    print("\n" + table)


if __name__ == "__main__":
    main()
