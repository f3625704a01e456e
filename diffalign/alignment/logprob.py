"""Step log-probabilities of stochastic samplers: log p(x_{t-1} | x_t) of each Gaussian step of DDIM (eta > 0) and
DDPM, and a DDIM rollout that stores them — what D3PO (Yang et al., CVPR 2024) and other online methods train on.

Each step of these samplers draws x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I): for DDIM (Song et al. 2021, Eq. 12
and 16) mu = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma_t^2) eps_pred with sigma_t = eta
sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev); for DDPM (Ho et al. 2020, Eq. 7) the posterior mean of
q(x_{t-1} | x_t, x0_pred) and its fixed variance. a_t is ``alphas_cumprod[t]``. The means, variances and noise
draws follow diffusers' ``DDIMScheduler.step`` / ``DDPMScheduler.step`` line by line, so with the same generator the
sample equals diffusers' own ``prev_sample``; the log-density is computed in float32.

Reduction: the official D3PO code (``d3po_pytorch/diffusers_patch/ddim_with_logprob.py``, the same in ddpo-pytorch)
takes the MEAN of the per-element log-density over all but the batch dimension, so its ratio exp(log pi_theta -
log pi_ref) is a geometric mean of per-element ratios and its clip range (0.9, 1.1) means something whatever the
latent size. That is the default here (``reduction="mean"``); ``reduction="sum"`` gives the log-density of the
whole step, log N(x_{t-1}; mu, sigma_t^2 I).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

Reduction = Literal["mean", "sum"]

DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
"""DDPM variance types with a fixed Gaussian step (diffusers' 'learned' ones need the model's variance output)."""


def _batch_timesteps(timestep, batch: int, device: torch.device) -> torch.Tensor:
    """An int, a 0-d tensor or (B,) timesteps -> (B,) int64 on ``device``."""
    timestep = torch.as_tensor(timestep, device=device).long()
    if timestep.ndim == 0:
        return timestep.expand(batch)
    if timestep.shape != (batch,):
        raise ValueError(f"timestep must be one value or one per sample (B={batch},), got {tuple(timestep.shape)}.")
    return timestep


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def _x0_and_eps(scheduler, model_output, sample, alpha_prod_t, beta_prod_t) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted x_0 and noise from the model output, clipped as the scheduler's config says (diffusers' order)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    else:
        raise ValueError(f"prediction_type={prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'.")
    if scheduler.config.thresholding:
        raise ValueError(
            "step log-probabilities do not support dynamic thresholding (thresholding=True); build the scheduler "
            "with thresholding=False (Stable Diffusion configs have it off)."
        )
    if scheduler.config.clip_sample:
        clip = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-clip, clip)
    return pred_original_sample, pred_epsilon


def _gaussian_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    generator,
    prev_sample: torch.Tensor | None,
    noise_like: torch.Tensor,
    sample_dtype: torch.dtype,
    reduction: Reduction,
    deterministic_hint: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw x_{t-1} = mean + std * noise (or take ``prev_sample``) and score it: (B, ...) -> (sample, (B,) log p).

    A drawn x_{t-1} is cast to ``sample_dtype`` before it is scored, so that rescoring the stored (e.g. bfloat16)
    latent with ``prev_sample=`` gives the same log-probability.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; use 'mean' (as the official D3PO code) or 'sum'.")
    if (std < 1e-8).any():  # diffusers clamps DDPM variances at 1e-20: sigma_t = 1e-10 is a deterministic step
        raise ValueError(
            f"a step of this batch is deterministic (sigma_t < 1e-8): x_{{t-1}} has no density; {deterministic_hint}"
        )
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either generator (draw x_{t-1}) or prev_sample (score a stored x_{t-1}), not both.")
    if prev_sample is None:
        variance_noise = randn_tensor(
            noise_like.shape, generator=generator, device=noise_like.device, dtype=noise_like.dtype
        )
        prev_sample = (mean + std * variance_noise).to(sample_dtype)
    elif prev_sample.shape != mean.shape:
        raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)}, expected {tuple(mean.shape)}.")
    # log N(x; mu, sigma^2) per element, x detached as in the official code: gradients flow through mu only
    log_prob = (
        -((prev_sample.detach().float() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )  # (B, ...)
    dims = tuple(range(1, log_prob.ndim))
    log_prob = log_prob.mean(dim=dims) if reduction == "mean" else log_prob.sum(dim=dims)  # (B,)
    return prev_sample, log_prob


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step and log p(x_{t-1} | x_t) (Song et al. 2021, Eq. 12 and 16): -> (x_{t-1}, (B,) log p).

    ``model_output``, ``sample``: (B, ...) at ``timestep`` (an int or (B,) per-sample timesteps of the scheduler's
    grid); ``eta`` > 0 (D3PO samples with eta = 1). With ``prev_sample`` given, that x_{t-1} (e.g. stored during a
    rollout) is scored instead of drawing one: the D3PO ratio needs log pi_theta of the x_{t-1} drawn from the
    sampling policy. The sample (``prev_sample`` drawn with ``generator``) equals ``scheduler.step(model_output,
    timestep, sample, eta=eta, generator=generator).prev_sample``; the maths runs in float32 and a drawn x_{t-1}
    comes back in the sample's dtype. ``reduction``: see the module docstring.

    The previous timestep is t - num_train_timesteps // num_inference_steps, its a_prev ``final_alpha_cumprod`` below
    0, as in diffusers. A last step to a_prev = 1 (``set_alpha_to_one=True``) has sigma_t = 0 and raises.
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"ddim_step_with_logprob needs a diffusers DDIMScheduler, got {type(scheduler).__name__}.")
    if not eta > 0:
        raise ValueError(
            f"eta={eta}: the DDIM step is deterministic for eta = 0, so x_{{t-1}} has no density; sample with "
            "eta > 0 (D3PO uses eta = 1)."
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before stepping.")
    sample32, output32 = sample.float(), model_output.float()  # (B, ...)
    t = _batch_timesteps(timestep, sample.shape[0], sample.device)  # (B,)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # (B,)
    alphas_cumprod = scheduler.alphas_cumprod.to(sample.device)
    final_alpha_cumprod = scheduler.final_alpha_cumprod.to(sample.device)
    alpha_prod_t = alphas_cumprod[t]  # (B,)
    alpha_prod_t_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp_min(0)], final_alpha_cumprod)  # (B,)
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)  # (B,) Eq. 16 / eta^2
    std_dev_t = _per_sample(eta * variance ** (0.5), sample32)  # (B, 1, ...)
    alpha_prod_t, alpha_prod_t_prev = _per_sample(alpha_prod_t, sample32), _per_sample(alpha_prod_t_prev, sample32)
    x0_pred, eps_pred = _x0_and_eps(scheduler, output32, sample32, alpha_prod_t, _per_sample(beta_prod_t, sample32))
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps_pred  # (B, ...)
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * x0_pred + pred_sample_direction  # (B, ...) Eq. 12
    prev_sample, log_prob = _gaussian_step(
        prev_sample_mean,
        std_dev_t,
        generator,
        prev_sample,
        model_output,
        sample.dtype,
        reduction,
        "build the scheduler with set_alpha_to_one=False so that the last DDIM step keeps some noise.",
    )
    return prev_sample, log_prob


def _ddpm_previous_timesteps(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """diffusers' ``DDPMScheduler.previous_timestep`` for (B,) timesteps: the next entry of the grid, -1 after it."""
    if not (scheduler.custom_timesteps or scheduler.num_inference_steps):
        return t - 1
    grid = scheduler.timesteps.to(t.device)  # (S,)
    matches = grid[None, :] == t[:, None]  # (B, S)
    if not matches.any(dim=1).all():
        raise ValueError(f"timesteps {t.tolist()} are not all on the scheduler's grid {grid.tolist()}.")
    index = matches.int().argmax(dim=1)  # (B,) first match, as diffusers
    following = grid[(index + 1).clamp_max(len(grid) - 1)]  # (B,)
    return torch.where(index == len(grid) - 1, -1, following)


