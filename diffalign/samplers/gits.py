"""GITS: a time grid found by dynamic programming over a fine candidate grid (Chen et al., ICML 2024, "On the
Trajectory Regularity of ODE-based Diffusion Sampling", Sec. 5; official code zju-pi/diff-sampler, ``gits-main``).

Training-free. A few accurate ("teacher") trajectories are recorded at the ``M + 1`` points of a fine candidate
grid. The cost of jumping from candidate ``i`` to candidate ``j > i`` is the distance between the teacher state at
``j`` and one first-order (DDIM / Euler) step from the teacher state at ``i``: ``C[i, j] = E_b ||x_j - x^_{i->j}||``.
Because the trajectories are nearly straight, this local error is a good proxy for any solver's, and the path
``0 = i_0 < i_1 < ... < i_n = M`` with the least accumulated cost ``sum_k C[i_k, i_{k+1}]`` is found exactly by
dynamic programming (``dp_grid``). As in the official code, a discount ``coeff`` on the cost-to-go gives a family of
grids; ``gits_grid`` picks the member with the least end-point error of the solver that will use it.

The model is any callable ``model(x, t) -> output`` of the scheduler config's ``prediction_type`` (classifier-free
guidance inside it); teacher trajectories may be given as a tensor or are computed with ``teacher_trajectory``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .adjoint import model_output
from .base import eps_from_model_output
from .config import MODEL_KEYS
from .dc_calibrate import reference_trajectory
from .dpm_solver_pp import DPMSolverPPScheduler
from .learned_grid import integer_grid, set_grid
from .schedule import NoiseScheduleVP, alpha_sigma_from_rho, time_grid

COEFFS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)
"""Cost-to-go discounts tried by ``gits_grid`` (the official code's list for its multi-coefficient output)."""


def candidate_sigmas(schedule: NoiseScheduleVP, num_candidates: int = 80, integer: bool = False) -> np.ndarray:
    """``num_candidates + 1`` decreasing sigmas: EDM's polynomial (rho = 7) grid from ``t_max`` to ``t = 0`` (the
    official default teacher schedule), then 0. ``integer``: moved to integer timesteps, duplicates dropped (for
    diffusers' schedulers, which evaluate the model at integer timesteps)."""
    times = time_grid(schedule, num_candidates - 1, spacing="karras")  # (M,) from t_max to 0
    if integer:
        times = np.unique(np.round(times))[::-1]
    return np.concatenate([schedule.rho(times), [0.0]])


def teacher_trajectory(model: Callable, model_config: dict, x_T: torch.Tensor, sigmas, substeps: int = 8):
    """The ODE solution from ``x_T`` (B, ...) at every point of ``sigmas``: (M + 1, B, ...), float64.

    DPM-Solver++(3M) with ``substeps`` log-uniform sub-steps per candidate interval (``dc_calibrate``'s reference).
    """
    solver = DPMSolverPPScheduler(**{k: v for k, v in dict(model_config).items() if k in MODEL_KEYS})
    solver.set_timesteps(sigmas=list(sigmas))
    return torch.stack([s.double() for s in reference_trajectory(model, solver, x_T.double(), substeps)])


@torch.no_grad()
def local_error_costs(
    model: Callable, model_config: dict, trajectory: torch.Tensor, sigmas, metric: str = "l2"
) -> np.ndarray:
    """``C[i, j]`` (M + 1, M + 1), ``inf`` for ``j <= i``: mean over the batch of the ``metric`` ('l2' or 'l1') norm
    between the teacher at ``j`` and a DDIM step from the teacher at ``i`` (one model call per candidate).

    DDIM in ``y = x / alpha``, ``rho = sigma / alpha``: ``y_j = y_i + (rho_j - rho_i) eps(x_i)`` (GITS's Euler step
    in EDM's variables).
    """
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric={metric!r}; use 'l1' or 'l2'.")
    rhos = np.asarray(sigmas, dtype=np.float64)
    schedule = NoiseScheduleVP.from_config(model_config)
    alphas, sigmas_vp = alpha_sigma_from_rho(rhos)  # (M + 1,) each
    M = len(rhos) - 1
    flat = trajectory.reshape(M + 1, trajectory.shape[1], -1)  # (M + 1, B, D)
    costs = np.full((M + 1, M + 1), np.inf)
    p = 2 if metric == "l2" else 1
    kind = model_config.get("prediction_type", "epsilon")
    for i in range(M):
        x = trajectory[i]
        t = torch.tensor(float(schedule.t_of_lambda(-np.log(rhos[i]))))
        out = model_output(model, x.to(torch.float32), t).double()
        eps = eps_from_model_output(out, x, float(alphas[i]), float(sigmas_vp[i]), kind).reshape(x.shape[0], -1)
        y_i = flat[i] / alphas[i]  # (B, D)
        ahead = torch.from_numpy(rhos[i + 1 :] - rhos[i])[:, None, None]  # (M - i, 1, 1)
        x_hat = torch.from_numpy(alphas[i + 1 :])[:, None, None] * (y_i + ahead * eps)  # (M - i, B, D)
        costs[i, i + 1 :] = (x_hat - flat[i + 1 :]).norm(p=p, dim=-1).mean(dim=-1).numpy()
    return costs


def dp_grid(costs: np.ndarray, nfe: int, coeff: float = 1.0) -> list[int]:
    """The path ``0 = i_0 < ... < i_nfe = M`` minimising ``C[i_0, i_1] + coeff C[i_1, i_2] + coeff^2 ...``
    (exactly the plain sum for ``coeff = 1``); GITS's dynamic programme, vectorised over candidates.

    ``V[k][j]``: least discounted cost from candidate ``j`` to ``M`` in ``k`` steps;
    ``V[k][j] = min_{i > j} C[j, i] + coeff V[k-1][i]``.
    """
    costs = np.asarray(costs, dtype=np.float64)
    M = costs.shape[0] - 1
    if costs.shape != (M + 1, M + 1):
        raise ValueError(f"the cost matrix must be square, got shape {costs.shape}.")
    if not 1 <= nfe <= M:
        raise ValueError(f"nfe={nfe} steps need 1 <= nfe <= {M} (the number of candidate intervals).")
    lower = np.tril(np.ones_like(costs, dtype=bool))
    costs = np.where(lower, np.inf, costs)  # only forward jumps
    V = costs[:, M].copy()  # (M + 1,) one step to the end
    choice = []
    for _ in range(nfe - 1):
        total = costs + coeff * V[None, :]  # (M + 1, M + 1): from j via i
        total[:, M] = np.inf  # the end is reached in exactly the remaining steps
        choice.append(np.argmin(total, axis=1))
        V = total[np.arange(M + 1), choice[-1]]
    path = [0]
    for best in reversed(choice):
        path.append(int(best[path[-1]]))
    path.append(M)
    if not np.isfinite(V[0]):
        raise ValueError(f"no finite path of {nfe} steps through the cost matrix.")
    return path


@torch.no_grad()
def solve(model: Callable, scheduler, x_T: torch.Tensor, sigmas) -> torch.Tensor:
    """Sample from ``x_T`` with ``scheduler`` on the grid ``sigmas`` (ours or a diffusers scheduler)."""
    set_grid(scheduler, sigmas)
    x = x_T
    for t in scheduler.timesteps:
        out = model_output(model, scheduler.scale_model_input(x, t), t).to(x.dtype)
        x = scheduler.step(out, t, x).prev_sample
    return x


def gits_grid(
    model: Callable,
    scheduler,
    nfe: int,
    x_T: torch.Tensor,
    trajectory: torch.Tensor | None = None,
    candidates: np.ndarray | None = None,
    num_candidates: int = 80,
    coeffs: Sequence[float] = COEFFS,
    substeps: int = 8,
    metric: str = "l2",
    costs: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """The GITS grid for ``scheduler`` (ours or diffusers') at ``nfe`` steps, learned on the noises ``x_T`` (B, ...).

    ``trajectory`` (M + 1, B, ...): teacher states at ``candidates`` (computed when None). Returns ``(sigmas, info)``:
    the ``nfe + 1`` sigmas (last 0; at integer timesteps for diffusers' schedulers) and the cost and end-point MSE of
    each tried ``coeff``. ``costs``: ``local_error_costs`` of that trajectory, to reuse across solvers and NFEs
    (computed when None). Each ``coeff`` costs one solve of ``x_T``.
    """
    config = dict(scheduler.config)
    schedule = NoiseScheduleVP.from_config(config)
    ours = hasattr(scheduler, "learned_sigmas")
    if candidates is None:
        candidates = candidate_sigmas(schedule, num_candidates, integer=not ours)
    candidates = np.asarray(candidates, dtype=np.float64)
    if trajectory is None:
        trajectory = teacher_trajectory(model, config, x_T, candidates, substeps)
    if trajectory.shape[0] != len(candidates) or trajectory.shape[1:] != x_T.shape:
        raise ValueError(
            f"trajectory has shape {tuple(trajectory.shape)}, expected ({len(candidates)}, *{tuple(x_T.shape)})."
        )
    if costs is None:
        costs = local_error_costs(model, config, trajectory, candidates, metric)
    target = trajectory[-1]
    tried = {}
    for coeff in coeffs:
        path = dp_grid(costs, nfe, coeff)
        sigmas = candidates[path] if ours else integer_grid(schedule, candidates[path])
        mse = (solve(model, scheduler, x_T.to(torch.float32), sigmas).double() - target).pow(2).mean().item()
        tried[float(coeff)] = dict(
            mse=mse, cost=float(sum(costs[a, b] for a, b in zip(path[:-1], path[1:], strict=True))), sigmas=sigmas
        )
    best = min(tried, key=lambda c: tried[c]["mse"])
    info = dict(
        method="GITS (dynamic programming over DDIM local errors)",
        coeff=best,
        train_mse=tried[best]["mse"],
        num_candidates=len(candidates) - 1,
        n_noises=int(x_T.shape[0]),
        tried={str(c): dict(mse=v["mse"], cost=v["cost"]) for c, v in tried.items()},
    )
    return np.asarray(tried[best]["sigmas"]), info
