"""D3PO on the embedded digits-cond model: reward against the number of policy samples, beside Diffusion-DPO.

D3PO samples its own trajectories (K = 2 per prompt from one x_T, stochastic DDIM eta 1 with the demo's 2 steps and
no guidance, the sampler ``diffalign eval`` uses on digits-cond) and ranks them with the digits reward log p(prompted
digit), rewards at most ``d3po_tie_margin`` apart counting as ties; ``--flip_labels`` reverses every preference.
The run is trained in stages and resumed between them, so each budget of policy samples is one point of one run.
Diffusion-DPO is trained offline, one epoch, on pairs of the base model's samples (``digits_pairs``) with as many
images as D3PO drew. Every model is evaluated against the base model with the eval harness on held-out seeds (paired
bootstrap intervals); the script writes ``demo.md``, ``demo.json`` and ``reward_vs_samples.png``.

    python scripts/demo_d3po_digits.py --out demo_d3po
    python scripts/demo_d3po_digits.py --out demo_d3po --parts dpo     # retrain only Diffusion-DPO
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_pairs import EVAL_SEED_OFFSET, make_digits_pairs
from diffalign.alignment.trainer import train
from diffalign.evaluation.harness import EvalConfig, run_eval
from diffalign.models.digits import load_digits_pipeline

COMMON = dict(lora_rank=8, lora_target_modules="to_v,to_out.0,conv1,conv2", progress_bar=False, train_batch_size=16)
D3PO_CONFIG = dict(
    method="d3po", learning_rate=3e-5, d3po_num_steps=2, d3po_guidance_scale=1.0, d3po_tie_margin=1e-3, **COMMON
)
"""D3PO's options: the demo's sampler (DDIM 2 steps, no guidance) and a tie margin of 1e-3 in log p: two correct
digits both score log p ~ 0 and differ by float32 rounding (~1e-7), which must not decide a preference."""
DPO_CONFIG = dict(method="dpo", learning_rate=3e-5, beta=500.0, **COMMON)
"""Diffusion-DPO at D3PO's learning rate (at 1e-4 DPO is unstable on this saturated reward, see
docs/methods/smpo_rankdpo.md)."""
SAMPLES_PER_STEP = 2 * COMMON["train_batch_size"]  # D3PO: 16 prompts x K = 2 trajectories; DPO: 16 pairs


def evaluate(lora: Path, out: Path, num_seeds: int) -> dict:
    """``diffalign eval`` of a LoRA against digits-cond on held-out seeds: the digits reward's statistics."""
    config = EvalConfig(lora=str(lora), first_seed=EVAL_SEED_OFFSET, num_seeds=num_seeds, out=str(out))
    return run_eval(config)["rewards"]["digits"]


