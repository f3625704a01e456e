"""UniPC's B(h) predictor (UniP) and corrector (UniC), and DC-Solver's Lagrange compensation, as pure functions.

UniPC (Zhao et al. 2023, NeurIPS, Alg. 2 / 3 and Eq. 8-9) writes one step from ``s`` to ``t`` (``h = lambda_t -
lambda_s``) for the model term ``m`` (the data prediction when ``predict_x0``, else the noise prediction) as

    x_t = c_x x_s - w (e^{hh} - 1) m_s - w B(h) sum_k a_k D_k,     D_k = (m_{s_k} - m_s) / r_k

with ``hh = -h`` (data) or ``h`` (noise), ``c_x = sigma_t / sigma_s`` (data) or ``alpha_t / alpha_s`` (noise),
``w = alpha_t`` (data) or ``sigma_t`` (noise), ``r_k = (lambda_{s_k} - lambda_s) / h`` and ``B(h) = hh`` (``bh1``) or
``e^{hh} - 1`` (``bh2``). The weights ``a`` solve ``R a = b`` with ``R_{jk} = r_k^{j-1}`` and
``b_j = hh phi_{j+1}(hh) j! / B(h)`` (UniPC Thm. 3.1); the corrector adds the fresh model value at ``t`` as the point
``r = 1``. Coefficients are float64 scalars; tensors keep their own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SOLVER_TYPES = ("bh1", "bh2")


def bh_coefficients(hh: float, order: int, solver_type: str) -> tuple[float, float, np.ndarray]:
    """``(e^{hh} - 1, B(h), b)`` with ``b`` (order,) the right-hand side of UniPC's order conditions (Thm. 3.1)."""
    h_phi_1 = math.expm1(hh)
    B_h = hh if solver_type == "bh1" else math.expm1(hh)
    b = np.empty(order)
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1.0
    for j in range(1, order + 1):
        b[j - 1] = h_phi_k * factorial / B_h
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, B_h, b


def _form(alpha_s, sigma_s, alpha_t, sigma_t, predict_x0: bool) -> tuple[float, float, float, float]:
    """``(hh, c_x, w, w (e^{hh} - 1))``.

    At the clean end (``sigma_t = 0``, ``h = inf``) only the first-order step is defined: it returns the data
    prediction, which in the noise form is ``w (e^h - 1) = alpha_t sigma_s / alpha_s`` (the limit).
    """
    lam_s = math.log(alpha_s) - math.log(sigma_s)
    lam_t = math.inf if sigma_t == 0.0 else math.log(alpha_t) - math.log(sigma_t)
    h = lam_t - lam_s
    if predict_x0:
        return -h, sigma_t / sigma_s, alpha_t, alpha_t * math.expm1(-h)
    first = alpha_t * sigma_s / alpha_s if sigma_t == 0.0 else sigma_t * math.expm1(h)
    return h, alpha_t / alpha_s, sigma_t, first


def _differences(ms: Sequence[torch.Tensor], lambdas: Sequence[float], h: float):
    """``(r, D)``: ``r_k = (lambda_k - lambda_0) / h`` and ``D_k = (m_k - m_0) / r_k`` for ``k = 1 .. len(ms) - 1``."""
    rks = [(lambdas[k] - lambdas[0]) / h for k in range(1, len(ms))]
    return rks, [(ms[k] - ms[0]) / r for k, r in zip(range(1, len(ms)), rks, strict=True)]


def uni_p_update(x, ms, lambdas, coeffs, order: int, solver_type: str, predict_x0: bool) -> torch.Tensor:
    """UniP-``order`` from ``s`` to ``t`` (UniPC Alg. 2; diffusers ``multistep_uni_p_bh_update``).

    ``x`` (B, ...) at ``s``; ``ms`` newest first, ``ms[0]`` at ``s``, ``ms[k]`` ``k`` steps earlier, at ``lambdas``
    (same order); ``coeffs = (alpha_s, sigma_s, alpha_t, sigma_t)``. Order 2 uses ``a = 1/2`` as UniPC does.
    """
    hh, c_x, w, first = _form(*coeffs, predict_x0)
    if order == 1 or math.isinf(hh):
        return c_x * x - first * ms[0]
    h_phi_1, B_h, b = bh_coefficients(hh, order, solver_type)
    h = -hh if predict_x0 else hh
    rks, D1s = _differences(ms[:order], lambdas[:order], h)
    if order == 2:
        a = np.array([0.5])
    else:
        R = np.vander(np.asarray(rks), order - 1, increasing=True).T  # (order-1, order-1): R_jk = r_k^j
        a = np.linalg.solve(R, b[:-1])
    res = sum(float(a_k) * D for a_k, D in zip(a, D1s, strict=True))
    return c_x * x - w * h_phi_1 * ms[0] - w * B_h * res


def uni_c_update(x_s, m_t, ms, lambdas, coeffs, order: int, solver_type: str, predict_x0: bool) -> torch.Tensor:
    """UniC-``order``: redo the step ``s -> t`` with the model value ``m_t`` at ``t`` (UniPC Alg. 3, Eq. 9).

    ``x_s`` is the (corrected) sample at ``s``, ``ms``/``lambdas`` as in ``uni_p_update`` (``ms[0]`` at ``s``).
    Order 1 uses ``a = 1/2`` as UniPC does. The result replaces the predictor's ``x_t``; no extra model evaluation.
    """
    hh, c_x, w, _ = _form(*coeffs, predict_x0)
    h_phi_1, B_h, b = bh_coefficients(hh, order, solver_type)
    h = -hh if predict_x0 else hh
    rks, D1s = _differences(ms[:order], lambdas[:order], h)
    if order == 1:
        a = np.array([0.5])
    else:
        R = np.vander(np.asarray(rks + [1.0]), order, increasing=True).T  # (order, order)
        a = np.linalg.solve(R, b)
    res = sum(float(a_k) * D for a_k, D in zip(a[:-1], D1s, strict=True)) + float(a[-1]) * (m_t - ms[0])
    return c_x * x_s - w * h_phi_1 * ms[0] - w * B_h * res


def lagrange_compensation(ms: Sequence[torch.Tensor], ts: Sequence[float], tau) -> torch.Tensor:
    """The Lagrange interpolant through ``(ts[k], ms[k])`` evaluated at ``tau`` (DC-Solver, Zhao et al. 2024, Eq. 9).

    ``tau`` may be a float or a 0-d tensor that requires grad (ratio search); ``ms`` (B, ...) tensors.
    """
    out = 0.0
    for k, m_k in enumerate(ms):
        weight = 1.0
        for j, t_j in enumerate(ts):
            if j != k:
                weight = weight * (tau - t_j) / (ts[k] - t_j)
        out = out + weight * m_k
    return out
