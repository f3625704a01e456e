"""``diffalign train --eval_steps N``: the numbers of ``diffalign eval`` logged while training.

Every N optimizer steps the main process samples the eval prompts x seeds with the policy being trained and with
the base model (the LoRA UNet with its adapters disabled, or the frozen copy of a full fine-tune), from the same
noise and sampler as ``diffalign eval``, scores both with the chosen rewards and logs
``eval/<reward>/<statistic>`` (tuned and base mean / median, tuned - base and win-rate, each with its bootstrap 95%
interval). The base scores are computed once, at the first evaluation.
"""

from __future__ import annotations

import torch

from ..evaluation.harness import eval_metrics, load_rewards, read_prompts, score_pipeline
from .step import adapters_disabled


class TrainingEvaluator:
    """Scores the policy against its base every ``config.eval_steps`` optimizer steps (main process only)."""

    def __init__(self, config, backbone, reference, device):
        self.config, self.backbone, self.reference = config, backbone, reference
        self.prompts, self.prompts_sha256 = read_prompts(config.eval_prompts, config.pretrained_model_name_or_path)
        self.seeds = list(range(config.eval_first_seed, config.eval_first_seed + config.eval_num_seeds))
        self.rewards = load_rewards(config.eval_rewards, device=device)
        self.base_scores: dict | None = None

    def _score(self, unet) -> dict:
        pipeline, trained = self.backbone.pipeline, self.backbone.pipeline.unet
        was_training = unet.training
        pipeline.unet = unet.eval()
        try:
            with torch.no_grad():
                return score_pipeline(
                    pipeline,
                    self.prompts,
                    self.seeds,
                    self.rewards,
                    sampler=self.config.eval_sampler,
                    nfe=self.config.eval_nfe,
                    guidance_scale=self.config.eval_guidance_scale,
                )
        finally:
            pipeline.unet = trained
            unet.train(was_training)

    def __call__(self, unet) -> dict[str, float]:
        """``unet``: the unwrapped policy UNet -> flat ``eval/...`` metrics of policy vs base."""
        if self.base_scores is None:
            if self.reference is None:  # LoRA: the base model is the UNet with its adapters disabled
                with adapters_disabled(unet) as base:
                    self.base_scores = self._score(base)
            else:
                self.base_scores = self._score(self.reference)
        tuned = self._score(unet)
        return eval_metrics(tuned, self.base_scores, group_size=1)
