"""Calibrating DC-Solver's compensation ratios on a few datapoints (Zhao et al. 2024, ECCV, Sec. 3.3 and Alg. 1).

For ``n_datapoints`` fixed starting noises, an accurate solution of the probability-flow ODE is recorded at every
grid point of the ``n``-step grid (the ground-truth trajectory). Then one DC-Solver run goes down the grid; at each
step ``i >= dc_order`` the ratio ``rho_i`` is searched greedily: compensate with ``rho_i``, predict to ``t_{i+1}``,
evaluate the model there (with gradients through it), correct, and minimise the mean squared distance of that
``x^c_{i+1}`` to the ground truth with Adam; then fix ``rho_i`` and continue. Sampling afterwards costs no extra NFE.

The model is any callable ``model(x, t) -> output`` (diffusers output objects are unwrapped) whose output is the
scheduler's ``prediction_type``; classifier-free guidance belongs inside it (one calibration per guidance scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .adjoint import model_output
from .base import VPScheduler
from .config import MODEL_KEYS
from .dc_cpr import fit_cpr
from .dc_solver import DCSolverScheduler
from .dpm_solver_pp import DPMSolverPPScheduler
from .side_info import model_fingerprint

REFERENCE_SOLVER = dict(solver_order=3, taylor_third_order=True, lower_order_final=False, final_sigmas_type="zero")
"""The ground-truth solver: third-order DPM-Solver++ (3M) on a fine grid through every calibration grid point."""


def _fine_rhos(rhos: np.ndarray, substeps: int) -> tuple[np.ndarray, list[int]]:
    """A fine grid of diffusers sigmas through every coarse point, log-uniform within each interval; a last interval
    ending at 0 is refined down to ``1e-4`` of its start first. Returns (fine rhos, index of each coarse point)."""
    fine, index = [], []
    for k in range(len(rhos) - 1):
        index.append(len(fine))
        end = rhos[k + 1] if rhos[k + 1] > 0 else rhos[k] * 1e-4
        fine.extend(np.geomspace(rhos[k], end, substeps + 1)[:-1].tolist())
        if rhos[k + 1] == 0:
            fine.append(end)
    fine.append(float(rhos[-1]))
    index.append(len(fine) - 1)
    return np.asarray(fine), index


@torch.no_grad()
def reference_trajectory(model: Callable, scheduler: DCSolverScheduler, x_T: torch.Tensor, substeps: int = 40):
    """The ODE solution from ``x_T`` at each of ``scheduler``'s grid points (after ``set_timesteps``): (n + 1) tensors.

    DPM-Solver++(3M) with ``substeps`` log-uniform steps per interval: its error at NFE ~ ``40 n`` is far below
    any few-step sampler's, so it stands in for the exact solution (``diffalign.evaluation.reference`` has dopri5).
    """
    rhos = scheduler.sigma_grid / scheduler.alpha_grid  # (n + 1,) float64, last may be 0
    fine, index = _fine_rhos(rhos, substeps)
    model_config = {k: v for k, v in scheduler.config.items() if k in MODEL_KEYS}
    solver = DPMSolverPPScheduler(**model_config, **REFERENCE_SOLVER)
    solver.set_timesteps(sigmas=fine.tolist())
    states, x = [x_T], x_T
    for k, t in enumerate(solver.timesteps):
        x = solver.step(model_output(model, x, t), t, x).prev_sample
        if k + 1 in index:
            states.append(x)
    return states


def search_ratio(model, scheduler: DCSolverScheduler, i: int, x, out, target, num_iters: int, lr: float) -> float:
    """The greedy search of step ``i`` (DC-Solver Alg. 1): the ratio whose ``x^c_{i+1}`` is closest to ``target``.

    ``x`` is the sample at grid point ``i`` (before correction), ``out`` the model output there; ``scheduler`` holds
    the run's state up to step ``i``. Adam on ``rho`` from 1; returns the ratio with the lowest loss seen.
    """
    x_c, history = scheduler.correct_and_buffer(out, x, i)
    order = scheduler.predictor_order(i)
    n = scheduler.num_inference_steps
    t_next = scheduler.timesteps[i + 1] if i + 1 < n else None

    def loss_of(rho: torch.Tensor) -> torch.Tensor:
        compensated = history[:-1] + [scheduler.dynamic_compensation(history, i, rho)]
        x_next = scheduler.multistep_uni_p_bh_update(x_c, compensated, i, order)
        if t_next is not None and scheduler.uses_corrector(i + 1):
            out_next = model_output(model, x_next, t_next).to(x_next.dtype)
            m_next = scheduler.convert_model_output(out_next, x_next, i + 1)
            x_next = scheduler.multistep_uni_c_bh_update(m_next, i + 1, compensated, x_c, order)
        return (x_next - target).pow(2).mean()

    rho = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([rho], lr=lr)
    best = (math.inf, 1.0)
    with torch.enable_grad():
        for _ in range(num_iters):
            optimizer.zero_grad()
            loss = loss_of(rho)
            best = min(best, (loss.item(), rho.item()))
            loss.backward()
            optimizer.step()
        best = min(best, (loss_of(rho).item(), rho.item()))
    return best[1]


def calibrate_ratios(
    model: Callable,
    scheduler: DCSolverScheduler,
    nfe: int,
    x_T: torch.Tensor,
    num_iters: int = 60,
    lr: float = 0.05,
    substeps: int = 40,
) -> tuple[list[float], dict]:
    """Ratios for one NFE, searched on the starting noises ``x_T`` (B, ...); returns (ratios, losses per step).

    ``losses``: ``ratio1`` and ``dc``, the searched step's distance to the ground truth with rho = 1 and with the
    chosen rho (diagnostics for the calibration log).
    """
    VPScheduler.set_timesteps(scheduler, nfe)  # the grid only: no ratio lookup, no fallback warning
    target = reference_trajectory(model, scheduler, x_T, substeps)
    ratios = [1.0] * scheduler.num_inference_steps
    scheduler.dc_ratios = ratios
    x = x_T
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            out = model_output(model, x, t).to(x.dtype)
        if scheduler.can_compensate(i):
            ratios[i] = search_ratio(model, scheduler, i, x, out, target[i + 1].to(x.dtype), num_iters, lr)
        with torch.no_grad():
            x = scheduler.step(out, t, x).prev_sample
    final_error = (x.double() - target[-1].double()).pow(2).mean().item()
    return ratios, {"final_mse": final_error}


def calibrate_dc(
    model: Callable,
    scheduler: DCSolverScheduler | dict | None = None,
    nfe: int | Sequence[int] = (5, 6, 8, 10),
    guidance_scale: float = 1.0,
    *,
    sample_shape: Sequence[int],
    n_datapoints: int = 10,
    seed: int = 0,
    num_iters: int = 60,
    lr: float = 0.05,
    substeps: int = 40,
    fingerprint: str | torch.nn.Module | None = None,
    cpr: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DCSolverScheduler:
    """Calibrate DC-Solver ratios for each ``nfe`` at ``guidance_scale`` and add them to ``scheduler``'s table.

    ``scheduler``: a ``DCSolverScheduler`` (its ratios table is extended), any scheduler or config (the model's
    noise schedule is taken from it), or None (defaults). ``model(x, t)`` must already apply ``guidance_scale``. The
    starting noises are ``n_datapoints`` draws of ``sample_shape`` (the model's sample shape, e.g. (C, H, W)) from
    ``torch.Generator().manual_seed(seed)`` (made on CPU, then moved to ``device``), so the result is deterministic.
    With ``cpr`` and >= 3 NFE values in the table, CPR coefficients are (re)fitted. Save with
    ``scheduler.save_pretrained(folder)``.
    """
    if scheduler is None or not isinstance(scheduler, DCSolverScheduler):
        source = {} if scheduler is None else dict(getattr(scheduler, "config", scheduler))
        config = {k: v for k, v in source.items() if k in MODEL_KEYS}
        scheduler = DCSolverScheduler(**config, guidance_scale=guidance_scale)
    if fingerprint is not None:
        scheduler.register_to_config(model_fingerprint=model_fingerprint(fingerprint))
    nfes = [nfe] if isinstance(nfe, int) else list(nfe)
    if n_datapoints < 1 or not nfes or min(nfes) < 1:
        raise ValueError(f"need n_datapoints >= 1 and NFE values >= 1, got {n_datapoints} and {nfes}.")
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n_datapoints, *sample_shape), generator=generator, dtype=torch.float64).to(device, dtype)
    log = dict(scheduler.calibration_info.get("settings", {}))
    for n in nfes:
        ratios, info = calibrate_ratios(model, scheduler, n, x_T, num_iters, lr, substeps)
        scheduler.set_dc_ratios(n, ratios, guidance_scale)
        log[f"nfe={n},guidance_scale={float(guidance_scale):g}"] = info
    scheduler.calibration_info = dict(
        method="greedy per-step search (DC-Solver Alg. 1), Adam on rho from 1",
        reference=f"DPM-Solver++(3M), {substeps} log-uniform substeps per interval",
        n_datapoints=n_datapoints,
        seed=seed,
        num_iters=num_iters,
        lr=lr,
        settings=log,
    )
    if cpr and len({n for n, _ in scheduler.ratio_table}) >= 3:
        fit_cpr_coefficients(scheduler)
    scheduler.set_timesteps(nfes[0])  # leave a fresh state behind
    return scheduler


def fit_cpr_coefficients(scheduler: DCSolverScheduler, exclude: Sequence[tuple[int, float]] = ()) -> np.ndarray:
    """Fit CPR to the scheduler's calibrated ratios (minus ``exclude``d settings) and store it; returns (4, 3, 3)."""
    settings = [(n, g, r) for (n, g), r in sorted(scheduler.ratio_table.items()) if (n, g) not in set(exclude)]
    scheduler.cpr_coeffs = fit_cpr(settings, scheduler.config.dc_order)
    return scheduler.cpr_coeffs