def ddpm_step_with_logprob(
    scheduler: DDPMScheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM ancestral step and log p(x_{t-1} | x_t) (Ho et al. 2020, Eq. 6-7): -> (x_{t-1}, (B,) log p).

    The mean is the posterior mean of q(x_{t-1} | x_t, x0_pred), the variance the config's ``variance_type``
    (fixed_small: beta~_t = (1 - a_prev) / (1 - a_t) beta_t, fixed_large: beta_t). Arguments, sample equality with
    ``scheduler.step`` and ``reduction`` as ``ddim_step_with_logprob``. The step at t = 0 adds no noise (nor does
    a step to a_prev = 1, whose variance diffusers clamps to 1e-20), so it has no density and raises: score the
    steps with t > 0 and take the last one with ``scheduler.step``.
    """
    if not isinstance(scheduler, DDPMScheduler):
        raise TypeError(f"ddpm_step_with_logprob needs a diffusers DDPMScheduler, got {type(scheduler).__name__}.")
    variance_type = scheduler.config.variance_type
    if variance_type not in DDPM_VARIANCE_TYPES:
        raise ValueError(f"variance_type={variance_type!r} is not supported; use one of {DDPM_VARIANCE_TYPES}.")
    sample32, output32 = sample.float(), model_output.float()  # (B, ...)
    t = _batch_timesteps(timestep, sample.shape[0], sample.device)  # (B,)
    prev_t = _ddpm_previous_timesteps(scheduler, t)  # (B,)
    alphas_cumprod = scheduler.alphas_cumprod.to(sample.device)
    alpha_prod_t = alphas_cumprod[t]  # (B,)
    alpha_prod_t_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp_min(0)], scheduler.one.to(sample.device))
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev  # (B,)
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t  # (B,)
    if variance_type == "fixed_large":
        std = current_beta_t ** (0.5)
    else:
        std = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20) ** (0.5)
    std = _per_sample(torch.where(t > 0, std, 0.0), sample32)  # (B, 1, ...): no noise at t = 0
    x0_pred, _ = _x0_and_eps(
        scheduler, output32, sample32, _per_sample(alpha_prod_t, sample32), _per_sample(beta_prod_t, sample32)
    )
    pred_original_sample_coeff = _per_sample((alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t, sample32)
    current_sample_coeff = _per_sample(current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t, sample32)
    prev_sample_mean = pred_original_sample_coeff * x0_pred + current_sample_coeff * sample32  # (B, ...) Eq. 7
    prev_sample, log_prob = _gaussian_step(
        prev_sample_mean,
        std,
        generator,
        prev_sample,
        model_output,
        sample.dtype,
        reduction,
        "the DDPM step at t = 0 (or onto a_prev = 1) adds no noise; score only the steps before it.",
    )
    return prev_sample, log_prob


@torch.no_grad()
def ddim_sample_with_logprob(
    unet_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    scheduler: DDIMScheduler,
    x_T: torch.Tensor,
    num_steps: int,
    eta: float = 1.0,
    guidance_scale: float = 1.0,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roll out stochastic DDIM from x_T, storing every latent and step log-probability (D3PO's sampling phase).

    ``unet_fn(x, t, cond) -> model output`` with x (N, ...), t a 0-d timestep and cond (N, ...) or None (e.g.
    ``lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample``). With ``guidance_scale`` != 1, classifier-free
    guidance out = out_uncond + w (out_cond - out_uncond) in one batched call on [uncond, cond] (``uncond`` (B, ...)
    or (1, ...)), as the official D3PO pipeline; the guided output is the policy whose log-probabilities are stored.
    Runs without gradients: the trainer recomputes log pi_theta of the stored steps with ``prev_sample=``.

    Returns ``latents`` (B, T+1, ...) in x_T's dtype (x_T first, the final sample last), ``log_probs`` (B, T) float32
    of each step and ``timesteps`` (T,), T = ``num_steps``.
    """
    if guidance_scale != 1.0 and (cond is None or uncond is None):
        raise ValueError(f"guidance_scale={guidance_scale} needs cond and uncond; else use guidance_scale=1.")
    scheduler.set_timesteps(num_steps, device=x_T.device)
    batch = x_T.shape[0]
    if guidance_scale != 1.0:
        model_cond = torch.cat([uncond.expand(batch, *uncond.shape[1:]), cond])  # (2B, ...) unconditional first
    else:
        model_cond = cond
    latents = x_T * scheduler.init_noise_sigma  # (B, ...)
    trajectory, log_probs = [latents], []
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guidance_scale != 1.0 else latents
        output = unet_fn(scheduler.scale_model_input(model_input, t), t, model_cond)  # (B or 2B, ...)
        if guidance_scale != 1.0:
            output_uncond, output_cond = output.chunk(2)
            output = output_uncond + guidance_scale * (output_cond - output_uncond)
        latents, log_prob = ddim_step_with_logprob(
            scheduler, output, t, latents, eta=eta, generator=generator, reduction=reduction
        )
        trajectory.append(latents)
        log_probs.append(log_prob)
    return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1), scheduler.timesteps.clone()
