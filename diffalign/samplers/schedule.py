"""The VP noise schedule of a diffusers scheduler config, and the time grids samplers step on.

A VP diffusion has ``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t^2 + sigma_t^2 = 1`` and half-logSNR
``lambda_t = log(alpha_t / sigma_t)`` (Lu et al. 2022, DPM-Solver, Sec. 2). diffusers' "sigma" is the VE ratio
``sigma_t / alpha_t = exp(-lambda_t)``; we call it ``rho`` here to keep the two apart.

A diffusers schedule is defined at the integer training timesteps ``n = 0 .. N-1``. We extend it to continuous time
by interpolating ``lambda`` linearly in ``t`` between integer points, the same map diffusers' ``_sigma_to_t`` uses to
turn Karras sigmas into timesteps, so float timesteps mean the same noise level to our schedulers, to the analytic
models in ``diffalign.models`` and to diffusers.

All arithmetic is float64 (numpy); tensors are made at the pipeline boundary.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import get_args

import numpy as np

from .config import BetaSchedule, TimestepSpacing

SPACINGS = get_args(TimestepSpacing)
"""Time grids (see ``config.TimestepSpacing``)."""

INTEGER_SPACINGS = ("linspace", "leading", "trailing")


def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule, Nichol & Dhariwal 2021, Eq. 17 (diffusers ``squaredcos_cap_v2``)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = np.arange(num_train_timesteps)
    t1, t2 = steps / num_train_timesteps, (steps + 1) / num_train_timesteps
    betas = [min(1 - alpha_bar(b) / alpha_bar(a), max_beta) for a, b in zip(t1, t2, strict=True)]
    return np.asarray(betas, dtype=np.float64)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift and scale sqrt(alpha_bar) so that the last timestep has SNR exactly 0."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def betas_from_config(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: BetaSchedule = "linear",
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The ``betas`` that diffusers builds from these config keys, as float64, shape (N,).

    Computed in float32 first, exactly like diffusers, so that ``alphas_cumprod`` agrees bit for bit; only then
    promoted to float64 for everything that follows.
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"trained_betas has shape {betas.shape}; pass a 1-D list with one beta per timestep.")
        if len(betas) != num_train_timesteps:  # diffusers takes the betas as given; so do we, but say so
            warnings.warn(
                f"trained_betas has {len(betas)} entries but num_train_timesteps={num_train_timesteps}; using the "
                f"{len(betas)} trained betas as the schedule, as diffusers does. Set num_train_timesteps="
                f"{len(betas)} if that is intended.",
                stacklevel=2,
            )
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(num_train_timesteps).astype(np.float32)
    else:
        raise ValueError(
            f"beta_schedule={beta_schedule!r} is not a VP schedule we know; use one of 'linear', 'scaled_linear', "
            "'squaredcos_cap_v2', or pass trained_betas."
        )
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas.astype(np.float64)).astype(np.float32)
    return betas.astype(np.float64)


class NoiseScheduleVP:
    """alpha_t, sigma_t, lambda_t and the inverse of lambda for a discrete VP schedule, in continuous time.

    ``t`` is in training-timestep units, ``0 <= t <= N - 1``. ``lambda`` is linear in ``t`` between integer
    timesteps; ``t_of_lambda`` inverts that exactly.
    """

    def __init__(self, betas: np.ndarray, rescale_betas_zero_snr: bool = False):
        betas = np.asarray(betas, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float32)).astype(np.float64)  # as diffusers, then f64
        if rescale_betas_zero_snr:
            alphas_cumprod[-1] = 2.0**-24  # diffusers' choice: SNR tiny but finite so the first step is defined
        if np.any(alphas_cumprod <= 0) or np.any(alphas_cumprod >= 1):
            raise ValueError("alphas_cumprod must lie strictly in (0, 1); check the betas of the scheduler config.")
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod  # (N,)
        self.num_train_timesteps = len(betas)
        self.lambdas = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # (N,), decreasing in t

    @classmethod
    def from_config(cls, config) -> NoiseScheduleVP:
        """Build from any diffusers scheduler config (a dict or a ``FrozenDict``)."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        rescale = bool(get("rescale_betas_zero_snr", False))
        betas = betas_from_config(
            num_train_timesteps=get("num_train_timesteps", 1000),
            beta_start=get("beta_start", 0.0001),
            beta_end=get("beta_end", 0.02),
            beta_schedule=get("beta_schedule", "linear"),
            trained_betas=get("trained_betas", None),
            rescale_betas_zero_snr=rescale,
        )
        return cls(betas, rescale_betas_zero_snr=rescale)

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    def lambda_t(self, t) -> np.ndarray:
        """Half-logSNR at continuous time ``t`` (linear interpolation between integer timesteps)."""
        t = np.asarray(t, dtype=np.float64)
        if np.any(t < 0) or np.any(t > self.t_max):
            raise ValueError(f"timesteps must lie in [0, {self.t_max:g}], got min {t.min():g}, max {t.max():g}.")
        return np.interp(t, np.arange(self.num_train_timesteps), self.lambdas)

    def t_of_lambda(self, lam) -> np.ndarray:
        """Inverse of ``lambda_t``: the continuous time whose half-logSNR is ``lam``."""
        lam = np.asarray(lam, dtype=np.float64)
        # np.interp needs increasing x: lambdas decrease with t, so flip both.
        return np.interp(lam, self.lambdas[::-1], np.arange(self.num_train_timesteps, dtype=np.float64)[::-1])

    def alpha_sigma(self, t) -> tuple[np.ndarray, np.ndarray]:
        """``(alpha_t, sigma_t)`` at continuous time ``t``."""
        return alpha_sigma_from_lambda(self.lambda_t(t))

    def rho(self, t) -> np.ndarray:
        """diffusers' sigma, ``sigma_t / alpha_t = exp(-lambda_t)``."""
        return np.exp(-self.lambda_t(t))


