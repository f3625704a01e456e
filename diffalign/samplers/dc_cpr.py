"""Cascade polynomial regression (CPR): DC-Solver's compensation ratios as a function of NFE and guidance scale.

DC-Solver (Zhao et al. 2024, ECCV, Sec. 3.4) predicts the ratio of step ``s`` (1-indexed) of an ``N``-step run at
guidance scale ``w`` by a cascade of polynomials, the normalisations being the official code's:

    rho(s) = sum_{k=0..3} c_k (s / N)^k
    c_k    = sum_{j=0..2} a_kj (w / 12)^(2-j)
    a_kj   = sum_{l=0..2} W_kjl (N / 50)^(2-l)

with ``rho = 1`` for the first ``dc_order`` steps (not compensated). ``W`` (4, 3, 3) enters linearly, so fitting it
to calibrated ratios is a linear least-squares problem; with a single guidance scale the ``w`` terms are not
identifiable and the minimum-norm solution is taken, which predicts that scale exactly as a fit over ``N`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CPR_SHAPE = (4, 3, 3)
NFE_SCALE, GUIDANCE_SCALE = 50.0, 12.0


def _features(nfe: float, guidance_scale: float, step: float) -> np.ndarray:
    """(4, 3, 3) monomials ``(s/N)^k (w/12)^(2-j) (N/50)^(2-l)`` whose weighted sum is ``rho(s)``."""
    x, g, n = step / nfe, guidance_scale / GUIDANCE_SCALE, nfe / NFE_SCALE
    powers = lambda v: np.array([v**2, v, 1.0])  # noqa: E731
    return np.einsum("k,j,l->kjl", x ** np.arange(4), powers(g), powers(n))


def cpr_ratios(coeffs: np.ndarray, nfe: int, guidance_scale: float, dc_order: int) -> list[float]:
    """The ``nfe`` ratios CPR predicts for this setting (DC-Solver Eq. 12); the first ``dc_order`` are 1."""
    W = np.asarray(coeffs, dtype=np.float64).reshape(CPR_SHAPE)
    return [1.0 if s <= dc_order else float((W * _features(nfe, guidance_scale, s)).sum()) for s in range(1, nfe + 1)]


def fit_cpr(settings: Sequence[tuple[int, float, Sequence[float]]], dc_order: int) -> np.ndarray:
    """Least-squares CPR weights (4, 3, 3) from calibrated ``(nfe, guidance_scale, ratios)`` settings.

    Only the compensated steps (``s > dc_order``) enter the fit. Raises ValueError with fewer data than the
    model needs to predict NFE: at least three distinct NFE values.
    """
    rows, targets = [], []
    for nfe, guidance_scale, ratios in settings:
        if len(ratios) != nfe:
            raise ValueError(f"setting NFE {nfe} has {len(ratios)} ratios; expected one per step ({nfe}).")
        for s in range(dc_order + 1, nfe + 1):
            rows.append(_features(nfe, guidance_scale, s).ravel())
            targets.append(ratios[s - 1])
    nfes = sorted({nfe for nfe, _, _ in settings})
    if len(nfes) < 3:
        raise ValueError(
            f"CPR needs calibrated ratios for at least 3 different NFE values, got {nfes}; "
            "calibrate more NFE values (e.g. --nfe 5 6 8 10)."
        )
    # Fit rho - 1: where the data leave W undetermined, the minimum-norm solution then leans towards UniPC.
    W, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(targets) - 1.0, rcond=None)
    W.reshape(CPR_SHAPE)[0, 2, 2] += 1.0  # the constant monomial carries the 1 back
    return W.reshape(CPR_SHAPE)
