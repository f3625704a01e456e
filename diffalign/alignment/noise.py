"""Noise and timestep providers: where the (t, eps) of each candidate comes from.

A method names its provider (``PreferenceMethod.noise``); the trainer calls it once per micro-batch with a
``NoiseRequest`` and noises the clean candidates as ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``
(``DDPMScheduler.add_noise``). Every provider returns ``(timesteps (B, K), noise (B, K, c, h, w))``:

- ``"shared"``: one t and one eps per prompt, shared by its K candidates (Diffusion-DPO, Wallace et al. 2023), so
  the candidates' errors differ only through the candidates;
- ``"independent"``: a t and an eps per candidate;
- ``"inversion"``: one t per prompt, and eps such that x_t is the DDIM inversion (Song et al. 2021, Eq. 12 run
  from 0 to t; Mokady et al. 2023) of the clean candidate by the current policy, i.e. x_t lies on the model's own
  trajectory (SmPO). ``official_inversion_noise`` is SmPO's own variant of it (a fixed grid that stops below t).

The random draws come from a generator seeded by (seed, epoch, dataset index) of each record, so a record gets the
same draws on any number of processes and after a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMInverseScheduler

from ..samplers import eps_from_model_output

INVERSION_STEPS = 4
"""DDIM steps of the inversion provider from 0 to t."""
OFFICIAL_INVERSION_STEPS = 5
"""Grid size of ``official_inversion_noise`` over the whole schedule (the official SmPO code: 5 SD 1.5, 10 SDXL)."""


@dataclass
class NoiseRequest:
    """What a provider is given for one micro-batch of B prompts with K candidates each.

    ``unet(x (N, c, h, w), t (N,)) -> model output (N, c, h, w)`` is the current policy with the conditioning of
    the N = K B candidates bound in, candidate-major (all candidates 0 first, then all candidates 1, ...); it is
    called without gradient. Only the inversion provider calls it.
    """

    latents: torch.Tensor  # (B, K, c, h, w) clean candidates x_0
    index: torch.Tensor  # (B,) dataset index of each record
    epoch: int
    seed: int
    scheduler: object  # the training DDPMScheduler (alphas_cumprod, num_train_timesteps, prediction_type)
    unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def record_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch, dataset index)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) >> 1)


def _draws(request: NoiseRequest, per_candidate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    size, num_candidates, *shape = request.latents.shape
    num_train_timesteps = request.scheduler.config.num_train_timesteps
    draws = 1 if not per_candidate else num_candidates
    timesteps, noise = [], []
    for index in request.index.tolist():
        generator = record_generator(request.seed, request.epoch, index)
        for _ in range(draws):
            timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
            noise.append(torch.randn(shape, generator=generator))
    timesteps = torch.cat(timesteps).reshape(size, draws).expand(size, num_candidates)  # (B, K)
    noise = torch.stack(noise).reshape(size, draws, *shape).expand(size, num_candidates, *shape)  # (B, K, c, h, w)
    device = request.latents.device
    return timesteps.to(device), noise.to(device)


def shared_noise(request: NoiseRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """One t and one eps per prompt, the same for its K candidates (Diffusion-DPO)."""
    return _draws(request, per_candidate=False)


def independent_noise(request: NoiseRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """A t and an eps per candidate."""
    return _draws(request, per_candidate=True)


def ddim_step(eps: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_next: torch.Tensor):
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with sigma = 0) from abar to abar_next, either direction:
    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar); x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps."""
    x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    return alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next).sqrt() * eps


