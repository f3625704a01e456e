"""Per-segment evaluation of clip models (``digits-clips``): the base and a tuned model sampled from the same
initial noise on held-out seeds, each clip's per-segment reward ``clip_segment_rewards`` (B, S), and paired
bootstrap intervals per segment and for the whole clip (``bootstrap.compare_scores``).

The video counterpart of the image harness (``harness.run_eval``): a DenseDPO claim is about *where* the reward
moves, so every segment gets its own mean, difference and win-rate.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from ..models.clips import NUM_FRAMES, DigitsClipPipeline, clip_segment_rewards
from .bootstrap import compare_scores

CLIP_SAMPLING = dict(num_inference_steps=10, guidance_scale=2.0)
"""DDIM (eta 0) steps and guidance scale of the evaluation samples."""


@torch.no_grad()
def sample_segment_rewards(
    pipeline: DigitsClipPipeline, prompts: list[str], seeds: list[int], num_segments: int = 3
) -> torch.Tensor:
    """Rewards (P seeds, S) of one clip per (prompt, seed), prompt-major, each from ``torch.manual_seed(seed)``
    noise drawn per cell, so two pipelines given the same arguments start every clip from the same noise."""
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    shape = (1, pipeline.unet.config.in_channels, NUM_FRAMES, *[pipeline.unet.config.sample_size] * 2)
    cells = [(prompt, seed) for prompt in prompts for seed in seeds]
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for _, seed in cells])
    cell_prompts = [prompt for prompt, _ in cells]
    clips = pipeline(cell_prompts, latents=noise, output_type="latent", **CLIP_SAMPLING).frames  # (N, 1, F, 8, 8)
    return clip_segment_rewards(clips, cell_prompts, num_segments)  # (N, S)


def compare_segments(tuned: torch.Tensor, base: torch.Tensor, group_size: int = 1, seed: int = 0) -> dict:
    """Paired comparison of per-segment rewards (N, S) of two models: ``{"segment_<s>": compare_scores(...), ...,
    "clip": compare_scores of the mean over segments}``."""
    if tuned.shape != base.shape or tuned.ndim != 2:
        raise ValueError(
            f"expected two (N, S) reward tables of one shape, got {tuple(tuned.shape)}, {tuple(base.shape)}."
        )
    report = {
        f"segment_{s}": compare_scores(tuned[:, s], base[:, s], seed=seed, group_size=group_size)
        for s in range(tuned.shape[1])
    }
    report["clip"] = compare_scores(tuned.mean(dim=1), base.mean(dim=1), seed=seed, group_size=group_size)
    return report