def alpha_sigma_from_lambda(lam) -> tuple[np.ndarray, np.ndarray]:
    """``alpha = sigmoid(2 lambda) ** 0.5``, ``sigma = sigmoid(-2 lambda) ** 0.5``, stable for any lambda."""
    lam = np.asarray(lam, dtype=np.float64)
    return np.sqrt(_sigmoid(2.0 * lam)), np.sqrt(_sigmoid(-2.0 * lam))


def alpha_sigma_from_rho(rho) -> tuple[np.ndarray, np.ndarray]:
    """``alpha = 1 / sqrt(1 + rho^2)``, ``sigma = rho * alpha``; ``rho = 0`` gives the clean end (1, 0)."""
    rho = np.asarray(rho, dtype=np.float64)
    alpha = 1.0 / np.sqrt(1.0 + rho**2)
    return alpha, rho * alpha


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def time_grid(
    schedule: NoiseScheduleVP,
    num_inference_steps: int,
    spacing: str = "linspace",
    steps_offset: int = 0,
    t_max: float | None = None,
    t_min: float = 0.0,
    rho_min: float | None = None,
    rho_max: float | None = None,
    karras_rho: float = 7.0,
) -> np.ndarray:
    """``num_inference_steps + 1`` decreasing times; the sampler evaluates the model at the first ``n``.

    The last entry is where the solve ends (before an optional jump to rho = 0, see the schedulers'
    ``final_sigmas_type``). For the integer spacings the first ``n`` entries are exactly diffusers' timesteps and
    the end is ``t = 0``; the continuous grids run from ``t_max`` to ``t_min``:

    - ``time_uniform``: ``t`` linear (DPM-Solver, ``skip_type='time_uniform'``);
    - ``time_quadratic``: ``sqrt(t)`` linear (``skip_type='time_quadratic'``);
    - ``logSNR``: ``lambda`` linear (``skip_type='logSNR'``; diffusers ``use_lu_lambdas``);
    - ``karras``: ``rho^(1/7)`` linear between ``rho_max`` and ``rho_min`` (EDM Eq. 5).
    """
    n = int(num_inference_steps) if num_inference_steps is not None else 0
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {SPACINGS}.")
    N = schedule.num_train_timesteps
    t_top = schedule.t_max if t_max is None else float(t_max)
    if spacing in INTEGER_SPACINGS:
        last = int(round(t_top)) + 1  # diffusers' `last_timestep` (after lambda_min_clipped)
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + steps_offset
        else:  # trailing
            ts = np.arange(last, 0, -N / n).round() - 1
        if len(ts) != n or ts.min() < 0 or ts.max() > N - 1:
            raise ValueError(
                f"timestep_spacing={spacing!r} cannot place {n} steps in {N} training timesteps (got {ts.tolist()}); "
                "use fewer steps or another spacing."
            )
        return np.concatenate([ts.astype(np.float64), [0.0]])
    if spacing == "time_uniform":
        return np.linspace(t_top, t_min, n + 1)
    if spacing == "time_quadratic":
        return np.linspace(math.sqrt(t_top), math.sqrt(t_min), n + 1) ** 2
    lam_lo, lam_hi = schedule.lambda_t(t_top), schedule.lambda_t(t_min)
    if spacing == "logSNR":
        return schedule.t_of_lambda(np.linspace(lam_lo, lam_hi, n + 1))
    r_max = math.exp(-lam_lo) if rho_max is None else float(rho_max)
    r_min = math.exp(-lam_hi) if rho_min is None else float(rho_min)
    ramp = np.linspace(0.0, 1.0, n + 1)
    rhos = (r_max ** (1 / karras_rho) + ramp * (r_min ** (1 / karras_rho) - r_max ** (1 / karras_rho))) ** karras_rho
    return np.clip(schedule.t_of_lambda(-np.log(rhos)), 0.0, schedule.t_max)


def clipped_t_max(schedule: NoiseScheduleVP, lambda_min_clipped: float = -math.inf) -> float:
    """Largest training timestep whose lambda is >= ``lambda_min_clipped`` (diffusers' clipping, needed for cosine)."""
    if not math.isfinite(lambda_min_clipped):
        return schedule.t_max
    clipped = int(np.searchsorted(schedule.lambdas[::-1], lambda_min_clipped))  # how many timesteps fall below
    return float(schedule.num_train_timesteps - 1 - clipped)