@torch.no_grad()
def ddim_path(unet: Callable, scheduler, x: torch.Tensor, grid: torch.Tensor, renoise: int = 0) -> torch.Tensor:
    """Run DDIM along a per-sample timestep grid (N, S + 1): ascending inverts, descending samples. x (N, c, h, w).

    ``renoise`` > 0 (inversion): refine each step by that many fixed-point iterations that evaluate eps at the step's
    end point (ReNoise, Garibi et al. 2024, Alg. 1, without the averaging), which is what the DDIM sampling step
    back from there uses; so the round trip inversion -> sampling closes as the iterations converge.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(x.device, torch.float64)
    prediction_type = scheduler.config.prediction_type
    x = x.double()

    def eps_at(x_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        out = unet(x_t.float(), t).double()
        return eps_from_model_output(out, x_t, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), prediction_type)

    for i in range(grid.shape[1] - 1):
        t, t_next = grid[:, i], grid[:, i + 1]  # (N,)
        alpha_bar = alphas_cumprod[t].reshape(-1, *[1] * (x.ndim - 1))  # (N, 1, 1, 1)
        alpha_bar_next = alphas_cumprod[t_next].reshape(alpha_bar.shape)
        x_next = ddim_step(eps_at(x, t, alpha_bar), x, alpha_bar, alpha_bar_next)
        for _ in range(renoise):
            x_next = ddim_step(eps_at(x_next, t_next, alpha_bar_next), x, alpha_bar, alpha_bar_next)
        x = x_next
    return x.float()


def inversion_grid(timesteps: torch.Tensor, steps: int) -> torch.Tensor:
    """(N,) target timesteps -> (N, steps + 1) integer grids from 0 up to each t, uniform in t."""
    fractions = torch.linspace(0, 1, steps + 1, device=timesteps.device)  # (S + 1,)
    return torch.round(fractions[None] * timesteps[:, None].double()).long()  # (N, S + 1)


def inversion_noise(
    request: NoiseRequest, steps: int = INVERSION_STEPS, renoise: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One t per prompt; each candidate's x_t is its DDIM inversion by the policy in ``steps`` steps (``renoise``
    fixed-point refinements each, see ``ddim_path``), returned as the eps with ``add_noise(x_0, eps, t) = x_t``:
    eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t).

    Accuracy on digits-cond (t = 200; RMS of inversion -> DDIM sampling back, images in [-1, 1]): 0.06 with 4 steps,
    0.005 with 10 steps and renoise 2 (tests/alignment/test_noise.py)."""
    return inverted_noise(
        request, lambda x0, t: ddim_path(request.unet, request.scheduler, x0, inversion_grid(t, steps), renoise)
    )


def inverted_noise(request: NoiseRequest, invert: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """One t per prompt, shared by its candidates; ``invert(x0 (N, c, h, w), t (N,)) -> x (N, c, h, w)`` maps each
    clean candidate to its noisy latent, returned as the eps with ``add_noise(x_0, eps, t) = x``:
    eps = (x - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    if request.unet is None:
        raise ValueError("the inversion noise provider needs the policy UNet callable (NoiseRequest.unet).")
    latents = request.latents  # (B, K, c, h, w)
    timesteps, _ = _draws(request, per_candidate=False)  # (B, K), shared by the candidates
    x0 = latents.transpose(0, 1).flatten(0, 1)  # (K B, c, h, w) candidate-major
    t = timesteps.transpose(0, 1).flatten(0, 1)  # (K B,)
    x = invert(x0, t)
    alpha_bar = request.scheduler.alphas_cumprod.to(x0.device)[t].reshape(-1, 1, 1, 1)
    eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()  # (K B, c, h, w)
    return timesteps, eps.unflatten(0, (latents.shape[1], latents.shape[0])).transpose(0, 1)


@torch.no_grad()
def official_inversion(
    unet: Callable, scheduler, x0: torch.Tensor, timesteps: torch.Tensor, steps: int = OFFICIAL_INVERSION_STEPS
) -> torch.Tensor:
    """SmPO's ReNoise inversion as the official ``train.py`` (JaydenLyh/SmPO) runs it: x0 (N, c, h, w), t (N,) ->
    the inverted latent (N, c, h, w) at the last grid point below each t (x0 itself at or below the first one).

    The grid is ``DDIMInverseScheduler.from_config(scheduler.config).set_timesteps(steps)`` over the whole schedule
    (the official code: 5 for SD 1.5, 10 for SDXL), and each sample takes the grid points g < t in turn. The step
    to g starts from the previous grid point (the first from the clean x0) and is ``DDIMInverseScheduler.step``
    with the average of two predictions at timestep g (ReNoise, Garibi et al. 2024, one iteration with averaging):
    one on the current latent, one on the first estimate of the latent at g. ``unet(x, t)`` as ``NoiseRequest``'s.
    """
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(steps, device=x0.device)
    x = x0
    for grid_t in inverse.timesteps:
        active = (grid_t < timesteps).reshape(-1, *[1] * (x0.ndim - 1))  # (N, 1, 1, 1)
        if not active.any():
            break
        level = grid_t.expand(len(x))  # (N,)
        output = unet(x, level)
        first = inverse.step(output, grid_t, x).prev_sample
        output = (output + unet(first, level)) / 2
        x = torch.where(active, inverse.step(output, grid_t, x).prev_sample, x)
    return x


def official_inversion_noise(
    request: NoiseRequest, steps: int = OFFICIAL_INVERSION_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """One t per prompt; each candidate's ``official_inversion`` by the policy, trained at t as the official code
    does: eps = (x - sqrt(abar_t) x_0) / sqrt(1 - abar_t), so x has less noise than t says and eps has an x_0
    component."""
    return inverted_noise(request, lambda x0, t: official_inversion(request.unet, request.scheduler, x0, t, steps))


PROVIDERS = {"shared": shared_noise, "independent": independent_noise, "inversion": inversion_noise}
"""Noise providers by the name a method gives in ``PreferenceMethod.noise``."""