def run_demo(out: Path, stages: list[int], num_seeds: int, parts: set[str]) -> list[dict]:
    """D3PO (true and flipped preferences) trained through ``stages`` optimizer steps, DPO at the same budgets.

    ``parts`` (``d3po``, ``dpo``) says which to train; the rows of the others are kept from ``out/demo.json``.
    """
    saved = out / "demo.json"
    rows = json.loads(saved.read_text()) if saved.exists() else []
    rows = [row for row in rows if row["model"].split("_")[0] not in parts]
    for flip in (False, True) if "d3po" in parts else ():
        name = "d3po_flipped" if flip else "d3po"
        for steps in stages if not flip else stages[-1:]:
            config = TrainConfig(output_dir=str(out / name), max_train_steps=steps, flip_labels=flip, **D3PO_CONFIG)
            config.checkpointing_steps, config.resume_from_checkpoint = steps, "latest"
            start = time.perf_counter()
            train(config)
            stats = evaluate(out / name, out / f"eval_{name}_{steps}", num_seeds)
            rows.append(dict(model=name, steps=steps, samples=steps * SAMPLES_PER_STEP, stats=stats))
            rows[-1]["train_seconds"] = time.perf_counter() - start
            print(rows[-1]["model"], rows[-1]["samples"], stats["mean_difference"], flush=True)
    pipeline = load_digits_pipeline(True)
    for steps in stages if "dpo" in parts else ():
        samples = steps * SAMPLES_PER_STEP
        pairs = make_digits_pairs(out / f"pairs_{samples}", pipeline, samples_per_digit=samples // 10)
        config = TrainConfig(
            output_dir=str(out / f"dpo_{samples}"), dataset=str(pairs), max_train_steps=steps, **DPO_CONFIG
        )
        config.checkpointing_steps = 0
        start = time.perf_counter()
        train(config)
        stats = evaluate(out / f"dpo_{samples}", out / f"eval_dpo_{samples}", num_seeds)
        rows.append(dict(model="dpo", steps=steps, samples=samples, stats=stats))
        rows[-1]["train_seconds"] = time.perf_counter() - start
        print("dpo", samples, stats["mean_difference"], flush=True)
    order = {"d3po": 0, "d3po_flipped": 1, "dpo": 2}
    return sorted(rows, key=lambda row: (order[row["model"]], row["steps"]))


def interval(stats: dict, key: str) -> str:
    low, high = stats[f"{key}_ci"]
    return f"{stats[key]:.4f} [{low:.4f}, {high:.4f}]"


def markdown(rows: list[dict], num_seeds: int) -> str:
    lines = [
        f"Held-out seeds {EVAL_SEED_OFFSET}..{EVAL_SEED_OFFSET + num_seeds - 1} per digit ({10 * num_seeds} samples "
        "per model), DDIM 2 steps, no guidance, the same initial noise for every model; [95% bootstrap interval].",
        "",
        "| model | policy samples / images | optimizer steps | mean log p(digit) | tuned - base | win-rate vs base |",
        "|---|---|---|---|---|---|",
        f"| digits-cond (base) | 0 | 0 | {interval(rows[0]['stats']['base'], 'mean')} | - | - |",
    ]
    names = {"d3po": "D3PO", "d3po_flipped": "D3PO, flipped preferences", "dpo": "Diffusion-DPO (offline)"}
    for row in rows:
        stats = row["stats"]
        lines.append(
            f"| {names[row['model']]} | {row['samples']} | {row['steps']} | {interval(stats['tuned'], 'mean')} | "
            f"{interval(stats, 'mean_difference')} | {interval(stats, 'win_rate')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    for name, label in (
        ("d3po", "D3PO (online)"),
        ("dpo", "Diffusion-DPO (offline)"),
        ("d3po_flipped", "D3PO flipped"),
    ):
        points = [row for row in rows if row["model"] == name]
        samples = [0] + [row["samples"] for row in points]
        means = [0.0] + [row["stats"]["mean_difference"] for row in points]
        low = [0.0] + [row["stats"]["mean_difference_ci"][0] for row in points]
        high = [0.0] + [row["stats"]["mean_difference_ci"][1] for row in points]
        axis.errorbar(
            samples,
            means,
            yerr=[torch.tensor(means) - torch.tensor(low), torch.tensor(high) - torch.tensor(means)],
            marker="o",
            capsize=3,
            label=label,
        )
    axis.axhline(0, color="grey", linewidth=0.5)
    axis.set_xlabel("policy samples drawn (D3PO) / training images (DPO)")
    axis.set_ylabel("log p(digit): tuned - base")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_d3po", help="output folder (default: %(default)s)")
    parser.add_argument("--stages", default="25,50,100", help="optimizer steps at which to evaluate")
    parser.add_argument("--num-seeds", type=int, default=100, help="held-out seeds per digit (default: %(default)s)")
    parser.add_argument("--parts", default="d3po,dpo", help="what to train; other rows come from out/demo.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    parts = set(filter(None, args.parts.split(",")))
    rows = run_demo(out, [int(s) for s in args.stages.split(",")], args.num_seeds, parts)
    (out / "demo.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows, args.num_seeds)
    (out / "demo.md").write_text(table, encoding="utf-8")
    plot(rows, out / "reward_vs_samples.png")
    print("\n" + table)


if __name__ == "__main__":
    main()
