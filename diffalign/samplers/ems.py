"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, Sec. 3 and App. C): ``l``, ``s``, ``b``.

On a grid uniform in ``lambda`` from ``lambda(t_start)`` to ``lambda(t_end)`` (N + 1 points), with ``f = (sigma eps -
l x) / alpha`` (Eq. 5-6) and the model evaluated on forward-noised data ``x = alpha x_0 + sigma z``:

- ``l = E[diag(sigma d eps / d x)]``, the minimiser of ``E||grad_x (sigma eps - l x)||_F^2`` (Eq. 7), estimated with
  Hutchinson's trick ``E[v * (J v)]`` for Rademacher ``v``;
- ``s, b``: the elementwise least-squares fit ``f' ~ s f + b`` of the lambda-derivative of ``f`` along the ODE
  (Eq. 9), ``s = Cov(f, f') / Var(f)``, ``b = E[f'] - s E[f]``, with
  ``f' = e^{-lambda} ((l - 1) eps + d eps / d lambda) - l' x / alpha``.

Jacobian-vector products are central finite differences of two model calls (forward-mode AD does not run through
diffusers' UNets on CPU), and ``d eps / d lambda`` is the difference along the probability-flow ODE's tangent
``dx / d lambda = sigma^2 x - sigma eps``. ``l'`` is the grid's central difference smoothed by a moving average as
in the official code (11 points of a 1200-step grid, the same lambda width on other grids). Every grid point draws
its noise from its own seeded generator, so the result depends on the seed and the sample count, not on the batch
size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from .base import eps_from_model_output
from .config import PREDICTION_TYPES
from .schedule import NoiseScheduleVP, alpha_sigma_from_lambda
from .side_info import model_fingerprint, schedule_fingerprint

EMS_FILE = "dpm_solver_v3_ems"
EMS_FORMAT = 1
DEFAULT_GRID = 1200  # the official CIFAR-10 / EDM statistics use 1200 lambda steps
DEFAULT_SAMPLES = 4096  # ... and 4096 (or 1024) data samples
RIDGE = 1e-6  # relative ridge of the s, b regression, against float rounding where Var(f) ~ 0


def trapezoid_cumulative(values: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """``int_{lambda_0}^{lambda_i} values`` at every grid point by the trapezoid rule; (N + 1, ...) -> same shape."""
    steps = (lambdas[1:] - lambdas[:-1]).reshape((-1,) + (1,) * (values.ndim - 1))  # (N, 1, ...)
    areas = 0.5 * steps * (values[1:] + values[:-1])  # (N, ...)
    return torch.cat([torch.zeros_like(values[:1]), areas.cumsum(0)])


class EmpiricalModelStatistics:
    """EMS on their lambda grid, with the cumulative integrals the solver needs (official ``DPM_Solver_v3.__init__``).

    ``L = int l``, ``S = int s``, ``I = int e^{L+S}``, ``B = int e^{-S} b``, ``C = int e^{L+S} B``, all from the
    grid's first point, in float64. ``l, s, b``: (N + 1, C, H, W); ``lambdas``: (N + 1,) increasing.
    """

    def __init__(self, lambdas, l, s, b, meta: dict | None = None):
        self.lambdas = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)  # (N + 1,)
        self.l, self.s, self.b = (torch.as_tensor(v, dtype=torch.float64) for v in (l, s, b))  # (N + 1, C, H, W)
        self.meta = dict(meta or {})
        n = len(self.lambdas)
        if n < 2 or not bool(torch.all(self.lambdas[1:] > self.lambdas[:-1])):
            raise ValueError("EMS lambdas must be >= 2 strictly increasing values (the lambda grid of the solve).")
        for name, v in (("l", self.l), ("s", self.s), ("b", self.b)):
            if v.shape[0] != n or v.shape != self.l.shape:
                raise ValueError(f"EMS {name} has shape {tuple(v.shape)}; expected ({n}, *sample_shape) like l.")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"EMS {name} contains NaN or inf; recompute the statistics (diffalign ems).")
        lam = self.lambdas.reshape((-1,) + (1,) * (self.l.ndim - 1))
        self.L = trapezoid_cumulative(self.l, self.lambdas)
        self.S = trapezoid_cumulative(self.s, self.lambdas)
        self.I = trapezoid_cumulative(torch.exp(self.L + self.S), self.lambdas)
        self.B = trapezoid_cumulative(torch.exp(-self.S) * self.b, self.lambdas)
        self.C = trapezoid_cumulative(torch.exp(self.L + self.S) * self.B, self.lambdas)
        self._lam = lam
        self._high_order: dict[tuple[int, int, int], torch.Tensor] = {}

    @property
    def num_grid(self) -> int:
        return len(self.lambdas) - 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    def index_of(self, lam: np.ndarray) -> np.ndarray:
        """Nearest grid index of each lambda (the official ``convert_to_indexes``)."""
        lo, hi = float(self.lambdas[0]), float(self.lambdas[-1])
        return np.rint(self.num_grid * (np.asarray(lam, dtype=np.float64) - lo) / (hi - lo)).astype(np.int64)

    def high_order_coefficient(self, i_s: int, i_t: int, k: int) -> torch.Tensor:
        """``A_k = int_{lambda_s}^{lambda_t} e^{(L+S)(lambda) - (L+S)(lambda_s)} (lambda - lambda_s)^k / k!``."""
        key = (i_s, i_t, k)
        if key not in self._high_order:
            a = (self.L + self.S)[i_s : i_t + 1] - (self.L + self.S)[i_s]  # (m, C, H, W)
            lam = self._lam[i_s : i_t + 1] - self._lam[i_s]  # (m, 1, 1, 1)
            values = torch.exp(a) * lam**k / math.factorial(k)
            self._high_order[key] = trapezoid_cumulative(values, self.lambdas[i_s : i_t + 1])[-1]
        return self._high_order[key]

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b}
        store = torch.float64 if self.meta.get("dtype") == "float64" else torch.float32
        return {k: v.to(store) if k != "lambdas" else v for k, v in tensors.items()}, self.meta


