"""LD3: the time grid learned by backpropagation through the sampler (Tong et al. 2024, "Learning to Discretize
Denoising Diffusion ODEs"; official code vinhsuhi/LD3, ``trainer.py``).

Parameters: ``xi`` (n,), ``lambda_k = lambda_T + (lambda_end - lambda_T) * cumsum(softmax(xi))[k - 1]`` for the
``n - 1`` interior points (the official ``model_lambda_fn``), so the grid stays ordered whatever ``xi`` is; the
first point is the start ``t_max`` and the last step goes to sigma 0. Loss: LD3's soft ("ball") loss
``min_{x' in B(x_T, r)} ||Psi_xi(x') - x*_0(x_T)||^2`` between the few-step sample from a perturbed start ``x'`` and
the teacher's end point from ``x_T``; ``x'`` is a per-noise parameter moved by gradient steps and projected onto the
ball of RMS radius ``r`` (``r = 0``: the hard loss). ``xi`` follows RMSprop (momentum 0.9) as in the official
trainer, and the grid with the lowest hard loss on held-out noises is kept.

The sampler backpropagated through is DPM-Solver++ multistep (data prediction, diffusers' "midpoint" 2M and 3M with
``lower_order_final``), written here in torch with the grid as a tensor. The model's dependence on its time input
enters the gradient through a central difference (``TIME_DELTA`` timesteps), so any ``model(x, t)`` works, also
ones whose time input is not differentiable (the analytic ``gmm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .adjoint import model_output
from .base import eps_from_model_output
from .learned_grid import check_sigmas
from .schedule import NoiseScheduleVP

TIME_DELTA = 0.5
"""Half-width, in training timesteps, of the central difference for ``d model / d t``."""


class LambdaGrid(torch.nn.Module):
    """LD3's parametrisation of an ``n``-step grid from ``lambda_T`` towards ``lambda_end``, last step to sigma 0."""

    def __init__(self, schedule: NoiseScheduleVP, sigmas, t_max: float | None = None):
        super().__init__()
        rhos = check_sigmas(sigmas)
        if rhos[-1] != 0:
            raise ValueError("LD3 grids end at sigma 0; pass an initial grid whose last sigma is 0.")
        self.schedule = schedule
        self.lambda_T = float(schedule.lambda_t(schedule.t_max if t_max is None else t_max))
        self.lambda_end = float(schedule.lambdas[0])  # t = 0
        lam = np.concatenate([[self.lambda_T], -np.log(rhos[1:-1]), [self.lambda_end]])  # (n + 1,)
        steps = np.diff(lam)
        if np.any(steps <= 0):
            raise ValueError(
                f"initial grid must lie strictly inside lambda({self.lambda_T:.3f}, {self.lambda_end:.3f})."
            )
        self.xi = torch.nn.Parameter(torch.from_numpy(np.log(steps)))  # (n,)
        lambdas = torch.from_numpy(schedule.lambdas[::-1].copy())  # (N,) increasing
        self.register_buffer("lambdas_up", lambdas)
        self.register_buffer("times_up", torch.arange(len(lambdas) - 1, -1, -1, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        """The ``n`` lambdas where the model is evaluated: (n,) float64, increasing, ``lambda_T`` first."""
        fractions = torch.cumsum(torch.softmax(self.xi, dim=0), dim=0)[:-1]  # (n - 1,)
        interior = self.lambda_T + (self.lambda_end - self.lambda_T) * fractions
        return torch.cat([interior.new_tensor([self.lambda_T]), interior])

    def times(self, lam: torch.Tensor) -> torch.Tensor:
        """Differentiable inverse of the schedule's piecewise-linear ``lambda(t)`` (``t_of_lambda``)."""
        k = torch.searchsorted(self.lambdas_up, lam.detach()).clamp(1, len(self.lambdas_up) - 1)
        l0, l1 = self.lambdas_up[k - 1], self.lambdas_up[k]
        t0, t1 = self.times_up[k - 1], self.times_up[k]
        return t0 + (lam - l0) / (l1 - l0) * (t1 - t0)

    def sigmas(self) -> np.ndarray:
        """The current grid as diffusers sigmas (n + 1,), last 0."""
        with torch.no_grad():
            return np.concatenate([np.exp(-self().numpy()), [0.0]])


def model_with_time_gradient(model: Callable, x: torch.Tensor, t: torch.Tensor, t_max: float) -> torch.Tensor:
    """``model(x, t)``, differentiable in ``x`` by autograd and in ``t`` by a central difference of the output
    (clipped to ``[0, t_max]``)."""
    t0 = t.detach()
    out = model_output(model, x, t0.float()).to(x.dtype)
    if not t.requires_grad:
        return out
    with torch.no_grad():
        t_up, t_down = (t0 + TIME_DELTA).clamp(max=t_max), (t0 - TIME_DELTA).clamp(min=0)
        up = model_output(model, x, t_up.float()).to(x.dtype)
        down = model_output(model, x, t_down.float()).to(x.dtype)
        slope = (up - down) / float(t_up - t_down)
    return out + (t - t0).to(x.dtype) * slope


def dpm_solver_pp_sample(
    model: Callable, grid: LambdaGrid, x_T: torch.Tensor, order: int = 2, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Multistep DPM-Solver++ from ``x_T`` (B, ...) over ``grid``, differentiable in the grid and in ``x_T``.

    Lu et al. 2022b, Alg. 2 ("midpoint" second order) and its third-order extension; orders warm up from 1, the
    step before last is at most second order and the last step goes to sigma 0 (returns the data prediction).
    """
    lam = grid()  # (n,)
    times = grid.times(lam)
    n = len(lam)
    alphas, sigmas = torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()  # (n,) each
    x, history = x_T, []
    for i in range(n):
        a, s = alphas[i].to(x.dtype), sigmas[i].to(x.dtype)
        out = model_with_time_gradient(model, x, times[i], grid.schedule.t_max)
        eps = eps_from_model_output(out, x, a, s, prediction_type)
        history = [(x - s * eps) / a] + history[:2]  # data predictions, newest first
        if i == n - 1:
            return history[0]
        k = min(order, i + 1, 2 if i == n - 2 else order)
        h = (lam[i + 1] - lam[i]).to(x.dtype)
        phi1 = torch.expm1(-h)
        a_t, s_t = alphas[i + 1].to(x.dtype), sigmas[i + 1].to(x.dtype)
        x_next = (s_t / s) * x - a_t * phi1 * history[0]
        if k >= 2:
            r0 = ((lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])).to(x.dtype)
            d1_0 = (history[0] - history[1]) / r0
            if k == 2:
                x_next = x_next - 0.5 * a_t * phi1 * d1_0
            else:
                r1 = ((lam[i - 1] - lam[i - 2]) / (lam[i + 1] - lam[i])).to(x.dtype)
                d1_1 = (history[1] - history[2]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                x_next = x_next + a_t * phi2 * d1 - a_t * phi3 * d2
        x = x_next
    return x


def ld3_grid(
    model: Callable,
    model_config: dict,
    init_sigmas,
    x_T: torch.Tensor,
    target: torch.Tensor,
    x_val: torch.Tensor,
    target_val: torch.Tensor,
    order: int = 2,
    radius: float = 0.1,
    num_epochs: int = 8,
    batch_size: int = 25,
    lr: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Learn an ``n``-step grid (``n = len(init_sigmas) - 1``) for DPM-Solver++(``order``M); returns (sigmas, info).

    ``x_T`` (B, ...) training noises and ``target`` their teacher end points; ``x_val`` / ``target_val`` held-out
    noises that choose the best grid seen (checked after every minibatch). ``radius``: RMS radius of LD3's ball
    around each training noise (0 = hard loss). ``info`` has the validation MSE of the initial and the chosen grid.
    """
    schedule = NoiseScheduleVP.from_config(model_config)
    kind = model_config.get("prediction_type", "epsilon")
    grid = LambdaGrid(schedule, init_sigmas)
    optimizer = torch.optim.RMSprop(grid.parameters(), lr=lr, momentum=0.9)
    x_start = x_T.clone()  # LD3's perturbed starts x', inside the ball around x_T
    dim = x_T[0].numel()
    generator = torch.Generator().manual_seed(seed)

    def validate() -> float:
        with torch.no_grad():
            return (dpm_solver_pp_sample(model, grid, x_val, order, kind) - target_val).pow(2).mean().item()

    best = (validate(), grid.sigmas())
    initial = best[0]
    for _ in range(num_epochs):
        for idx in torch.randperm(len(x_T), generator=generator).split(batch_size):
            start = x_start[idx].clone().requires_grad_(radius > 0)
            sample = dpm_solver_pp_sample(model, grid, start, order, kind)
            loss = (sample - target[idx]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(grid.parameters(), 1.0)
            optimizer.step()
            if radius > 0:  # one normalised gradient step on x', then back into the ball
                with torch.no_grad():
                    g = start.grad.reshape(len(idx), -1)
                    step = g / g.norm(dim=1, keepdim=True).clamp(min=1e-30) * radius * math.sqrt(dim) / 4
                    moved = start.reshape(len(idx), -1) - step - x_T[idx].reshape(len(idx), -1)
                    scale = (radius * math.sqrt(dim) / moved.norm(dim=1, keepdim=True).clamp(min=1e-30)).clamp(max=1)
                    x_start[idx] = (x_T[idx].reshape(len(idx), -1) + moved * scale).reshape(start.shape)
            val = validate()
            if val < best[0]:
                best = (val, grid.sigmas())
    info = dict(
        method=f"LD3 (RMSprop through DPM-Solver++({order}M), ball radius {radius:g})",
        val_mse_initial=initial,
        val_mse=best[0],
        n_noises=int(len(x_T)),
        n_val=int(len(x_val)),
        num_epochs=num_epochs,
        lr=lr,
        radius=radius,
    )
    return best[1], info
