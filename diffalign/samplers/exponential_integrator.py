"""The DPM-Solver family's shared driver: order planning, Taylor differences and the exponential-integrator update.

Both DPM-Solver (noise prediction, Lu et al. 2022a) and DPM-Solver++ (data prediction, Lu et al. 2022b) write
one step from ``s`` to ``t`` (``h = lambda_t - lambda_s``) as

    x_t = c_x x_s - a_1 m_s - a_2 D_1 - a_3 D_2

with ``m`` the model term (``eps`` or ``x0``), ``D_1`` / ``D_2`` finite-difference estimates of its first and
second lambda-derivatives times ``h`` / ``h^2``, and ``a_k = w phi_k(u)`` (``phi`` from ``phi_functions``):

- noise form: ``c_x = alpha_t / alpha_s``, ``w = sigma_t``, ``u = h``  (DPM-Solver Eq. 3.7 and its Taylor terms);
- data form:  ``c_x = sigma_t / sigma_s``, ``w = alpha_t``, ``u = -h`` (DPM-Solver++ Eq. 8 and its Taylor terms).

The "midpoint" second-order variant (the papers' ``solver_type='dpmsolver'``) replaces ``a_2 D_1`` by
``a_1 D_1 / 2``. Multistep solvers (DPM-Solver++(2M)/(3M), DPM-Solver++ Alg. 2) take ``D`` from earlier steps;
singlestep solvers (DPM-Solver-2/3, DPM-Solver Alg. 1-2; DPM-Solver++(2S)) take them from intermediate stages,
which here are grid points of their own so that each ``step`` costs one model evaluation, as in diffusers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .base import VPScheduler
from .config import (
    SOLVER_MODES,
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
from .schedule import clipped_t_max, time_grid

LOWER_ORDER_FINAL_BELOW = 15  # diffusers' threshold for lower_order_final (the official code uses 10)
SOLVER_TYPES = {"midpoint": "midpoint", "heun": "heun", "dpmsolver": "midpoint", "taylor": "heun"}
# UniPC / DEIS solver types have no DPM-Solver meaning; like diffusers we read them as the default "midpoint".
FOREIGN_SOLVER_TYPES = ("bh1", "bh2", "logrho")


def solver_type_of(config) -> str:
    """DPM-Solver's second-order variant: 'midpoint' (paper's 'dpmsolver') or 'heun' (paper's 'taylor')."""
    st = config.solver_type
    if st in FOREIGN_SOLVER_TYPES:
        return "midpoint"
    if st not in SOLVER_TYPES:
        raise ValueError(f"solver_type={st!r}; use 'midpoint' (= 'dpmsolver') or 'heun' (= 'taylor').")
    return SOLVER_TYPES[st]


def phi_functions(h: float) -> tuple[float, float, float]:
    """``phi_1 = e^h - 1``, ``phi_2 = phi_1 / h - 1``, ``phi_3 = phi_2 / h - 1/2`` (Lu et al. 2022, App. B).

    For data prediction call with ``-h``. Series expansions keep ``phi_2`` and ``phi_3`` accurate for tiny ``h``.
    """
    if math.isinf(h):
        return (math.inf if h > 0 else -1.0), math.nan, math.nan
    phi_1 = math.expm1(h)
    if abs(h) < 1e-3:
        phi_2 = h / 2 + h**2 / 6 + h**3 / 24
        phi_3 = h / 6 + h**2 / 24 + h**3 / 120
    else:
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
    return phi_1, phi_2, phi_3


def exponential_integrator_update(x, m0, coeffs, D1=None, D2=None, midpoint: bool = False) -> torch.Tensor:
    """``c_x x - a_1 m0 - a_2 D1 - a_3 D2`` (or the midpoint form ``- a_1 (m0 + D1 / 2)``); tensors (B, ...)."""
    c_x, a_1, a_2, a_3 = coeffs
    out = c_x * x - a_1 * m0
    if D1 is not None:
        out = out - (0.5 * a_1 if midpoint else a_2) * D1
    if D2 is not None:
        out = out - a_3 * D2
    return out


def multistep_differences(ms, lambdas, order: int, taylor_third_order: bool = False):
    """``(D1, D2)`` from the last ``order`` model terms, DPM-Solver++(2M)/(3M) (Lu et al. 2022b, Alg. 2 / App.).

    ``ms = [m0, m1, m2]`` newest first at ``lambdas = [lambda_t, lambda_s0, lambda_s1, lambda_s2]``.

    The official code and diffusers take ``D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 m'' / 2``, half the Taylor-consistent
    ``h^2 m''`` that the ``phi_3`` coefficient expects (the singlestep ``D2`` has the factor 2). That leaves an
    ``O(h^3)`` local error, so their 3M converges at second order; ``taylor_third_order=True`` doubles ``D2`` and
    restores third order (measured in tests/samplers/test_convergence.py).
    """
    if order == 1:
        return None, None
    h = lambdas[0] - lambdas[1]
    r0 = (lambdas[1] - lambdas[2]) / h
    D1_0 = (ms[0] - ms[1]) / r0
    if order == 2:
        return D1_0, None
    r1 = (lambdas[2] - lambdas[3]) / h
    D1_1 = (ms[1] - ms[2]) / r1
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    return D1, (2.0 * D2 if taylor_third_order else D2)


def singlestep_differences(ms, lambdas, order: int, taylor: bool):
    """``(D1, D2)`` from stage values ``ms = [m_s, m_s1, m_s2]`` at ``lambdas = [lambda_t, lambda_s, lambda_s1, ...]``.

    Order 2 (DPM-Solver-2, Lu et al. 2022a, Alg. 1, any ``r1``): ``D1 = (m_s1 - m_s) / r1``. Order 3 (Alg. 2):
    ``taylor=False`` uses only the last stage, ``D1 = (m_s2 - m_s) / r2``; ``taylor=True`` fits both stages.
    """
    if order == 1:
        return None, None
    h = lambdas[0] - lambdas[1]
    r1 = (lambdas[2] - lambdas[1]) / h
    if order == 2:
        return (ms[1] - ms[0]) / r1, None
    r2 = (lambdas[3] - lambdas[1]) / h
    D1_1 = (ms[2] - ms[0]) / r2
    if not taylor:
        return D1_1, None
    D1_0 = (ms[1] - ms[0]) / r1
    return (r2 * D1_0 - r1 * D1_1) / (r2 - r1), 2.0 * (D1_1 - D1_0) / (r2 - r1)


def singlestep_orders(n: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Order of each block of a singlestep solver with ``n`` model evaluations (sums to ``n``).

    ``[3, ..., 3, 2, 1]`` / ``[3, ..., 3, 1]`` / ``[3, ..., 3, 2]`` for ``n % 3 == 0, 1, 2`` as in DPM-Solver-fast
    (Lu et al. 2022a, Sec. 3.4) and diffusers. A step to sigma 0 must be first order.
    """
    k = solver_order
    if n % k != 0:
        lower_order_final = True  # diffusers forces it too: the blocks must add up to n
    if final_zero:
        lower_order_final = True
    if not lower_order_final:
        return [k] * (n // k)
    if k == 3:
        blocks = [3] * (n // 3 - 1) + [2, 1] if n % 3 == 0 else [3] * (n // 3) + ([1] if n % 3 == 1 else [2])
    elif k == 2:
        blocks = [2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [2] * (n // 2) + [1]
    else:
        blocks = [1] * n
    if final_zero and blocks[-1] != 1:
        blocks[-1:] = [blocks[-1] - 1, 1]
    return blocks


class DPMSolverBase(VPScheduler, ConfigMixin):
    """Config, grid and driver shared by ``DPMSolverScheduler`` and ``DPMSolverPPScheduler``.

    Subclasses set ``predicts_data`` (True: data form, False: noise form) and implement ``coefficients(alpha_s,
    sigma_s, alpha_t, sigma_t)``. ``solver_variant`` is the second-order variant that ``solver_type`` names,
    'midpoint' or 'heun'.
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        solver_mode: SolverMode = "multistep",
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        solver_type: SolverType = "midpoint",
        taylor_third_order: bool = False,
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: FinalSigmasType = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: VarianceType | None = None,
        timestep_spacing: TimestepSpacing = "linspace",
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
        algorithm_type: AlgorithmType | None = None,
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
            raise ValueError(f"solver_order={solver_order}; DPM-Solver supports orders 1, 2 and 3.")
        if solver_mode not in SOLVER_MODES:
            raise ValueError(f"solver_mode={solver_mode!r}; use one of {SOLVER_MODES}.")
        self.solver_variant = solver_type_of(self.config)
        self._init_vp()

    # ---- grid ---------------------------------------------------------------------------------------------------
    def _block_orders(self, n: int, final_zero: bool) -> list[int]:
        return singlestep_orders(n, self.config.solver_order, self.config.lower_order_final, final_zero)

    def _plan_grid(self, num_inference_steps: int) -> np.ndarray:
        """For singlestep on a logSNR grid, DPM-Solver-fast's grid: blocks uniform in lambda, stages inside them at
        ``r = 1/k, 2/k`` (Lu et al. 2022a, Sec. 3.4). Otherwise the stages are the plain grid's points."""
        if self.config.solver_mode != "singlestep" or self._spacing() != "logSNR":
            return super()._plan_grid(num_inference_steps)
        blocks = self._block_orders(num_inference_steps, self.config.final_sigmas_type == "zero")
        t_max = clipped_t_max(self.noise_schedule, self.config.lambda_min_clipped)
        outer = time_grid(self.noise_schedule, len(blocks), spacing="logSNR", t_max=t_max)  # (K + 1,)
        lam = self.noise_schedule.lambda_t(outer)  # (K + 1,)
        inner = [lam[b] + (j / k) * (lam[b + 1] - lam[b]) for b, k in enumerate(blocks) for j in range(k)]
        return np.concatenate([self.noise_schedule.t_of_lambda(np.asarray(inner)), outer[-1:]])

    def _reset_solver_state(self) -> None:
        n = self.num_inference_steps
        self._history: list[torch.Tensor] = []  # multistep: newest last, at most solver_order entries
        self._first_index = 0
        if self.config.solver_mode == "singlestep":
            blocks = self._block_orders(n, final_zero=self.sigma_grid[-1] == 0)  # custom sigmas may end at 0
            starts = np.cumsum([0] + blocks[:-1])
            self._block_start = np.repeat(starts, blocks)  # (n,) first grid index of each step's block
            self._block_end = np.repeat(starts + np.asarray(blocks), blocks)  # (n,) grid index the block ends at
            self._block_sample: torch.Tensor | None = None

    # ---- stepping -----------------------------------------------------------------------------------------------
    def multistep_order(self, i: int) -> int:
        """The order of multistep step ``i``: warm-up, ``lower_order_final`` / ``euler_at_final``, first order to 0."""
        cfg, n = self.config, self.num_inference_steps
        order = min(cfg.solver_order, i - self._first_index + 1)
        lower = cfg.lower_order_final and n < LOWER_ORDER_FINAL_BELOW
        if i == n - 1 and (lower or cfg.euler_at_final or self.sigma_grid[-1] == 0):
            order = 1
        if i == n - 2 and lower:
            order = min(order, 2)
        return order

    def _solver_step(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        m = self.convert_model_output(model_output, sample, i)
        if self.config.solver_mode == "singlestep":
            return self._singlestep(m, sample, i)
        self._history = (self._history + [m])[-self.config.solver_order :]
        order = self.multistep_order(i)
        ms = self._history[::-1]  # newest first
        lambdas = [self.lambda_grid[i + 1]] + [self.lambda_grid[i - k] for k in range(order)]
        D1, D2 = multistep_differences(ms, lambdas, order, self.config.taylor_third_order)
        coeffs = self.coefficients(*self.grid_alpha_sigma(i, i + 1))
        midpoint = order == 2 and self.solver_variant == "midpoint"
        return exponential_integrator_update(sample, ms[0], coeffs, D1, D2, midpoint=midpoint)

    def _singlestep(self, m: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """Stage ``j = i - b0 + 1`` of the block starting at ``b0``; each stage goes from ``b0`` to ``i + 1``.

        Stage 2 of a third-order block is DPM-Solver-3's intermediate ``u_2``, which always uses the Taylor form
        (Lu et al. 2022a, Alg. 2); a block cut short by ``set_begin_index`` restarts at the first step taken.
        """
        b0 = max(int(self._block_start[i]), self._first_index)
        j = i - b0 + 1
        if j == 1:
            self._block_sample, self._history = sample, []
        self._history.append(m)
        is_last_stage = i + 1 == self._block_end[i]
        lambdas = [self.lambda_grid[i + 1]] + [self.lambda_grid[b0 + k] for k in range(j)]
        taylor = self.solver_variant == "heun" or not is_last_stage
        D1, D2 = singlestep_differences(self._history, lambdas, j, taylor=taylor)
        coeffs = self.coefficients(*self.grid_alpha_sigma(b0, i + 1))
        midpoint = j == 2 and not taylor
        return exponential_integrator_update(self._block_sample, self._history[0], coeffs, D1, D2, midpoint=midpoint)

    def coefficients(self, alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float):
        """``(c_x, a_1, a_2, a_3)`` of the step between these end points (module docstring)."""
        raise NotImplementedError


def lambda_step(alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float) -> float:
    """``h = lambda_t - lambda_s``; ``+inf`` when ``t`` is the clean end (``sigma_t = 0``)."""
    if sigma_t == 0.0:
        return math.inf
    return (math.log(alpha_t) - math.log(sigma_t)) - (math.log(alpha_s) - math.log(sigma_s))