def _eps_fn(model: Callable, prediction_type: str) -> Callable:
    """``eps(x, t, alpha, sigma)`` from a model of any diffusers prediction type."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; use one of {PREDICTION_TYPES}.")
    return lambda x, t, alpha, sigma: eps_from_model_output(model(x, t), x, alpha, sigma, prediction_type)


def _batched(fn, inputs: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """``fn`` over row-batches of equally long tensors, concatenated."""
    outs = [fn(*(v[i : i + batch_size] for v in inputs)) for i in range(0, inputs[0].shape[0], batch_size)]
    return torch.cat(outs)


class _Probe:
    """The model-derived quantities of one grid point, by finite differences of the noise prediction."""

    def __init__(self, eps_fn, schedule: NoiseScheduleVP, device, dtype, fd_step: float):
        self.eps_fn, self.schedule, self.device, self.dtype, self.fd_step = eps_fn, schedule, device, dtype, fd_step

    def eps(self, x: torch.Tensor, lam: float) -> torch.Tensor:
        alpha, sigma = (float(a) for a in alpha_sigma_from_lambda(lam))
        t = torch.full((x.shape[0],), float(self.schedule.t_of_lambda(lam)), device=self.device)
        return self.eps_fn(x, t, alpha, sigma).to(self.dtype)

    def hutchinson(self, x: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
        """``sigma (J_eps v) * v`` (b, C, H, W), whose mean over Rademacher ``v`` is ``diag(sigma J_eps)``."""
        sigma = float(alpha_sigma_from_lambda(lam)[1])
        d = self.fd_step
        return sigma * (self.eps(x + d * v, lam) - self.eps(x - d * v, lam)) / (2 * d) * v

    def f_moments(self, x, lam: float, bounds: tuple[float, float], l_k, l_d_k) -> torch.Tensor:
        """``[f, f', f^2, f f']`` (b, 4, C, H, W); ``f'`` by a difference along the ODE within the grid's range."""
        alpha, sigma = (float(a) for a in alpha_sigma_from_lambda(lam))
        lo, hi = max(lam - self.fd_step, bounds[0]), min(lam + self.fd_step, bounds[1])
        eps = self.eps(x, lam)
        dx = sigma**2 * x - sigma * eps  # dx / dlambda along the probability-flow ODE
        d_eps = (self.eps(x + (hi - lam) * dx, hi) - self.eps(x + (lo - lam) * dx, lo)) / (hi - lo)
        f = ((sigma * eps - l_k * x) / alpha).double()
        f_d = (math.exp(-lam) * ((l_k - 1) * eps + d_eps) - l_d_k * x / alpha).double()
        return torch.stack([f, f_d, f * f, f * f_d], 1)


def _noised(data: torch.Tensor, lam: float, seed: int, stream: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = alpha data + sigma z`` at grid point ``k`` (lambda ``lam``) from the point's own generator, and a
    Rademacher probe ``v`` (used by the ``l`` pass, stream 0); both shaped like ``data`` (num_samples, C, H, W)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stream * 10_007 + k)
    z = torch.randn(data.shape, generator=g, dtype=torch.float64).to(data.device, data.dtype)
    v = (torch.randint(0, 2, data.shape, generator=g) * 2 - 1).to(data.device, data.dtype)
    alpha, sigma = (float(a) for a in alpha_sigma_from_lambda(lam))
    return alpha * data + sigma * z, v


def _estimate_l(probe: _Probe, data, lambdas: np.ndarray, seed: int, batch_size: int, bar) -> torch.Tensor:
    """``l = E[diag(sigma d eps / d x)]`` (Eq. 7) at every grid point by Hutchinson's trick; (N + 1, C, H, W)."""
    l = torch.zeros((len(lambdas), *data.shape[1:]), dtype=torch.float64)
    for k, lam in enumerate(lambdas):
        x, v = _noised(data, lam, seed, 0, k)
        l[k] = _batched(partial(probe.hutchinson, lam=lam), [x, v], batch_size).double().mean(0).cpu()
        bar.update()
    return l


