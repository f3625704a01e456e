"""A model-agnostic sampling loop: the one that benchmarks and AdjointDPM share.

diffusers pipelines keep their own loops (with our schedulers inside); this one is for a bare denoiser
``model(x, t) -> eps`` (or any prediction type the scheduler is configured for), with optional conditioning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..samplers import model_output, set_grid


@torch.no_grad()
def sample(
    model: Callable,
    x_T: torch.Tensor,
    scheduler,
    num_inference_steps: int | None = None,
    cond=None,
    progress: bool = False,
    **set_timesteps_kwargs,
) -> torch.Tensor:
    """Run ``scheduler`` from ``x_T`` (B, ...) with ``num_inference_steps`` model evaluations; returns x_0 (B, ...).

    ``set_timesteps_kwargs`` go to ``scheduler.set_timesteps`` (``timesteps=`` / ``sigmas=`` instead of a count).
    """
    if num_inference_steps is None:
        scheduler.set_timesteps(**set_timesteps_kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    return denoise(model, x_T, scheduler, cond, progress)


@torch.no_grad()
def sample_on_grid(model: Callable, x_T: torch.Tensor, scheduler, sigmas, cond=None) -> torch.Tensor:
    """``sample`` on the time grid ``sigmas`` (n + 1 diffusers sigmas, last 0), for any scheduler (``set_grid``)."""
    set_grid(scheduler, sigmas)
    return denoise(model, x_T, scheduler, cond)


def denoise(model: Callable, x_T: torch.Tensor, scheduler, cond=None, progress: bool = False) -> torch.Tensor:
    """The loop over ``scheduler.timesteps`` (already set) from ``x_T`` (B, ...); returns x_0 (B, ...)."""
    x = x_T * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress, leave=False, desc=type(scheduler).__name__):
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model_output(model, x_in, t, cond), t, x).prev_sample
    return x
