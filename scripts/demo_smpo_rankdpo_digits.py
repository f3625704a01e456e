"""SmPO and RankDPO against Diffusion-DPO on the embedded digits-cond model, on the same scored candidates.

Data: ``diffalign pairs`` samples K = 4 candidates for each of ``--prompts_per_digit`` copies of the ten digit prompts
(DDIM 2 steps, no guidance) and scores them with the digits reward log p(prompted digit). From those candidates:
RankDPO trains on all 4 with their scores (once more with a tie margin of 1e-3 in log p, so that candidates whose
scores differ by float rounding tie); Diffusion-DPO and SmPO on the same best-vs-worst pair of each prompt, SmPO
with both scores (its smoothed preference p weights each pair by 2p - 1): with the official ReNoise inversion on a
2-point grid (499, 999: as coarse as the demo's 2-step sampler), on the official 5-point grid, and with
Diffusion-DPO's forward noise. Each method is
trained with the true preferences and flipped ones (``--flip_labels``), the same LoRA, learning rate, batch and
number of steps, then evaluated with the eval harness (``diffalign eval``) against the base model on held-out seeds
(paired bootstrap intervals, win-rate). Each method is also compared cell by cell with the DPO LoRA of the same label
direction on the same seeds.

    python scripts/demo_smpo_rankdpo_digits.py --out demo_smpo_rankdpo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffalign.alignment.candidate_pairs import split_candidates
from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_pairs import EVAL_SEED_OFFSET
from diffalign.alignment.pairs import PairsConfig, make_pairs
from diffalign.alignment.trainer import train
from diffalign.evaluation.bootstrap import compare_scores
from diffalign.evaluation.harness import DIGITS_PROMPTS, EvalConfig, run_eval

DEMO_CONFIG = dict(
    max_train_steps=100,
    train_batch_size=16,
    learning_rate=3e-5,
    lora_rank=8,
    lora_target_modules="to_v,to_out.0,conv1,conv2",
    checkpointing_steps=0,
    progress_bar=False,
)
"""Training options shared by every method of the demo."""
METHOD_CONFIG = {
    "DPO": dict(method="dpo", beta=500.0),
    # beta x 10 x (2p - 1): 500 at p = 1; the inversion grid of the sampler's 2 steps
    "SmPO": dict(method="smpo", smpo_beta=50.0, smpo_score_range="digits", smpo_inversion_steps=2),
    "SmPO, 5 grid points": dict(method="smpo", smpo_beta=50.0, smpo_score_range="digits"),  # the SD 1.5 grid
    "SmPO, forward noise": dict(method="smpo", smpo_beta=50.0, smpo_score_range="digits", smpo_noise="forward"),
    "RankDPO": dict(method="rankdpo", rankdpo_beta=500.0),
    "RankDPO, tie margin": dict(method="rankdpo", rankdpo_beta=500.0, rankdpo_tie_margin=1e-3),
}
"""Each method's options: the same beta of a certain pair (500, the Diffusion-DPO demo's)."""
RUN_NAMES = {
    "DPO": "dpo",
    "SmPO": "smpo",
    "SmPO, 5 grid points": "smpo_grid5",
    "SmPO, forward noise": "smpo_forward",
    "RankDPO": "rankdpo",
    "RankDPO, tie margin": "rankdpo_margin",
}
"""Output folder of each method's run (``_flipped`` appended for flipped preferences)."""


def make_data(out: Path, prompts_per_digit: int) -> dict[str, Path]:
    """K = 4 scored candidates per prompt (``diffalign pairs``), and their best-vs-worst pairs for DPO and SmPO."""
    prompts = out / "prompts.txt"
    prompts.write_text("".join(f"{p}\n" for p in DIGITS_PROMPTS * prompts_per_digit), encoding="utf-8")
    print(f"diffalign pairs --prompts {prompts} --num_candidates 4 --reward digits --out {out / 'candidates'}")
    candidates = make_pairs(PairsConfig(prompts=str(prompts), num_candidates=4, out=str(out / "candidates")), False)
    best_worst = split_candidates(candidates, out / "best_worst", mode="best_worst")
    return {
        "RankDPO": candidates,
        "RankDPO, tie margin": candidates,
        "SmPO": best_worst,
        "SmPO, 5 grid points": best_worst,
        "SmPO, forward noise": best_worst,
        "DPO": best_worst,
    }