def _smoothed_derivative(l: torch.Tensor, lambdas: np.ndarray, smooth: int) -> torch.Tensor:
    """``l' = dl / dlambda`` (N + 1, C, H, W): central differences inside, one-sided at the ends, then a moving
    average over ``2 smooth + 1`` grid points (the official code's smoothing)."""
    n = len(lambdas)
    dl = np.gradient(l.numpy(), lambdas, axis=0)
    kernel = np.ones(2 * smooth + 1)
    counts = np.convolve(np.ones(n), kernel, mode="same")[:, None]
    flat = dl.reshape(n, -1)
    l_d = np.stack([np.convolve(c, kernel, mode="same") for c in flat.T], 1) / counts
    return torch.from_numpy(l_d.reshape(dl.shape))


def _f_moments(probe: _Probe, data, lambdas, l, l_d, seed: int, batch_size: int, bar) -> torch.Tensor:
    """``E f, E f', E f^2, E f f'`` over the data at every grid point (noise stream 1); (4, N + 1, C, H, W)."""
    moments = torch.zeros((4, len(lambdas), *data.shape[1:]), dtype=torch.float64)
    for k, lam in enumerate(lambdas):
        x, _ = _noised(data, lam, seed, 1, k)
        fit = partial(
            probe.f_moments,
            lam=lam,
            bounds=(lambdas[0], lambdas[-1]),
            l_k=l[k].to(data.device, data.dtype),
            l_d_k=l_d[k].to(data.device, data.dtype),
        )
        moments[:, k] = _batched(fit, [x], batch_size).mean(0).cpu()
        bar.update()
    return moments


