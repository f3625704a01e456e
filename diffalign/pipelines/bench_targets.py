"""The models ``diffalign bench`` runs on: the embedded ``gmm`` and ``digits``, or a diffusers folder / hub id."""

from __future__ import annotations

import torch

from ..samplers._base import MODEL_KEYS
from .benchmark import BenchTarget
from .gmm import GaussianMixture

EMBEDDED = ("gmm", "digits")


def gmm_target() -> BenchTarget:
    """The analytic digits mixture: exact eps, reference solution to 1e-10, no FD (it has no learned features)."""
    gmm = GaussianMixture.from_digits()
    return BenchTarget(
        name="gmm",
        model=lambda x, t: gmm(x.double(), t).sample,
        scheduler_config={k: v for k, v in gmm.config.items() if k in MODEL_KEYS} | {"prediction_type": "epsilon"},
        sample_shape=(1, 8, 8),
        reference=lambda x_T, rho_T: gmm.reference_solution(x_T, rho_T, 0.0),
    )


def load_target(name_or_path: str) -> BenchTarget:
    """An embedded model by name; anything else is rejected with the list of what exists."""
    if name_or_path == "gmm":
        return gmm_target()
    raise ValueError(f"unknown model {name_or_path!r}; embedded models are {EMBEDDED}.")


__all__ = ["EMBEDDED", "gmm_target", "load_target", "torch"]