def evaluate(lora: Path, out: Path, num_seeds: int) -> dict:
    """``diffalign eval --lora`` against digits-cond on held-out seeds: the harness report's digits rewards."""
    report = run_eval(EvalConfig(lora=str(lora), first_seed=EVAL_SEED_OFFSET, num_seeds=num_seeds, out=str(out)))
    return {"log_p": report["rewards"]["digits"], "scores": report["scores"]["digits"]}


def run_demo(out: Path, num_seeds: int, prompts_per_digit: int, **overrides) -> list[dict]:
    torch.set_num_threads(1)
    data = make_data(out, prompts_per_digit)
    rows = []
    for flip in (False, True):
        for name, options in METHOD_CONFIG.items():
            run = f"{RUN_NAMES[name]}{'_flipped' if flip else ''}"
            config = TrainConfig(
                output_dir=str(out / run),
                dataset=str(data[name]),
                flip_labels=flip,
                **(DEMO_CONFIG | options | overrides),
            )
            start = time.perf_counter()
            train(config)
            seconds = time.perf_counter() - start
            print(f"diffalign eval --lora {out / run} --first_seed {EVAL_SEED_OFFSET} --num_seeds {num_seeds}")
            result = evaluate(out / run, out / f"eval_{run}", num_seeds)
            rows.append(dict(model=f"{name}, flipped" if flip else name, train_seconds=seconds, **result))
    dpo = {flip: next(r for r in rows if r["model"] == ("DPO, flipped" if flip else "DPO")) for flip in (False, True)}
    for row in rows:
        reference = dpo["flipped" in row["model"]]
        tuned, other = (torch.tensor(r["scores"]["tuned"]) for r in (row, reference))
        row["vs_dpo"] = compare_scores(tuned, other)
    return rows


def interval(stats: dict, key: str) -> str:
    low, high = stats[f"{key}_ci"]
    return f"{stats[key]:.3f} [{low:.3f}, {high:.3f}]"


def markdown(rows: list[dict], num_seeds: int) -> str:
    """Base row, then per model: mean log p, difference and win-rate vs base, difference and win-rate vs DPO."""
    lines = [
        f"Held-out seeds {EVAL_SEED_OFFSET}..{EVAL_SEED_OFFSET + num_seeds - 1} per digit ({10 * num_seeds} cells "
        "per model), DDIM 2 steps, no guidance, the same initial noise for every model; reward log p(prompted "
        "digit); [95% paired bootstrap interval]. 'vs DPO': against the DPO LoRA of the same label direction.",
        "",
        "| model | mean log p(digit) | tuned - base | win-rate vs base | tuned - DPO | win-rate vs DPO | train (s) |",
        "|---|---|---|---|---|---|---|",
        f"| digits-cond (base) | {interval(rows[0]['log_p']['base'], 'mean')} | - | - | - | - | - |",
    ]
    for row in rows:
        log_p, vs_dpo = row["log_p"], row["vs_dpo"]
        versus = "-" if row["model"].startswith("DPO") else None
        lines.append(
            f"| {row['model']} | {interval(log_p['tuned'], 'mean')} | {interval(log_p, 'mean_difference')} | "
            f"{interval(log_p, 'win_rate')} | {versus or interval(vs_dpo, 'mean_difference')} | "
            f"{versus or interval(vs_dpo, 'win_rate')} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_smpo_rankdpo", help="output folder (default: %(default)s)")
    parser.add_argument("--num_seeds", type=int, default=300, help="held-out seeds per digit (default: %(default)s)")
    parser.add_argument(
        "--prompts_per_digit", type=int, default=32, help="prompt copies per digit, K = 4 each (default: %(default)s)"
    )
    for name in ("max_train_steps", "train_batch_size", "learning_rate"):
        parser.add_argument(f"--{name}", type=type(DEMO_CONFIG[name]), default=DEMO_CONFIG[name])
    args = parser.parse_args()
    overrides = {name: getattr(args, name) for name in ("max_train_steps", "train_batch_size", "learning_rate")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_demo(out, args.num_seeds, args.prompts_per_digit, **overrides)
    table = markdown(rows, args.num_seeds)
    (out / "demo.md").write_text(table, encoding="utf-8")
    summary = [{k: v for k, v in row.items() if k != "scores"} for row in rows]
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print("\n" + table)


if __name__ == "__main__":
    main()