def _fit_s_b(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise least squares ``f' ~ s f + b`` (Eq. 9) from the moments: ``s = Cov(f, f') / Var(f)``."""
    mean_f, mean_fd, mean_ff, mean_ffd = moments
    var = (mean_ff - mean_f**2).clamp(min=0.0)
    # ridge: where f hardly varies over the data (a Gaussian's f is deterministic) any s fits; take s -> 0, b = E f'
    s = (mean_ffd - mean_f * mean_fd) / (var + RIDGE * mean_ff + 1e-300)
    return s, mean_fd - s * mean_f


def _check_inputs(samples: torch.Tensor, num_grid: int, num_samples: int, schedule, t_start, t_end: float) -> float:
    """Raise on unusable arguments; returns ``t_start`` (default: the last training timestep)."""
    if samples.ndim < 2 or samples.shape[0] < 1:
        raise ValueError(f"samples must be (K, ...) data with K >= 1; got shape {tuple(samples.shape)}.")
    if num_grid < 2 or num_samples < 1:
        raise ValueError(f"num_grid={num_grid} and num_samples={num_samples} must be >= 2 and >= 1.")
    t_start = schedule.t_max if t_start is None else float(t_start)
    if not 0 <= t_end < t_start <= schedule.t_max:
        raise ValueError(f"need 0 <= t_end < t_start <= {schedule.t_max:g}; got t_start={t_start}, t_end={t_end}.")
    return t_start


def _metadata(settings: dict, samples, lambdas, schedule, prediction_type, model, model_name, fingerprint, dtype):
    """What the statistics were computed from and for: saved beside them and checked when they are loaded."""
    fingerprint = fingerprint or (model_fingerprint(model) if isinstance(model, torch.nn.Module) else None)
    return dict(
        format=EMS_FORMAT,
        **settings,
        lambda_start=float(lambdas[0]),
        lambda_end=float(lambdas[-1]),
        sample_shape=list(samples.shape[1:]),
        schedule=schedule_fingerprint(schedule),
        prediction_type=prediction_type,
        model=model_name,
        model_fingerprint=fingerprint,
        dtype=str(dtype).removeprefix("torch."),
    )


@torch.no_grad()
def compute_ems(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    samples: torch.Tensor,
    scheduler_config,
    num_grid: int = DEFAULT_GRID,
    num_samples: int = DEFAULT_SAMPLES,
    batch_size: int = 256,
    seed: int = 0,
    t_start: float | None = None,
    t_end: float = 0.0,
    fd_step: float = 1e-3,
    smooth: int | None = None,
    device: str | torch.device | None = None,
    model_name: str | None = None,
    fingerprint: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> EmpiricalModelStatistics:
    """Compute DPM-Solver-v3's EMS for ``model(x, t) -> output`` (``t``: (B,) training-timestep units).

    ``samples``: (K, C, H, W) data (pixels or VAE latents, as the model sees them); ``num_samples`` draws cycle
    through them with fresh noise. ``scheduler_config``: any diffusers scheduler config of the model (noise schedule
    and ``prediction_type``). The grid spans ``lambda(t_start)`` (default: the last training timestep) to
    ``lambda(t_end)`` (default 0, the first) in ``num_grid`` steps. ``smooth``: half-width in grid points of the
    moving average of ``l'`` (default: the official 5 points of a 1200-step grid, scaled to the same lambda width).
    ``fd_step``: the finite-difference step of the Jacobian-vector products. ``model_name`` and ``fingerprint``
    (default: ``model_fingerprint(model)`` for a module) are saved so that the statistics can be checked against the
    model they are used with. 5 model calls per sample and grid point. ``dtype``: of the model's inputs and the finite
    differences (float64 for analytic models).
    """
    get = scheduler_config.get if hasattr(scheduler_config, "get") else lambda k, d=None: getattr(scheduler_config, k)
    schedule = NoiseScheduleVP.from_config(scheduler_config)
    prediction_type = get("prediction_type", "epsilon")
    eps_fn = _eps_fn(model, prediction_type)
    t_start = _check_inputs(samples, num_grid, num_samples, schedule, t_start, t_end)
    device = torch.device(device) if device is not None else samples.device
    lambdas = np.linspace(schedule.lambda_t(t_start), schedule.lambda_t(t_end), num_grid + 1)  # (N + 1,)
    index = torch.arange(num_samples) % samples.shape[0]
    data = samples[index].to(device=device, dtype=dtype)  # (num_samples, C, H, W)
    probe = _Probe(eps_fn, schedule, device, dtype, fd_step)

    bar = tqdm(total=2 * (num_grid + 1), disable=not progress, desc="EMS")
    l = _estimate_l(probe, data, lambdas, seed, batch_size, bar)  # (N + 1, C, H, W)
    smooth = max(0, round(5 * num_grid / DEFAULT_GRID)) if smooth is None else smooth
    l_d = _smoothed_derivative(l, lambdas, smooth)
    s, b = _fit_s_b(_f_moments(probe, data, lambdas, l, l_d, seed, batch_size, bar))
    bar.close()
    args = dict(num_grid=num_grid, num_samples=num_samples, seed=seed, t_start=t_start, t_end=t_end, fd_step=fd_step)
    meta = _metadata(args, samples, lambdas, schedule, prediction_type, model, model_name, fingerprint, dtype)
    return EmpiricalModelStatistics(lambdas, l, s, b, meta)


def ems_from_side_info(tensors: dict[str, torch.Tensor], meta: dict) -> EmpiricalModelStatistics:
    """Rebuild statistics from their saved tensors and metadata, with a clear error for foreign or broken files."""
    missing = {"lambdas", "l", "s", "b"} - set(tensors)
    if missing or meta.get("format") != EMS_FORMAT:
        raise ValueError(
            f"not DPM-Solver-v3 EMS (format {meta.get('format')!r}, missing {sorted(missing)}); "
            "compute them with `diffalign ems`."
        )
    ems = EmpiricalModelStatistics(tensors["lambdas"], tensors["l"], tensors["s"], tensors["b"], meta)
    if ems.num_grid != meta.get("num_grid"):
        raise ValueError(f"EMS metadata says num_grid={meta.get('num_grid')} but the arrays have {ems.num_grid}.")
    return ems
