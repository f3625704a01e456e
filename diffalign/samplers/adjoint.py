"""AdjointDPM: gradients of a loss on the sample with respect to x_T, conditioning and weights (Pan et al., ICLR 2024).

``adjoint_sample`` samples with a multistep DPM-Solver(++) under ``no_grad`` and, in the backward pass, solves the
adjoint of the probability-flow ODE on the reversed grid, one model vector-Jacobian product (VJP) per step, so that
no UNet activation outlives its step and memory does not grow with the number of function evaluations (NFE).

Exponential-integrator form of the adjoint (the paper's reparameterisation, Sec. 3.2). A DPM-Solver step from
grid point ``i`` to ``i + 1`` is linear in the state and in the model terms ``m_j`` (x0 for DPM-Solver++, eps for
DPM-Solver), ``x_{i+1} = c_i x_i + sum_k w_{i,k} m_{i-k}`` with ``c_i = sigma_{i+1} / sigma_i`` (data form). Its
adjoint runs the same integrator backwards,

    a_i = c_i a_{i+1} + J_i^T g_i,      g_i = sum_k w_{i+k,k} a_{i+k+1},      J_i = d m_i / d x_i,

and the conditioning / weight gradients collect ``(d m_i / d c)^T g_i``. This is DPM-Solver's exponential
integrator applied to the adjoint ODE ``da/dlambda = alpha^2 a - alpha J^T a`` with the same weights. Two ways to
get the states ``x_i`` it needs (``trajectory=``):

- ``"store"`` (default): keep the ``n + 1`` states of the forward solve, one latent each (16 KB for a 4x32x32
  float32 latent), and recompute each step's VJP there. The gradient is exactly that of the discrete sampler.
- ``"reconstruct"``: keep nothing but the state before the final jump to sigma 0 and integrate the augmented
  system (state, adjoint, parameter adjoints) backwards with the same multistep solver on the reversed grid, as in
  the paper (Eq. 9-11; the official code re-integrates with torchdiffeq). Memory is constant in NFE; the gradient
  carries the solver's ``O(h^order)`` error and converges to the continuous adjoint as NFE grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .adjoint_scheduler import AdjointDPMScheduler
from .exponential_integrator import DPMSolverBase, exponential_integrator_update, multistep_differences

TRAJECTORIES = ("store", "reconstruct")


def model_output(model: Callable, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """``model(x, t[, cond])`` unwrapped from diffusers' output objects to the raw (B, ...) tensor."""
    out = model(x, t) if cond is None else model(x, t, cond)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, tuple):
        out = out[0]
    return out


def step_weights(scheduler: DPMSolverBase, i: int, order: int) -> tuple[float, torch.Tensor]:
    """``(c_x, w)`` with ``x_{i+1} = c_x x_i + sum_k w[k] m_{i-k}`` for multistep step ``i`` of order ``order``.

    Obtained by running the solver's own update (``multistep_differences``, ``exponential_integrator_update``) on
    unit model terms, so the weights are those of DPM-Solver++ Alg. 2 / its 3M extension by construction.
    """
    lg = scheduler.lambda_grid
    lambdas = [lg[i + 1]] + [lg[i - k] for k in range(order)]
    basis = list(torch.eye(order, dtype=torch.float64))  # m_{i-k} = e_k
    D1, D2 = multistep_differences(basis, lambdas, order, scheduler.config.taylor_third_order)
    coeffs = scheduler.coefficients(*scheduler.grid_alpha_sigma(i, i + 1))
    midpoint = order == 2 and scheduler.solver_variant == "midpoint"
    w = exponential_integrator_update(torch.zeros(order, dtype=torch.float64), basis[0], coeffs, D1, D2, midpoint)
    return float(coeffs[0]), w  # (order,)


def _flatten(cond) -> tuple[list[torch.Tensor], Callable]:
    """Tensors of ``cond`` (None, a tensor, or a sequence of tensors) and a function that rebuilds it from them."""
    if cond is None:
        return [], lambda tensors: None
    if isinstance(cond, torch.Tensor):
        return [cond], lambda tensors: tensors[0]
    if isinstance(cond, Sequence) and all(isinstance(c, torch.Tensor) for c in cond):
        return list(cond), lambda tensors: type(cond)(tensors) if isinstance(cond, tuple) else list(tensors)
    raise TypeError(
        f"cond must be None, a tensor or a tuple/list of tensors, got {type(cond).__name__}; put other inputs "
        "(e.g. a guidance scale) into the model callable."
    )


