"""Accurate solutions of the probability-flow ODE, the yardstick that sampler errors are measured against.

In DDIM's variables ``y = x / alpha`` and ``u = sigma / alpha = exp(-lambda)`` the ODE is ``dy/du = eps(x, t(u))``
(Song et al. 2021, DDIM Eq. 14; Lu et al. 2022, Eq. 3.4): no stiff linear term, so an adaptive Runge-Kutta solver
(torchdiffeq's dopri5) reaches tight tolerances in a few hundred evaluations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..samplers import NoiseScheduleVP, eps_from_model_output, model_output
from ..samplers.schedule import alpha_sigma_from_rho


@torch.no_grad()
def probability_flow_solution(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    rho_T: float,
    rho_end: float = 0.0,
    rtol: float = 1e-7,
    atol: float = 1e-7,
) -> torch.Tensor:
    """Solve from ``x_T`` at diffusers sigma ``rho_T`` to ``rho_end``; ``eps_fn(x, rho)`` -> noise prediction.

    ``x_T`` (B, ...) any float dtype; integration in float64 with dopri5; returns float64 shaped like ``x_T``.
    """
    from torchdiffeq import odeint

    shape = x_T.shape
    a_T, _ = alpha_sigma_from_rho(rho_T)
    y_T = x_T.to(torch.float64) / float(a_T)

    def rhs(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha = 1.0 / torch.sqrt(1.0 + u**2)
        return eps_fn(alpha * y, u).to(torch.float64)

    u = torch.tensor([rho_T, rho_end], dtype=torch.float64, device=x_T.device)
    y_end = odeint(rhs, y_T, u, rtol=rtol, atol=atol, method="dopri5")[-1]
    a_end, _ = alpha_sigma_from_rho(rho_end)
    return (float(a_end) * y_end).reshape(shape)


def timestep_eps_fn(model, schedule: NoiseScheduleVP, prediction_type: str = "epsilon", cond=None):
    """Wrap a UNet-like ``model(x, t)`` as ``eps_fn(x, rho)`` at the continuous timestep whose sigma is ``rho``.

    ``x`` arrives in float64; ``model`` casts it to its own dtype.
    """

    def eps_fn(x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        r = float(rho)
        t = float(schedule.t_of_lambda(-np.log(r))) if r > 0 else 0.0
        out = model_output(model, x, torch.tensor(t, device=x.device), cond).to(torch.float64)
        alpha, sigma = (float(v) for v in alpha_sigma_from_rho(r))
        return eps_from_model_output(out, x, alpha, sigma, prediction_type)

    return eps_fn
