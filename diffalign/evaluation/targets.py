"""The models ``diffalign bench`` runs on, as ``BenchTarget``s: a loaded ``ModelSpec`` plus its yardsticks.

The reference of the analytic ``gmm`` is its exact probability-flow solution (dopri5 at 1e-10); a learned model's
is an adaptive dopri5 solve of the same (guided) probability-flow ODE. The digits models are also scored by
FD-digits beside its floors, and a diffusers pipeline by real FID when the user has the Inception files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.gmm import GaussianMixture
from ..models.loading import ModelSpec, load_model
from ..samplers import NoiseScheduleVP
from .frechet import digits_fd_floor, fd_digits
from .reference import probability_flow_solution, timestep_eps_fn

LEARNED_MODEL_RTOL = 1e-5  # dopri5 tolerance of the reference solution for learned models


@dataclass
class BenchTarget:
    """What the benchmark needs from a model.

    ``model(x, t)``: the denoiser; ``reference(x_T, rho_T)``: the accurate ODE solution to ``rho = 0``;
    ``fd(images)``: Fréchet distance of (B, ...) samples to the data, or None; ``fd_floors``: labelled floors.
    """

    name: str
    model: Callable
    scheduler_config: dict
    sample_shape: tuple[int, ...]
    reference: Callable[[torch.Tensor, float], torch.Tensor]
    fd: Callable[[torch.Tensor], float] | None = None
    fd_floors: dict[str, float] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    fd_name: str = "FD-digits"
    side_info: Path | None = None
    """Folder with learned scheduler side information (v3 EMS, DC ratios, learned grids) for this model, if any."""
    fingerprint: str | None = None
    """``model_fingerprint`` of the weights, which learned grids are checked against."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale ``model`` runs at (None: unconditional); picks the learned grids for it."""


def reference_for(model, scheduler_config: dict, rtol: float):
    """``reference(x_T, rho_T)``: dopri5 at ``rtol`` on the probability-flow ODE of ``model(x, t)``."""
    schedule = NoiseScheduleVP.from_config(scheduler_config)
    eps_fn = timestep_eps_fn(model, schedule, scheduler_config.get("prediction_type", "epsilon"))
    return lambda x_T, rho_T: probability_flow_solution(eps_fn, x_T, rho_T, 0.0, rtol, rtol)


def bench_target(
    spec: ModelSpec,
    reference_rtol: float = LEARNED_MODEL_RTOL,
    inception_weights: str | None = None,
    fid_stats: str | None = None,
) -> BenchTarget:
    """``spec`` with its reference solution, FD-digits on the digits models, real FID when both files are given."""
    if isinstance(spec.network, GaussianMixture):  # exact eps: exact reference, float32 samples as for a UNet
        gmm = spec.network
        reference = lambda x_T, rho_T: gmm.reference_solution(x_T, rho_T, 0.0)  # noqa: E731
        return BenchTarget(
            spec.name,
            spec.model,
            spec.scheduler_config,
            spec.sample_shape,
            reference,
            side_info=spec.scheduler_dir,
            fingerprint=spec.fingerprint,
        )
    target = BenchTarget(
        spec.name,
        spec.model,
        spec.scheduler_config,
        spec.sample_shape,
        reference_for(spec.model, spec.scheduler_config, reference_rtol),
        dtype=spec.dtype,
        side_info=spec.scheduler_dir,
        fingerprint=spec.fingerprint,
        guidance_scale=spec.guidance_scale,
    )
    if spec.name in ("digits", "digits-cond"):  # samples clamped to [-1, 1], as a pipeline outputs them
        target.fd = lambda images: fd_digits(images.clamp(-1, 1))
        target.fd_floors = {"real vs real halves": digits_fd_floor()}
    if inception_weights is not None or fid_stats is not None:
        if inception_weights is None or fid_stats is None:
            raise ValueError("--fid inception needs both --inception-weights PATH and --fid-stats PATH.npz.")
        from .inception import inception_fid_fn

        target.fd = inception_fid_fn(inception_weights, fid_stats, spec.decode)
        target.fd_name = "FID (Inception)"
    return target


def load_target(
    name_or_path: str,
    reference_rtol: float = LEARNED_MODEL_RTOL,
    inception_weights: str | None = None,
    fid_stats: str | None = None,
    **load_kwargs,
) -> BenchTarget:
    """``bench_target(load_model(name_or_path, **load_kwargs), ...)``: prompts, guidance_scale, device, attention."""
    return bench_target(load_model(name_or_path, **load_kwargs), reference_rtol, inception_weights, fid_stats)


def gmm_target() -> BenchTarget:
    """The analytic digits mixture: exact eps, reference solution to 1e-10, no FD (it has no learned features)."""
    return load_target("gmm")


def digits_target(reference_rtol: float = LEARNED_MODEL_RTOL, attention: str | None = None) -> BenchTarget:
    """``digits``: (1, 8, 8) images in [-1, 1], ODE error against dopri5 and FD-digits with its floors."""
    return load_target("digits", reference_rtol, attention=attention)