def _as_scheduler(scheduler) -> DPMSolverBase:
    """A private multistep DPM-Solver(++) built from ``scheduler`` (ours, any diffusers scheduler, or a config)."""
    if isinstance(scheduler, DPMSolverBase):
        built = type(scheduler).from_config(scheduler.config)
    elif hasattr(scheduler, "config"):
        built = AdjointDPMScheduler.from_config(scheduler.config)
    elif isinstance(scheduler, Mapping):
        built = AdjointDPMScheduler.from_config(dict(scheduler))
    else:
        raise TypeError(
            f"scheduler must be a scheduler or a scheduler config dict, got {type(scheduler).__name__}; pass e.g. "
            "pipe.scheduler or AdjointDPMScheduler()."
        )
    if built.config.solver_mode != "multistep":
        raise ValueError(
            f"adjoint_sample needs a multistep solver, got solver_mode={built.config.solver_mode!r}; "
            "set solver_mode='multistep'."
        )
    return built


class _Trajectory:
    """The forward solve's grid and step weights, and the model term ``m_i`` as a differentiable function."""

    def __init__(self, model, scheduler: DPMSolverBase, rebuild_cond, dtype: torch.dtype):
        self.model, self.scheduler, self.rebuild_cond, self.dtype = model, scheduler, rebuild_cond, dtype
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.weights: list[tuple[float, torch.Tensor]] = []

    def model_output(self, x: torch.Tensor, i: int, cond_tensors) -> torch.Tensor:
        """The raw model output at ``x`` and grid point ``i`` (compute dtype), checked as ``scheduler.step`` does."""
        s = self.scheduler
        t = (
            s.timesteps[i]
            if i < len(s.timesteps)
            else torch.tensor(float(s.noise_schedule.t_of_lambda(s.lambda_grid[i])))
        )
        x_in = s.scale_model_input(x.to(self.dtype), t)
        out = model_output(self.model, x_in, t, self.rebuild_cond(cond_tensors))
        return s.check_model_output(out, x).to(self.compute_dtype)

    def model_term(self, x: torch.Tensor, i: int, cond_tensors) -> torch.Tensor:
        """``m_i(x)``: the data prediction for DPM-Solver++, the noise prediction for DPM-Solver."""
        out = self.model_output(x, i, cond_tensors)
        return self.scheduler.convert_model_output(out, x.to(self.compute_dtype), i)

    @torch.no_grad()
    def solve(self, x_T: torch.Tensor, cond_tensors, keep: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward DPM-Solver(++) through ``scheduler.step``; returns x_0 and the states that ``keep`` asks for."""
        s, cond = self.scheduler, self.rebuild_cond(cond_tensors)
        x, states = x_T * s.init_noise_sigma, []
        n = s.num_inference_steps
        for i, t in enumerate(s.timesteps):
            if keep == "store" or (i == n - 1 and s.sigma_grid[-1] == 0):
                states.append(x)
            x_in = s.scale_model_input(x, t)
            x = s.step(model_output(self.model, x_in, t, cond), t, x).prev_sample
            self.weights.append(step_weights(s, i, s.multistep_order(i)))
        return x, states


def _vjp(m: torch.Tensor, inputs: list[torch.Tensor], cotangent: torch.Tensor, retain: bool = False):
    grads = torch.autograd.grad(m, inputs, cotangent, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


def _discrete_adjoint(traj: _Trajectory, states, a_n, cond_tensors, params):
    """Adjoint of the stored forward steps, newest first: ``a_i = c_i a_{i+1} + J_i^T g_i`` (module docstring)."""
    n = len(traj.weights)
    a = a_n.to(traj.compute_dtype)
    pending = [torch.zeros_like(a) for _ in range(n)]  # g_i, the cotangent of m_i, filled by steps i .. i + order
    grads = [torch.zeros_like(p, dtype=traj.compute_dtype) for p in cond_tensors + params]
    for i in range(n - 1, -1, -1):
        c_x, w = traj.weights[i]
        for k, w_k in enumerate(w.tolist()):
            pending[i - k] = pending[i - k] + w_k * a
        with torch.enable_grad():
            x = states[i].detach().to(traj.compute_dtype).requires_grad_(True)
            cond_leaves = [c.detach().requires_grad_(c.requires_grad) for c in cond_tensors]
            m = traj.model_term(x, i, cond_leaves)
            vjps = _vjp(m, [x] + _needing_grad(cond_leaves) + _needing_grad(params), pending[i])
        a = c_x * a + vjps[0]
        _accumulate(grads, vjps[1:], cond_leaves + params)
        pending[i] = None
    return a, grads


def _reconstructed_adjoint(traj: _Trajectory, x_end, last_state, a_n, cond_tensors, params):
    """The paper's backward pass: re-integrate state and adjoints from the clean end on the reversed grid.

    The adjoint of the probability-flow ODE ``dx/dlambda = sigma^2 x - sigma eps`` (Pan et al. 2024, Sec. 3.2, written
    in lambda) is ``da/dlambda = -sigma^2 a + sigma (d eps/dx)^T a`` with weight and conditioning adjoints
    ``dA/dlambda = sigma (d eps/dtheta)^T a``, ``A = 0`` at the clean end and ``dL/dtheta = A`` at the noise end.
    Its right-hand side is bounded at both ends, so ``a`` and ``A`` take the solver's multistep update without a
    linear term (the ``h -> 0`` limit of the phi functions: ``h G + h D_1 / 2 + h D_2 / 6``); the state goes back
    with the forward solver's own exponential-integrator update. Each reversed step ``j -> j - 1`` uses the newest
    ``solver_order`` points of the backward pass, one model VJP each. The final jump to sigma 0
    (``x_n = m_{n-1}(x_{n-1})``) is undone exactly from the one stored state ``last_state``.
    """
    s, cd = traj.scheduler, traj.compute_dtype
    n = len(traj.weights)
    cond_leaves = [c.detach().requires_grad_(c.requires_grad) for c in cond_tensors]
    inputs = _needing_grad(cond_leaves) + _needing_grad(params)
    a, start, x = a_n.to(cd), n, x_end.to(cd)
    if s.sigma_grid[-1] == 0:
        start, x = n - 1, last_state.to(cd)
    A = [torch.zeros_like(p, dtype=cd) for p in inputs]
    history: list[list[torch.Tensor]] = []  # newest first: [m, da/dlambda, *dA/dlambda] at backward grid points
    for j in range(start, 0, -1):  # reversed step from grid point j to j - 1
        with torch.enable_grad():
            xl = x.detach().requires_grad_(True)
            out = traj.model_output(xl, j, cond_leaves)
            m = s.convert_model_output(out, xl, j)
            eps = s.x0_and_eps(out, xl, j)[1]
            if j == n - 1 and start == n - 1:  # adjoint of the jump x_n = w m_{n-1}(x_{n-1}): no x_{n-1} term
                vjps = _vjp(m, [xl] + inputs, a * float(traj.weights[j][1][0]), retain=True)
                a, A = vjps[0], [acc + v for acc, v in zip(A, vjps[1:], strict=True)]
            vjps = _vjp(eps, [xl] + inputs, a)
        sigma = float(s.sigma_grid[j])
        G = [sigma * vjps[0] - sigma**2 * a] + [sigma * v for v in vjps[1:]]  # d[a, A]/dlambda at lambda_j
        history = ([[m.detach()] + G] + history)[: s.config.solver_order]
        order = len(history)
        lambdas = [s.lambda_grid[j - 1]] + [s.lambda_grid[j + k] for k in range(order)]
        midpoint = order == 2 and s.solver_variant == "midpoint"
        h = lambdas[0] - lambdas[1]  # < 0: the backward pass runs towards the noise
        taylor3 = s.config.taylor_third_order
        coeffs = s.coefficients(*s.grid_alpha_sigma(j, j - 1))

        x = _multistep(x, [hist[0] for hist in history], lambdas, coeffs, midpoint, taylor3)
        adams = (1.0, -h, -h / 2, -h / 6)  # the update's h -> 0 limit: int G = h G + h D1 / 2 + h D2 / 6
        a = _multistep(a, [hist[1] for hist in history], lambdas, adams, midpoint, taylor3)
        A = [
            _multistep(acc, [hist[2 + k] for hist in history], lambdas, adams, midpoint, taylor3)
            for k, acc in enumerate(A)
        ]
    a_0 = a
    grads = [torch.zeros_like(p, dtype=cd) for p in cond_tensors + params]
    _accumulate(grads, A, cond_leaves + params)
    return a_0, grads


def _multistep(base, terms, lambdas, coeffs, midpoint: bool, taylor_third_order: bool) -> torch.Tensor:
    """One multistep update of ``base`` from ``terms`` (newest first) at ``lambdas = [lambda_t, lambda_s0, ...]``."""
    D1, D2 = multistep_differences(terms, lambdas, len(terms), taylor_third_order)
    return exponential_integrator_update(base, terms[0], coeffs, D1, D2, midpoint)


def _needing_grad(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in tensors if t.requires_grad]


def _accumulate(grads: list[torch.Tensor], vjps: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
    """Add ``vjps`` (one per tensor of ``tensors`` that requires grad, in order) into ``grads`` in place."""
    it = iter(vjps)
    for k, t in enumerate(tensors):
        if t.requires_grad:
            grads[k] = grads[k] + next(it)


class _AdjointDPM(torch.autograd.Function):
    """Forward: DPM-Solver(++) under no_grad. Backward: the adjoint solve (``trajectory`` picks how, see above)."""

    @staticmethod
    def forward(ctx, traj: _Trajectory, trajectory: str, num_cond: int, x_T, *tensors):
        cond_tensors = list(tensors[:num_cond])
        x_0, states = traj.solve(x_T, cond_tensors, trajectory)
        ctx.traj, ctx.trajectory, ctx.states, ctx.x_0 = traj, trajectory, states, x_0
        ctx.cond_tensors, ctx.params = cond_tensors, list(tensors[num_cond:])  # leaves: kept as they are
        return x_0

    @staticmethod
    def backward(ctx, grad_x0):
        needs = ctx.needs_input_grad[4:]
        cond = [c.detach().requires_grad_(need) for c, need in zip(ctx.cond_tensors, needs, strict=False)]
        if ctx.trajectory == "store":
            a_T, grads = _discrete_adjoint(ctx.traj, ctx.states, grad_x0, cond, ctx.params)
        else:
            last = ctx.states[-1] if ctx.states else None
            a_T, grads = _reconstructed_adjoint(ctx.traj, ctx.x_0, last, grad_x0, cond, ctx.params)
        ctx.states = ctx.x_0 = None
        a_T = a_T * ctx.traj.scheduler.init_noise_sigma
        tensors = ctx.cond_tensors + ctx.params
        out = [g.to(t.dtype) if need else None for g, t, need in zip(grads, tensors, needs, strict=True)]
        return (None, None, None, a_T.to(grad_x0.dtype) if ctx.needs_input_grad[3] else None, *out)


def adjoint_sample(
    model: Callable,
    x_T: torch.Tensor,
    scheduler,
    num_inference_steps: int = 20,
    cond=None,
    params: Iterable[torch.Tensor] | None = None,
    trajectory: str = "store",
) -> torch.Tensor:
    """Sample x_0 (B, ...) from ``x_T`` with a multistep DPM-Solver(++); ``x_0.backward()`` runs AdjointDPM.

    Args:
        model: ``model(x, t)`` or, with ``cond``, ``model(x, t, cond)`` returning the raw output (tensor or diffusers
            output object) that ``scheduler.config.prediction_type`` describes (eps, v or x0). Classifier-free
            guidance belongs inside it (``diffalign.models.adapters.GuidedUNet``).
        x_T: starting noise (B, ...); gradients flow to it when it requires grad.
        scheduler: a ``DPMSolverPPScheduler`` / ``DPMSolverScheduler`` / ``AdjointDPMScheduler`` (multistep), or any
            diffusers scheduler or config dict, which becomes an ``AdjointDPMScheduler`` with the same noise schedule.
            A private copy is used, so the caller's scheduler is left as it was.
        num_inference_steps: NFE of the forward solve (the backward pass costs the same number of VJPs).
        cond: conditioning passed to ``model`` (a tensor, e.g. prompt embeddings (B, L, D), or a tuple of tensors);
            each tensor that requires grad gets a gradient.
        params: the weights to differentiate (e.g. LoRA parameters). Default: the ``requires_grad`` parameters of
            ``model`` when it is an ``nn.Module``, else none. Parameters not listed get no gradient.
        trajectory: ``"store"`` (exact gradient of the discrete sampler, keeps one latent per step) or
            ``"reconstruct"`` (constant memory, re-integrates the trajectory backwards; see the module docstring).
    """
    if not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}.")
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory={trajectory!r}; use one of {TRAJECTORIES}.")
    sched = _as_scheduler(scheduler)
    sched.set_timesteps(num_inference_steps, device=x_T.device)
    cond_tensors, rebuild = _flatten(cond)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    params = list(params)
    if any(not isinstance(p, torch.Tensor) for p in params):
        raise TypeError(
            "params must be an iterable of tensors (e.g. [p for p in unet.parameters() if p.requires_grad])."
        )
    traj = _Trajectory(model, sched, rebuild, x_T.dtype)
    return _AdjointDPM.apply(traj, trajectory, len(cond_tensors), x_T, *cond_tensors, *params)
