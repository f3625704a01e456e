"""The rollout hook of online methods (D3PO, Diffusion-DRO): sample the policy before the loss.

Contract. A method with ``online = True`` implements ``rollout(request: RolloutRequest) -> Rollout``. The trainer
calls it once per micro-batch, before the noise provider and the loss, without gradient, with the current policy.
The method samples K candidates per prompt with a sampler of its choice (DDIM with eta > 0 or DDPM, so that each
transition has a density), stores every step's latent and the log-probability of each transition under the policy
that sampled it, and scores the final samples with ``request.reward`` (a ``RewardModel.score(images, prompts)``
callable from ``evaluation/rewards``; None until the run names a reward). The trainer then:

- uses ``rollout.latents[:, :, -1]`` (the K final samples, (B, K, c, h, w)) as the batch's candidates,
- puts ``rollout.rewards`` into ``batch["scores"]`` (higher = better, as data scores),
- draws the method's noise, computes the denoising errors and hands the rollout to the loss in
  ``MethodInputs.rollout``; a loss that needs the policy's log-probabilities *with* gradient recomputes them from
  the stored latents with ``MethodInputs.policy``.

Shapes, with T sampler steps: ``latents`` (B, K, T + 1, c, h, w) from x_T (noise) to x_0; ``timesteps`` (B, K, T)
the timestep of each transition x_t -> x_{t-1}; ``log_probs`` (B, K, T) float32; ``rewards`` (B, K) float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """What an online method's ``rollout`` returns (shapes in the module docstring)."""

    latents: torch.Tensor  # (B, K, T + 1, c, h, w) x_T ... x_0
    timesteps: torch.Tensor  # (B, K, T)
    log_probs: torch.Tensor  # (B, K, T) log p_theta(x_{t-1} | x_t)
    rewards: torch.Tensor  # (B, K)

    def __post_init__(self):
        size, num_candidates, num_latents = self.latents.shape[:3]
        expected = {"timesteps": (size, num_candidates, num_latents - 1), "log_probs": None, "rewards": None}
        expected["log_probs"], expected["rewards"] = expected["timesteps"], (size, num_candidates)
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"Rollout.{name} has shape {tuple(getattr(self, name).shape)}; with latents of shape "
                    f"{tuple(self.latents.shape)} (B, K, T + 1, ...) it must be {shape}."
                )


@dataclass
class RolloutRequest:
    """What the trainer hands ``rollout``: the micro-batch, the policy, the schedule, seeds and the reward.

    ``unet(x (N, c, h, w), t (N,)) -> model output`` is the policy (no gradient) with the conditioning of the
    N = K B candidates bound in, candidate-major (all candidates 0, then all candidates 1, ...).
    ``decode(latents (N, c, h, w)) -> images (N, C, H, W) in [0, 1]`` turns samples into what a reward scores.
    """

    batch: dict  # the preference batch (prompts, index, ...)
    latent_shape: tuple[int, ...]  # (B, K, c, h, w) of the candidates to sample
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scheduler: object  # the training DDPMScheduler; a method builds its sampler from its config
    decode: Callable[[torch.Tensor], torch.Tensor]
    epoch: int
    seed: int  # with ``epoch`` and ``batch["index"]``: seed the rollout per record (noise.record_generator)
    reward: Callable[[object, list[str]], torch.Tensor] | None = None
