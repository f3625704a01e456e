"""Paired comparison of two models' per-sample scores: means, medians and win-rate with bootstrap intervals.

Percentile bootstrap (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13): draw the N scored
samples (prompt x seed cells) with replacement ``resamples`` times, compute the statistic on every draw, and report
the 2.5% and 97.5% quantiles of those values as the 95% interval. Tuned and base scores are resampled with the same
indices, because both models are sampled from the same initial noise: a cell's two scores form one pair.
With ``group_size`` k > 1 the cells come in consecutive groups of k (a prompt's seeds) and whole groups are drawn
(cluster bootstrap, Davison & Hinkley 1997, Sec. 3.8): the interval then also covers the spread between prompts, as
for a claim about new prompts.

Win-rate of tuned over base: the share of cells where the tuned score is higher, ties counting half,
``mean(1[t > b] + 0.5 * 1[t == b])``.
"""

from __future__ import annotations

import torch

CONFIDENCE = 0.95


def win_rate(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Share of pairs the tuned score wins, ties counting half, over the last dim: (..., N) -> (...)."""
    return (tuned > base).double().mean(-1) + 0.5 * (tuned == base).double().mean(-1)


def bootstrap_indices(num_samples: int, resamples: int, seed: int, group_size: int = 1) -> torch.Tensor:
    """(resamples, num_samples) int64 indices: ``num_samples / group_size`` groups of consecutive samples drawn
    with replacement by a generator seeded with ``seed`` (``group_size`` 1: single samples)."""
    if num_samples < 1 or resamples < 1:
        raise ValueError(f"need at least one sample and one resample, got {num_samples} and {resamples}.")
    if group_size < 1 or num_samples % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {num_samples} samples into equal groups.")
    generator = torch.Generator().manual_seed(seed)
    groups = torch.randint(num_samples // group_size, (resamples, num_samples // group_size), generator=generator)
    return (groups[:, :, None] * group_size + torch.arange(group_size)).flatten(1)  # (R, N)


def percentile_interval(values: torch.Tensor, confidence: float = CONFIDENCE) -> list[float]:
    """[lower, upper] percentile interval of the bootstrap replicates ``values`` (R,)."""
    tail = (1.0 - confidence) / 2.0
    quantiles = torch.quantile(values.double(), torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return [quantiles[0].item(), quantiles[1].item()]


def summarize(scores: torch.Tensor, indices: torch.Tensor) -> dict:
    """Mean and median of ``scores`` (N,) with their percentile intervals over the bootstrap ``indices`` (R, N)."""
    scores = scores.double()
    draws = scores[indices]  # (R, N)
    return {
        "mean": scores.mean().item(),
        "mean_ci": percentile_interval(draws.mean(dim=1)),
        "median": scores.median().item(),
        "median_ci": percentile_interval(draws.median(dim=1).values),
    }


def compare_scores(
    tuned: torch.Tensor, base: torch.Tensor, resamples: int = 1000, seed: int = 0, group_size: int = 1
) -> dict:
    """Tuned vs base per-sample scores (N,) from the same noise: statistics with paired 95% bootstrap intervals.

    Returns ``{"tuned": {mean, mean_ci, median, median_ci}, "base": {...}, "mean_difference", "mean_difference_ci",
    "win_rate", "win_rate_ci", "num_samples"}``; every interval is ``[lower, upper]`` from the same ``resamples``
    draws of a generator seeded with ``seed``, so a rerun gives identical numbers; ``group_size`` > 1 draws groups of
    consecutive samples (``bootstrap_indices``).
    """
    tuned, base = tuned.detach().double().cpu().flatten(), base.detach().double().cpu().flatten()
    if tuned.shape != base.shape:
        raise ValueError(
            f"tuned and base need one score per sample each, got {tuple(tuned.shape)} and "
            f"{tuple(base.shape)}; sample both models on the same prompts and seeds."
        )
    if not (torch.isfinite(tuned).all() and torch.isfinite(base).all()):
        raise ValueError("scores contain NaN or inf; check the reward model and the sampled images.")
    indices = bootstrap_indices(len(tuned), resamples, seed, group_size)  # (R, N)
    difference = tuned - base  # (N,)
    return {
        "tuned": summarize(tuned, indices),
        "base": summarize(base, indices),
        "mean_difference": difference.mean().item(),
        "mean_difference_ci": percentile_interval(difference[indices].mean(dim=1)),
        "win_rate": win_rate(tuned, base).item(),
        "win_rate_ci": percentile_interval(win_rate(tuned[indices], base[indices])),
        "num_samples": len(tuned),
    }
