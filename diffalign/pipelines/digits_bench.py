"""The embedded ``digits`` UNet as a benchmark target: ODE error against dopri5, and FD-digits with its floors."""

from __future__ import annotations

import torch

from .bench_targets import LEARNED_MODEL_RTOL, reference_for, schedule_config
from .benchmark import BenchTarget
from .digits import ASSETS_DIR, build_scheduler, load_digits_unet
from .frechet import digits_fd_floor, fd_digits


def digits_target(reference_rtol: float = LEARNED_MODEL_RTOL, attention: str | None = None) -> BenchTarget:
    """``digits``: (1, 8, 8) images in [-1, 1]; FD-digits of samples clamped to that range, as a pipeline outputs.

    ``attention``: a ``diffalign.kernels`` backend name set on the UNet's attention layers.
    """
    unet = load_digits_unet()
    if attention is not None:
        from ..kernels import set_attention_backend

        set_attention_backend(unet, attention)
    config = schedule_config(build_scheduler().config)

    @torch.no_grad()
    def model(x: torch.Tensor, t) -> torch.Tensor:
        return unet(x.to(unet.dtype), t).sample.to(x.dtype)

    return BenchTarget(
        name="digits",
        model=model,
        scheduler_config=config,
        sample_shape=(1, 8, 8),
        reference=reference_for(model, config, reference_rtol),
        fd=lambda images: fd_digits(images.clamp(-1, 1)),
        fd_floors={"real vs real halves": digits_fd_floor()},
        side_info=ASSETS_DIR / "digits" / "scheduler",
    )
