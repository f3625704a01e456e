"""DenseDPO on the embedded digits-clips model against Diffusion-DPO on the same clip pairs at the same steps.

Pairs (``diffalign.alignment.dense_pairs.make_clip_pairs``): training clips corrupted to 60% of the DDIM path and
denoised twice, per-segment labels from the digits classifier's per-segment reward (ties <= 0.05 nats skipped).
DenseDPO trains on the labelled segments; Diffusion-DPO on the same pairs ordered by the whole-clip reward. Each
LoRA is evaluated against the base on held-out seeds (the same initial noise per cell) with the per-segment
reward, paired 95% bootstrap intervals (``diffalign.evaluation.clip_segments``), and Markdown tables are printed:
each run against the base, and DenseDPO against Diffusion-DPO cell by cell. ``densedpo_flipped`` is DenseDPO with
``--flip_labels`` (every segment label reversed), the control that the reward follows the labels.

    python scripts/demo_densedpo_clips.py --out demo_densedpo
    python scripts/demo_densedpo_clips.py --out demo_densedpo --runs densedpo_flipped   # add a run to the folder

A run whose folder already holds ``segment_rewards.safetensors`` is not retrained; its rewards are read back.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.dense_pairs import PAIRS_JSONL, make_clip_pairs
from diffalign.alignment.trainer import train
from diffalign.alignment.video import load_digits_clips
from diffalign.evaluation.clip_segments import compare_segments, sample_segment_rewards

EVAL_SEED_OFFSET = 10_000
NUM_SEGMENTS = 3
DEMO_CONFIG = dict(
    pretrained_model_name_or_path="digits-clips",
    train_batch_size=16,
    learning_rate=2e-4,
    lora_rank=8,
    lora_target_modules="to_v,to_out.0,resnets.0.conv1,resnets.0.conv2,resnets.1.conv1,resnets.1.conv2",
    checkpointing_steps=0,
    progress_bar=False,
)
BETA = 500.0
RUNS = {
    "densedpo": dict(method="densedpo", densedpo_beta=BETA),
    "dpo": dict(method="dpo", beta=BETA),
    "densedpo_flipped": dict(method="densedpo", densedpo_beta=BETA, flip_labels=True),
}


def label_summary(folder: Path) -> dict:
    """Share of pairs with a +1 / -1 / 0 label per segment, and of pairs with no labelled segment."""
    records = [json.loads(line) for line in (folder / PAIRS_JSONL).read_text().splitlines()]
    labels = torch.tensor([r["labels"] for r in records])  # (N, S)
    return {
        "pairs": len(records),
        "labelled_per_segment": (labels != 0).float().mean(0).tolist(),
        "all_tied": (labels == 0).all(1).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_densedpo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--num_pairs", type=int, default=512)
    parser.add_argument("--num_seeds", type=int, default=20)
    parser.add_argument("--runs", default=",".join(RUNS), help="runs to train and evaluate: " + ", ".join(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    data = out / "clip_pairs"
    start = time.time()
    if not (data / PAIRS_JSONL).is_file():
        make_clip_pairs(data, load_digits_clips("digits-clips"), num_pairs=args.num_pairs, num_segments=NUM_SEGMENTS)
    print(f"pairs: {time.time() - start:.0f} s; labels: {label_summary(data)}")
    prompts = [f"a handwritten {d}" for d in range(10)]
    seeds = list(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + args.num_seeds))
    base = sample_segment_rewards(load_digits_clips("digits-clips"), prompts, seeds, NUM_SEGMENTS)  # (N, S)
    rewards, seconds, reports = {}, {}, {}
    for name in args.runs.split(","):
        run = out / name
        saved = run / "segment_rewards.safetensors"
        if not saved.is_file():
            start = time.time()
            config = TrainConfig(
                **DEMO_CONFIG, **RUNS[name], dataset=str(data), output_dir=str(run), max_train_steps=args.steps
            )
            train(config)
            train_seconds = time.time() - start
            pipeline = load_digits_clips("digits-clips")
            pipeline.unet.load_lora_adapter(str(run), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
            tuned = sample_segment_rewards(pipeline, prompts, seeds, NUM_SEGMENTS)  # (N, S)
            save_file({"rewards": tuned}, saved, metadata={"train_seconds": f"{train_seconds:.0f}"})
        rewards[name] = load_file(saved)["rewards"]
        seconds[name] = read_metadata(saved)["train_seconds"]
        reports[name] = compare_segments(rewards[name], base, group_size=len(seeds))
        (run / "segment_eval.json").write_text(json.dumps(reports[name], indent=2))
    print(
        f"\n{len(prompts)} prompts x {len(seeds)} held-out seeds (from {EVAL_SEED_OFFSET}), DDIM 10 steps, guidance 2;"
        " reward = mean log p(prompted digit) over a segment's frames; [95% cluster-bootstrap interval over prompts]"
    )
    print(table(reports, seconds))
    if {"densedpo", "dpo"} <= rewards.keys():
        print("\nDenseDPO against Diffusion-DPO, paired on the same cells:")
        print(table({"densedpo - dpo": compare_segments(rewards["densedpo"], rewards["dpo"], len(seeds))}, {}))


def read_metadata(path: Path) -> dict:
    """The string metadata of a safetensors file."""
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def table(reports: dict, seconds: dict) -> str:
    """Markdown rows: per run, each segment's and the clip's reward, (difference [95% interval])."""
    keys = [f"segment_{s}" for s in range(NUM_SEGMENTS)] + ["clip"]
    lines = ["| model | train s | " + " | ".join(f"{k} (diff)" for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, report in reports.items():
        cells = [
            f"{report[k]['tuned']['mean']:.4f} ({report[k]['mean_difference']:+.4f} "
            f"[{report[k]['mean_difference_ci'][0]:+.4f}, {report[k]['mean_difference_ci'][1]:+.4f}])"
            for k in keys
        ]
        lines.append(f"| {name} | {seconds.get(name, '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
