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

import numpy as np
import torch
from diffusers import DDIMScheduler

from ..options import option
from .logprob import ddim_sample_with_logprob


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
    ``unconditional`` is the same policy with the empty prompt's conditioning bound in (the unconditional branch of
    classifier-free guidance); None for a model without text conditioning.
    """

    batch: dict  # the preference batch (prompts, index, ...)
    latent_shape: tuple[int, ...]  # (B, K, c, h, w) of the candidates to sample
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scheduler: object  # the training DDPMScheduler; a method builds its sampler from its config
    decode: Callable[[torch.Tensor], torch.Tensor]
    epoch: int
    seed: int  # with ``epoch`` and ``batch["index"]``: seed the rollout per record (noise.record_generator)
    reward: Callable[[object, list[str]], torch.Tensor] | None = None
    unconditional: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    device: torch.device | str = "cpu"  # where the policy runs


@dataclass
class RolloutOptions:
    """Options every online method shares (``TrainConfig`` inherits them)."""

    rollout_buffer_size: int = option(
        64,
        "replay buffer of each process: keep the trajectories of at most N prompts (oldest out); checkpoints hold it",
        "rollouts (online methods)",
    )

    def __post_init__(self):
        if self.rollout_buffer_size < 1:
            raise ValueError(f"rollout_buffer_size must be >= 1, got {self.rollout_buffer_size}.")


def guided(
    conditional: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    unconditional: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    guidance_scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + w (out_c - out_u), or ``conditional`` for w = 1."""
    if guidance_scale == 1.0:
        return conditional
    if unconditional is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs the unconditional policy; use guidance_scale 1.")

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output_uncond = unconditional(x, t)
        return output_uncond + guidance_scale * (conditional(x, t) - output_uncond)

    return call


def trajectory_generator(seed: int, epoch: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch, dataset index, stream): stream 0 draws a prompt's x_T, stream 1 + k
    the step noise of its trajectory k. Independent of the process count and of a resume (like
    ``noise.record_generator``, whose draws it does not share)."""
    state = np.random.SeedSequence([seed, epoch, index, stream, 0x0D3]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) >> 1)


def sampling_scheduler(training_scheduler, num_steps: int) -> DDIMScheduler:
    """The DDIM sampler of rollouts from the training schedule, with ``set_alpha_to_one=False`` so that every step
    keeps noise and has a density (as Stable Diffusion's own scheduler config)."""
    scheduler = DDIMScheduler.from_config(training_scheduler.config, set_alpha_to_one=False)
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def sample_rollout(
    request: RolloutRequest, num_steps: int = 20, eta: float = 1.0, guidance_scale: float = 5.0
) -> Rollout:
    """K stochastic DDIM trajectories per prompt from one shared x_T (``logprob.ddim_sample_with_logprob``), scored
    by ``request.reward`` on the decoded final samples (D3PO's sampling phase; official: eta 1, 20 steps, w 5).

    The draws are seeded per record by ``trajectory_generator``; the latents are stored in the dtype of the policy
    input (float32 here), the log-probabilities (mean reduction, as the official code) in float32. Without a reward
    the rewards are zeros.
    """
    size, num_candidates, *shape = request.latent_shape
    index = request.batch["index"].tolist()
    x_T = [torch.randn(shape, generator=trajectory_generator(request.seed, request.epoch, i, 0)) for i in index]
    x_T = torch.stack(x_T)  # (B, c, h, w)
    x_T = x_T.repeat(num_candidates, *[1] * len(shape))  # (K B, c, h, w) candidate-major, x_T shared by a prompt
    generators = [
        trajectory_generator(request.seed, request.epoch, i, 1 + k) for k in range(num_candidates) for i in index
    ]
    scheduler = sampling_scheduler(request.scheduler, num_steps)
    policy = guided(request.unet, request.unconditional, guidance_scale)

    def unet_fn(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return policy(x, t.expand(x.shape[0]))

    latents, log_probs, timesteps = ddim_sample_with_logprob(
        unet_fn, scheduler, x_T.to(request.device), num_steps, eta=eta, generator=generators
    )  # (K B, T + 1, c, h, w), (K B, T), (T,)
    rewards = torch.zeros(size * num_candidates)
    if request.reward is not None:
        images = request.decode(latents[:, -1])  # (K B, C, H, W) in [0, 1]
        rewards = request.reward(images, list(request.batch["prompt"]) * num_candidates).float().cpu()  # (K B,)

    def per_prompt(x: torch.Tensor) -> torch.Tensor:  # (K B, ...) -> (B, K, ...)
        return x.unflatten(0, (num_candidates, size)).transpose(0, 1)

    return Rollout(
        latents=per_prompt(latents),
        timesteps=timesteps.to(latents.device).expand(size, num_candidates, num_steps),
        log_probs=per_prompt(log_probs),
        rewards=per_prompt(rewards.to(latents.device)),
    )
