"""``diffalign calibrate``: DC-Solver ratios (and CPR coefficients) for an embedded model or a diffusers pipeline.

Adapts a model to the bare ``model(x, t)`` that ``diffalign.samplers.dc_calibrate`` needs (guidance inside it),
calibrates with the benchmark's sampler settings (``benchmark.ODE_SETTINGS`` plus overrides) so that
``diffalign bench`` uses the result, and writes the side information: into an existing scheduler folder (beside its
``scheduler_config.json``, which is left alone) or, for a new folder, as a full ``save_pretrained`` scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..samplers import keep_model_keys
from ..samplers.dc_calibrate import calibrate_dc, fit_cpr_coefficients, model_fingerprint
from ..samplers.dc_solver import DCSolverScheduler
from ..samplers.side_info import save_side_info
from .bench_targets import GMM_SCHEDULER_DIR, schedule_config
from .benchmark import ODE_SETTINGS


@dataclass
class CalibrationModel:
    """What calibration needs: ``model_for(guidance_scale)`` -> ``model(x, t)``, the schedule and its folder."""

    name: str
    model_for: Callable[[float], Callable]
    scheduler_config: dict
    sample_shape: tuple[int, ...]
    fingerprint: str
    scheduler_dir: Path | None = None


def _unguided(model: Callable, guidance_scale: float, name: str) -> Callable:
    if guidance_scale != 1.0:
        raise ValueError(f"{name} is unconditional: calibrate it with guidance_scale 1.0, got {guidance_scale}.")
    return model


class GuidedDigits:
    """``digits-cond`` with classifier-free guidance; the batch cycles through the digits 0..9 as prompts."""

    def __init__(self, unet, text_encoder, guidance_scale: float):
        from .digits import NULL_LABEL

        self.unet, self.guidance_scale = unet, guidance_scale
        self.table = text_encoder(torch.arange(NULL_LABEL + 1)).detach()  # (11, 1, D); row 10 = empty prompt

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        B = x.shape[0]
        labels = torch.arange(B) % (len(self.table) - 1)  # (B,)
        states = torch.cat([self.table[-1:].expand(B, -1, -1), self.table[labels]])  # (2B, 1, D)
        out = self.unet(torch.cat([x, x]).float(), t, encoder_hidden_states=states).sample.to(x.dtype)
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


def calibration_model(name: str) -> CalibrationModel:
    """``gmm``, ``digits`` or ``digits-cond`` (classifier-free guidance over the digits 0..9)."""
    if name == "gmm":
        from .gmm import GaussianMixture

        gmm = GaussianMixture.from_digits()
        model = lambda x, t: gmm(x.double(), t).sample.to(x.dtype)  # noqa: E731
        config = schedule_config(gmm.config) | {"prediction_type": "epsilon"}
        return CalibrationModel(
            name, lambda g: _unguided(model, g, name), config, (1, 8, 8), model_fingerprint(gmm), GMM_SCHEDULER_DIR
        )
    if name in ("digits", "digits-cond"):
        from .digits import ASSETS_DIR, build_scheduler, load_digits_pipeline

        pipe = load_digits_pipeline(conditional=name == "digits-cond")
        unet = pipe.unet.requires_grad_(False)
        config = schedule_config(build_scheduler().config)
        if name == "digits":
            model = lambda x, t: unet(x.float(), t).sample.to(x.dtype)  # noqa: E731
            model_for = lambda g: _unguided(model, g, name)  # noqa: E731
        else:
            encoder = pipe.text_encoder.requires_grad_(False)
            model_for = lambda g: GuidedDigits(unet, encoder, g)  # noqa: E731
        folder = ASSETS_DIR / name / "scheduler"
        return CalibrationModel(name, model_for, config, (1, 8, 8), model_fingerprint(unet), folder)
    raise ValueError(f"unknown model {name!r} for calibration; use 'gmm', 'digits' or 'digits-cond'.")


def calibrate_model(
    name: str,
    nfe: Sequence[int] = (5, 6, 8, 10),
    guidance_scales: Sequence[float] = (1.0,),
    overrides: dict | None = None,
    **calibrate_kwargs,
) -> tuple[DCSolverScheduler, CalibrationModel]:
    """Calibrate ``name`` at every (NFE, guidance scale), with the benchmark's settings; fit CPR over all of them."""
    target = calibration_model(name)
    settings = {**ODE_SETTINGS, **(overrides or {})}
    scheduler = DCSolverScheduler.from_config(keep_model_keys(target.scheduler_config), **settings)
    for g in guidance_scales:
        scheduler = calibrate_dc(
            target.model_for(float(g)),
            scheduler,
            nfe=list(nfe),
            guidance_scale=float(g),
            sample_shape=target.sample_shape,
            fingerprint=target.fingerprint,
            cpr=False,
            **calibrate_kwargs,
        )
    if len(set(nfe)) >= 3:
        fit_cpr_coefficients(scheduler)
    return scheduler, target


def write_calibration(scheduler: DCSolverScheduler, out: str | Path) -> Path:
    """Side information beside an existing ``scheduler_config.json`` in ``out``; else a full scheduler folder."""
    out = Path(out)
    if (out / "scheduler_config.json").is_file():
        save_side_info(out, scheduler.side_info_name, *scheduler.side_info_state())
    else:
        scheduler.save_pretrained(out)
    return out
