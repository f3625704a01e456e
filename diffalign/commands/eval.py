"""``diffalign eval``: a tuned model against its base, same prompts, seeds and sampler, scored by reward models."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.harness import EvalConfig, run_eval

NAME = "eval"
HELP = "compare a tuned model (LoRA or full weights) with its base: rewards with bootstrap intervals, win-rate"
DESCRIPTION = (
    "Sample every prompt of a prompt file with every seed, once with the tuned model (the pipeline plus --lora, or "
    "the fine-tuned pipeline --weights) and once with the base pipeline, from the same initial noise, sampler, NFE "
    "and guidance; score both with each reward model; report per reward the mean and median of both models and the "
    "win-rate of tuned over base (ties count half), each with a 95% percentile-bootstrap interval over the prompt x "
    "seed cells (or over prompts: --bootstrap_unit prompt). Writes eval.json (settings, prompt-file sha256, reward "
    "versions, per-sample scores), eval.md and grid.png into --out. Default: the embedded digits-cond model with its "
    "ten digit prompts and the digits classifier reward (no download, seconds on a CPU)."
)
CONFIG = EvalConfig


def run(config: EvalConfig) -> int:
    """Run the evaluation, print the Markdown table and the written files; exit code 0."""
    report = run_eval(config)
    print(Path(report["files"]["markdown"]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(report["files"].values()))
    return 0
