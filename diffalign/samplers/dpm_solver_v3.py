"""DPM-Solver-v3 (Zheng et al., NeurIPS 2023) as a diffusers scheduler, on empirical model statistics (EMS).

The ODE is rewritten with the EMS ``l, s, b`` (``ems.py``) so that the quantity extrapolated between steps,

    g(lambda) = e^{-(S(lambda) - S_s)} f(lambda) - int_{lambda_s}^{lambda} e^{-(S(r) - S_s)} b_r dr,
    f = (sigma eps - l x) / alpha,

is as flat in lambda as the model allows. One step from ``s`` to ``t`` (the paper's Eq. 11, official
``multistep_predictor_update``), with ``L, S, I, B, C`` the EMS's cumulative integrals:

    x_t = (alpha_t / alpha_s) e^{L_s - L_t} x_s - alpha_t e^{-L_t - S_s} (I_t - I_s) g_s
          - alpha_t e^{-L_t} (C_t - C_s - B_s (I_t - I_s)) - alpha_t e^{L_s - L_t} sum_k A_k(s, t) g_s^{(k)}

with ``A_k = int e^{(L+S) - (L+S)_s} (lambda - lambda_s)^k / k!`` and ``g^{(k)}`` from the last points
(exact interpolation, or Newton differences for the paper's "pseudo" order at very low NFE). The multistep
predictor is followed on arrival at each new point by the paper's corrector: the same update from the previous
point, now including the new model value (UniPC-style, no extra NFE), keeping ``sigma eps - l x`` unchanged.

Grid points are snapped to the EMS lambda grid (integrals are exact sums there); a step to sigma 0 is first order
and continues the statistics beyond their last point with ``l = 1, s = b = 0``. Without EMS the scheduler uses
``l = 1, s = b = 0`` everywhere with exact integrals, where it is DPM-Solver++ (multistep, Taylor form). Without
the corrector (the default) and on the same grid it equals our ``DPMSolverPPScheduler(solver_type="heun",
taylor_third_order=True)`` at orders 1 and 2 for every NFE; at order 3 only for 6 <= NFE <= 14 (and NFE 5 with
``predictor_pseudo=False``): below 6 steps v3 defaults to the pseudo order, and from 15 steps on DPM-Solver++
(diffusers' rule) keeps full order in its last steps while v3 lowers it at every NFE, as the official code does
(measured in tests/samplers/test_dpm_solver_v3.py: 1.1e-2 to 2.6e-2 apart at NFE 15-20 on a 16-D mixture).

Defaults chosen by measurement against diffusers' UniPC at its defaults (``scripts/v3_defaults.py``,
docs/dpm_solver_v3.md): ``timestep_spacing="time_quadratic"`` (the official ``skip_type`` for pixel models) and no
corrector (it helps with accurate statistics of an unguided model and ruins guided ones). Statistics on a grid
coarser than ``MAX_EMS_SPACING`` in lambda, or with fewer than ``MIN_CELLS_PER_STEP`` cells in a step, warn at
``set_timesteps``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .base import VPScheduler
from .config import (
    AlgorithmType,
    BetaSchedule,
    FinalSigmasType,
    InterpolationType,
    PredictionType,
    SolverMode,
    SolverType,
    TimeShiftType,
    TimestepSpacing,
    TimestepType,
    VarianceType,
)
from .ems import EMS_FILE, EmpiricalModelStatistics, ems_from_side_info
from .schedule import alpha_sigma_from_lambda
from .side_info import SideInfoMixin, model_fingerprint, schedule_fingerprint, warn_each_time

GRID_STATS = ("l", "L", "S", "I", "B", "C")  # the EMS arrays a step reads at its grid points
PSEUDO_ORDER_UP_TO_NFE = 5  # the official CIFAR-10 / EDM settings use pseudo-order predictors at <= 5 steps
MAX_EMS_SPACING = 0.025  # coarser EMS grids warn: the official statistics' coarsest (SD-1.4, 250 points, lambda 6.2)
MIN_CELLS_PER_STEP = 4  # ... and so do steps spanning fewer cells (snapping moves a step's size by up to 1 cell)


def degenerate_high_order(h: float, order: int) -> list[float]:
    """``phi_k(h) = e^{-h} int_0^h e^u u^k / k! du`` for k = 0..order-1, by ``phi_k = h^k / k! - phi_{k-1}``.

    With ``l = 1, s = b = 0``: ``I_t - I_s = e^{L_t} phi_0`` and ``e^{L_s - L_t} A_k = phi_k``.
    """
    if math.isinf(h):
        return [1.0] + [math.nan] * (order - 1)
    phis = [-math.expm1(-h)]
    for k in range(1, order):
        phis.append(h**k / math.factorial(k) - phis[-1])
    return phis


def taylor_derivatives(gs: list[torch.Tensor], lambdas: list[float], pseudo: bool) -> list[torch.Tensor]:
    """``g^{(1)} .. g^{(n)}`` at ``lambdas[0]`` from ``n + 1`` values (official ``compute_high_order_derivatives``).

    ``pseudo=False``: derivatives of the polynomial through all points (a Vandermonde solve in ``lambda -
    lambda_0``). ``pseudo=True``: Newton divided differences along the points, ``g^{(j)} ~ j! g[lambda_0..lambda_j]``.
    """
    n = len(gs) - 1
    if pseudo:
        table = [list(gs)]
        for i in range(1, n + 1):
            prev = table[-1]
            table.append([(prev[j] - prev[j + 1]) / (lambdas[j] - lambdas[i + j]) for j in range(n - i + 1)])
        return [table[i][0] * math.factorial(i) for i in range(1, n + 1)]
    offsets = np.asarray(lambdas[1:], dtype=np.float64) - lambdas[0]  # (n,)
    weights = np.linalg.inv(offsets[:, None] ** np.arange(1, n + 1)[None, :])  # (n, n): coefficients of powers
    diffs = [g - gs[0] for g in gs[1:]]
    return [
        math.factorial(j + 1) * sum(float(w) * d for w, d in zip(weights[j], diffs, strict=True)) for j in range(n)
    ]


class DPMSolverV3Scheduler(SideInfoMixin, VPScheduler, ConfigMixin):
    """DPM-Solver-v3: multistep predictor (orders 1-3, pseudo order at low NFE) and corrector on EMS.

    Defaults: the ``time_quadratic`` grid, no corrector (measured; module docstring).
    ``from_config(pipe.scheduler.config)`` keeps a pipeline's own ``timestep_spacing`` when its config names one;
    pass ``timestep_spacing="time_quadratic"`` to get v3's.

    ``pipe.scheduler = DPMSolverV3Scheduler.from_pretrained(folder)`` loads the EMS saved next to the scheduler
    config by ``diffalign ems``; ``from_config`` plus ``load_side_info(folder)`` does the same for a swap. Without EMS
    it warns at every ``set_timesteps`` and runs on the statistics that reduce it to DPM-Solver++.

    v3 settings: ``use_corrector``; ``predictor_pseudo`` (None: pseudo order
    at <= 5 steps, as the paper's CIFAR-10 setting); ``corrector_pseudo`` (the corrector one order higher, the
    paper's latent-diffusion setting); ``half_corrector`` (corrector only in the first half of the time range, the
    official ``half`` flag).
    """

    config_name = "scheduler_config.json"
    side_info_name = EMS_FILE
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: PredictionType = "epsilon",
        use_corrector: bool = False,
        predictor_pseudo: bool | None = None,
        corrector_pseudo: bool = False,
        half_corrector: bool = False,
        lower_order_final: bool = True,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        final_sigmas_type: FinalSigmasType = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: VarianceType | None = None,
        timestep_spacing: TimestepSpacing = "time_quadratic",  # config.OWN_DEFAULTS: chosen by measurement
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_exponential_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        # Keys of other diffusers schedulers' configs, accepted so that `from_config` round-trips; see README.
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: TimeShiftType = "exponential",
        solver_mode: SolverMode | None = None,
        solver_type: SolverType | None = None,
        algorithm_type: AlgorithmType | None = None,
        euler_at_final: bool | None = None,
        taylor_third_order: bool | None = None,
        set_alpha_to_one: bool | None = None,
        skip_prk_steps: bool | None = None,
        interpolation_type: InterpolationType | None = None,
        timestep_type: TimestepType | None = None,
        predict_x0: bool | None = None,
        disable_corrector: list[int] | None = None,
        solver_p: object | None = None,
        shift_terminal: float | None = None,
    ):
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={solver_order}; DPM-Solver-v3 supports orders 1, 2 and 3.")
        self.ems: EmpiricalModelStatistics | None = None
        self._init_vp()

    # ---- EMS as side information --------------------------------------------------------------------------------
    def side_info_state(self):
        return None if self.ems is None else self.ems.state()

    def _load_side_info(self, tensors, meta) -> None:
        ems = ems_from_side_info(tensors, meta)
        expected = schedule_fingerprint(self.noise_schedule)
        if meta.get("schedule") != expected:
            raise ValueError(
                f"these EMS were computed under another noise schedule (fingerprint {meta.get('schedule')}, this "
                f"scheduler's is {expected}): they belong to another model. Compute EMS for this model with "
                "`diffalign ems`."
            )
        self.ems = ems
        self.num_inference_steps = None  # the grid must be snapped to the new statistics

    def check_model(self, model) -> None:
        """Raise if the loaded EMS were computed for another model than ``model`` (an ``nn.Module``)."""
        saved, actual = (self.ems.meta.get("model_fingerprint") if self.ems else None), model_fingerprint(model)
        if saved and actual and saved != actual:
            raise ValueError(
                f"these EMS were computed for another model (fingerprint {saved}, "
                f"{self.ems.meta.get('model') or 'unnamed'}), not this {type(model).__name__} ({actual}). "
                "Compute EMS for this model with `diffalign ems`."
            )

    # ---- grid ---------------------------------------------------------------------------------------------------
    def _set_grid(self, times: np.ndarray, rhos: np.ndarray, integer_times: bool, device) -> None:
        """Snap the grid to the EMS lambda grid (official ``convert_to_indexes``); without EMS keep it as is."""
        if self.ems is None:
            warn_each_time(
                "DPMSolverV3Scheduler has no empirical model statistics (EMS) and runs as DPM-Solver++ (Taylor "
                "form). Compute them with `diffalign ems` and load them with from_pretrained / "
                "load_side_info for v3's accuracy.",
                stacklevel=3,
            )
            return super()._set_grid(times, rhos, integer_times, device)
        ems, n = self.ems, len(times)
        finite = rhos > 0  # (n + 1,)
        lam = -np.log(rhos[finite])
        index = ems.index_of(lam)
        cell = (float(ems.lambdas[-1]) - float(ems.lambdas[0])) / ems.num_grid
        outside = (index < 0) | (index > ems.num_grid)
        if np.any(outside):
            raise ValueError(
                f"grid lambdas {lam[outside].round(3).tolist()} lie outside the EMS range "
                f"[{float(ems.lambdas[0]):.3f}, {float(ems.lambdas[-1]):.3f}] (spacing {cell:.4f}); compute EMS over "
                "the time range you sample (diffalign ems --t-start/--t-end) or change the grid."
            )
        if np.any(np.diff(index) <= 0):
            raise ValueError(
                f"{n} steps do not fit on the EMS grid of {ems.num_grid} points: neighbouring steps snap to the same "
                "point. Use fewer steps or EMS computed on a finer grid (diffalign ems --grid_size)."
            )
        cells = int(np.diff(index).min()) if n > 1 else ems.num_grid
        if cell > MAX_EMS_SPACING or cells < MIN_CELLS_PER_STEP:
            width = float(ems.lambdas[-1]) - float(ems.lambdas[0])
            h_min = float(np.diff(lam).min()) if n > 1 else width
            needed = math.ceil(width * max(1 / MAX_EMS_SPACING, MIN_CELLS_PER_STEP / h_min))
            warn_each_time(
                f"the EMS grid ({ems.num_grid} points, lambda spacing {cell:.4f}) is too coarse for {n} steps of this "
                f"grid: v3 integrates the statistics on it and snaps the steps to it, and its shortest step (lambda "
                f"{h_min:.3f}) spans {cells} cell(s); spacings above {MAX_EMS_SPACING} or fewer than "
                f"{MIN_CELLS_PER_STEP} cells per step cost accuracy (measured in docs/dpm_solver_v3.md). Compute EMS "
                "with at least "
                f"{needed} grid points (diffalign ems --grid_size {needed}) or use fewer steps.",
                stacklevel=3,
            )
        snapped = ems.lambdas[index].numpy()
        new_rhos = np.concatenate([np.exp(-snapped), np.zeros(int((~finite).sum()))])
        # the step to sigma 0 passes through the last EMS point (see _update): it stands in for the clean end
        self._ems_index = np.concatenate([index, np.full(int((~finite).sum()), ems.num_grid)])  # (n + 1,)
        self._ems_alpha = alpha_sigma_from_lambda(ems.lambdas[self._ems_index].numpy())[0]  # (n + 1,)
        self._grid_stats = {k: getattr(ems, k)[self._ems_index] for k in GRID_STATS}  # (n + 1, C, H, W) each
        super()._set_grid(self.noise_schedule.t_of_lambda(snapped[:n]), new_rhos, False, device)

    def _reset_solver_state(self) -> None:
        self._xs: list[torch.Tensor] = []  # (B, C, H, W) each, newest last
        self._fs: list[torch.Tensor] = []
        self._points: list[int] = []  # grid index of each stored value
        self._last_order = 0
        self._first_index = 0
        self._cache: dict = {}
        self._stats_on = None  # ((device, dtype), the grid's EMS rows there)
        n = self.num_inference_steps
        pseudo = self.config.predictor_pseudo
        self._predictor_pseudo = (n <= PSEUDO_ORDER_UP_TO_NFE) if pseudo is None else bool(pseudo)

    # ---- the statistics at grid points --------------------------------------------------------------------------
    def _stat(self, name: str, i: int, like: torch.Tensor) -> torch.Tensor:
        """EMS array ``name`` at grid point ``i`` (the last EMS point for the clean end), on ``like``'s device.

        The grid's rows move to the sample's device and dtype once per ``set_timesteps``, not at every step.
        """
        key = (like.device, like.dtype)
        if self._stats_on is None or self._stats_on[0] != key:
            self._stats_on = (key, {k: v.to(like.device, like.dtype) for k, v in self._grid_stats.items()})
        return self._stats_on[1][name][i]

    def _f(self, eps: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """``f = (sigma eps - l x) / alpha`` (Eq. 6); ``-x0`` under the fallback ``l = 1``."""
        alpha, sigma = float(self.alpha_grid[i]), float(self.sigma_grid[i])
        l = 1.0 if self.ems is None else self._stat("l", i, x)
        return (sigma * eps - l * x) / alpha

    def _g(self, f_j: torch.Tensor, s: int, j: int) -> torch.Tensor:
        """``g`` at point ``j`` rebased to ``s``: ``e^{S_s - S_j} f_j - e^{S_s} (B_j - B_s)`` (official ``get_g``)."""
        if self.ems is None or j == s:
            return f_j
        S_s, S_j, B_s, B_j = (self._stat(k, p, f_j) for k, p in (("S", s), ("S", j), ("B", s), ("B", j)))
        return torch.exp(S_s - S_j) * f_j - torch.exp(S_s) * (B_j - B_s)

    def _transition(self, s: int, t: int, order: int, like: torch.Tensor):
        """``(c_x, c_g, c_b, [a_1 .. a_{order-1}])`` with ``x_t = c_x x_s - c_g g_s - c_b - sum_k a_k g^{(k)}``.

        With EMS, the clean end ``t`` stands for the last EMS point (the step to sigma 0 passes through it, see
        ``_update``).
        """
        key = (s, t, order)
        if key in self._cache:
            return self._cache[key]
        if self.ems is None:
            alpha_s, alpha_t, sigma_s, sigma_t = (
                float(g[k]) for g in (self.alpha_grid, self.sigma_grid) for k in (s, t)
            )
            h = float(self.lambda_grid[t] - self.lambda_grid[s])
            phis = degenerate_high_order(h, order)
            out = (sigma_t / sigma_s, alpha_t * phis[0], 0.0, [alpha_t * p for p in phis[1:]])
        else:
            i_s, i_t = int(self._ems_index[s]), int(self._ems_index[t])
            alpha_s, alpha_t = float(self.alpha_grid[s]), float(self._ems_alpha[t])
            L_s, L_t, S_s, I_s, I_t, B_s, C_s, C_t = (
                self._stat(k, p, like)
                for k, p in (("L", s), ("L", t), ("S", s), ("I", s), ("I", t), ("B", s), ("C", s), ("C", t))
            )
            decay = torch.exp(L_s - L_t)
            high = [self.ems.high_order_coefficient(i_s, i_t, k).to(like.device, like.dtype) for k in range(1, order)]
            out = (
                alpha_t / alpha_s * decay,
                alpha_t * torch.exp(-L_t - S_s) * (I_t - I_s),
                alpha_t * torch.exp(-L_t) * (C_t - C_s - B_s * (I_t - I_s)),
                [alpha_t * decay * a for a in high],
            )
        self._cache[key] = out
        return out

    # ---- stepping -----------------------------------------------------------------------------------------------
    def _update(self, slots: list[int], t: int, order: int, pseudo: bool) -> torch.Tensor:
        """The v3 step (module docstring) from stored slot ``slots[0]`` to grid point ``t``, using ``order`` slots."""
        slots = slots[:order]
        s = self._points[slots[0]]
        x_s = self._xs[slots[0]]
        gs = [self._g(self._fs[k], s, self._points[k]) for k in slots]
        c_x, c_g, c_b, high = self._transition(s, t, order, x_s)
        x_t = c_x * x_s - c_g * gs[0] - c_b
        if order > 1:
            lambdas = [float(self.lambda_grid[self._points[k]]) for k in slots]
            for a_k, d_k in zip(high, taylor_derivatives(gs, lambdas, pseudo), strict=True):
                x_t = x_t - a_k * d_k
        if self.ems is not None and self.sigma_grid[t] == 0:
            # x_0 = (x_N - sigma_N eps_N) / alpha_N with f_N from the same (first-order) model of g
            S_s, S_N, B_s, B_N, l_N = (
                self._stat(k, p, x_s) for k, p in (("S", s), ("S", t), ("B", s), ("B", t), ("l", t))
            )
            f_N = torch.exp(S_N - S_s) * gs[0] + torch.exp(S_N) * (B_N - B_s)
            x_t = (1 - l_N) * x_t / float(self._ems_alpha[t]) - f_N
        return x_t

    def _solver_step(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        cfg, n = self.config, self.num_inference_steps
        if self.ems is not None and tuple(sample.shape[1:]) != self.ems.sample_shape:
            raise ValueError(
                f"the EMS were computed for samples of shape {self.ems.sample_shape}, got {tuple(sample.shape[1:])}: "
                "they belong to another model or resolution. Compute EMS for this one with `diffalign ems`."
            )
        _, eps = self.x0_and_eps(model_output, sample, i)
        self._xs.append(sample)
        self._fs.append(self._f(eps, sample, i))
        self._points.append(i)
        first_step = len(self._points) == 1
        if first_step:
            self._first_index = i
        c_order = self._last_order + int(cfg.corrector_pseudo)
        late = cfg.half_corrector and float(self.timesteps[i]) <= 0.5 * self.noise_schedule.t_max
        if cfg.use_corrector and not first_step and c_order > 1 and not late:
            m = len(self._points)
            slots = [m - 2, m - 1] + list(range(m - 3, -1, -1))  # previous (base), current, older
            # keeping sigma eps - l x fixed keeps f = (sigma eps - l x) / alpha: only x changes
            self._xs[-1] = self._update(slots, i, c_order, cfg.corrector_pseudo)
        order = min(cfg.solver_order, i - self._first_index + 1)
        if cfg.lower_order_final:
            order = min(order, n - i)
        if self.sigma_grid[i + 1] == 0:
            order = 1  # higher Taylor terms diverge on the infinite lambda interval to sigma 0
        m = len(self._points)
        x_next = self._update(list(range(m - 1, -1, -1)), i + 1, order, self._predictor_pseudo)
        self._last_order = order
        keep = cfg.solver_order + 1
        self._xs, self._fs, self._points = self._xs[-keep:], self._fs[-keep:], self._points[-keep:]
        return x_next
