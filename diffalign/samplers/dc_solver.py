"""DC-Solver: UniPC with dynamic compensation of the predictor-corrector misalignment (Zhao et al. 2024, ECCV).

UniPC (Zhao et al. 2023) evaluates the model at the predictor's ``x~_i``, corrects ``x~_i -> x^c_i`` with that value
and then reuses it as if it were the model at ``x^c_i``. DC-Solver replaces the newest buffered model term by the
Lagrange interpolant through the last ``dc_order + 1`` buffered terms, evaluated in model time at
``tau_i = t_{i-1} + rho_i (t_i - t_{i-1})`` (Eq. 9), right after the corrector and before the next predictor; the
compensated value stays in the buffer. ``rho_i = 1`` is UniPC exactly. The ratios ``rho`` are side information:
calibrated per (NFE, guidance scale) by ``dc_calibrate.calibrate_dc`` and predicted for other settings by cascade
polynomial regression (``dc_cpr``), saved beside the scheduler config and loaded by ``from_pretrained``.
"""

from __future__ import annotations

import math
import weakref

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
    SolverType,
    TimeShiftType,
    TimestepSpacing,
    TimestepType,
    VarianceType,
)
from .dc_cpr import CPR_SHAPE, cpr_ratios
from .side_info import SideInfoMixin, schedule_fingerprint, warn_each_time
from .unipc import SOLVER_TYPES, lagrange_compensation, uni_c_update, uni_p_update

SIDE_INFO_FORMAT = "diffalign.dc_solver/1"
FOREIGN_SOLVER_TYPES = ("midpoint", "heun", "logrho", "dpmsolver", "taylor")  # read as bh2, as diffusers' UniPC does


class DCSolverScheduler(SideInfoMixin, VPScheduler, ConfigMixin):
    """DC-Solver as a diffusers scheduler; with no ratios (or all ratios 1) it is ``UniPCMultistepScheduler``.

    ``pipe.scheduler = DCSolverScheduler.from_pretrained(folder_with_ratios)`` or ``from_config(...)`` then
    ``load_side_info(folder)``. UniPC keys: ``solver_order``, ``solver_type`` ('bh1' | 'bh2'), ``predict_x0``,
    ``lower_order_final``, ``disable_corrector``. DC keys: ``dc_order`` (Lagrange degree, 1-3), ``guidance_scale``
    (the CFG scale the pipeline samples with; picks the ratios; a pipeline given to ``follow_pipeline`` supplies the
    scale of its running call instead) and ``model_fingerprint`` (when set, ratios
    calibrated for another model are refused). At ``set_timesteps(n)`` the ratios are the calibrated ones for
    ``(n, guidance_scale)`` if present, else the CPR prediction, else 1 (with a warning at each ``set_timesteps``);
    ``dc_ratio_source`` says which.
    """

    config_name = "scheduler_config.json"
    side_info_name = "dc_solver_ratios"

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
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: SolverType = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] | None = None,
        solver_p: object | None = None,
        dc_order: int = 2,
        guidance_scale: float = 1.0,
        model_fingerprint: str | None = None,
        final_sigmas_type: FinalSigmasType = "zero",
        timestep_spacing: TimestepSpacing = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_exponential_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        lambda_min_clipped: float = -float("inf"),
        variance_type: VarianceType | None = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        # Keys of other diffusers schedulers' configs, accepted so that `from_config` round-trips.
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: TimeShiftType = "exponential",
        algorithm_type: AlgorithmType | None = None,
        euler_at_final: bool = False,
        set_alpha_to_one: bool | None = None,
        skip_prk_steps: bool | None = None,
        interpolation_type: InterpolationType | None = None,
        timestep_type: TimestepType | None = None,
        shift_terminal: float | None = None,
    ):
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={solver_order}; DC-Solver supports UniPC orders 1, 2 and 3.")
        if dc_order not in (1, 2, 3):
            raise ValueError(f"dc_order={dc_order}; the compensation interpolates 2-4 points, use 1, 2 or 3.")
        if solver_type in FOREIGN_SOLVER_TYPES:
            self.register_to_config(solver_type="bh2")
        elif solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type={solver_type!r}; use one of {SOLVER_TYPES} (UniPC's B(h) variants).")
        if solver_p is not None:
            raise ValueError("solver_p (a foreign predictor under UniC) is not supported by DCSolverScheduler.")
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number (1.0 = no guidance).")
        self._init_vp()
        self.ratio_table: dict[tuple[int, float], list[float]] = {}
        self.cpr_coeffs: np.ndarray | None = None
        self.calibration_info: dict = {}
        self.dc_ratios: list[float] | None = None
        self.dc_ratio_source = "none"
        self.dc_guidance_scale: float | None = None  # the guidance the current grid's ratios are for
        self._pipeline = None  # () -> the followed pipeline (a weak reference), see follow_pipeline

    # ---- guidance -----------------------------------------------------------------------------------------------
    def set_guidance_scale(self, guidance_scale: float) -> DCSolverScheduler:
        """Sample at ``guidance_scale`` from now on (the config key, saved with it); returns ``self``. For hand-written
        loops; a pipeline passed to ``follow_pipeline`` overrides it with the guidance it runs with."""
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number (1.0 = no guidance).")
        self.register_to_config(guidance_scale=float(guidance_scale))
        return self

    def follow_pipeline(self, pipe) -> DCSolverScheduler:
        """Take the guidance scale from ``pipe`` at every ``set_timesteps``; returns ``self``.

        diffusers' SD / SDXL pipelines record the ``guidance_scale`` of the running call (``pipe.guidance_scale``)
        before they call ``set_timesteps``, so ``pipe(prompt, guidance_scale=7.5)`` picks the ratios for 7.5.
        ``swap_scheduler`` does this for you. The pipeline is held by a weak reference.
        """
        try:
            self._pipeline = weakref.ref(pipe)
        except TypeError:  # an object without weak references: hold it
            self._pipeline = lambda: pipe
        return self

    def current_guidance_scale(self) -> float:
        """The followed pipeline's guidance of its running call (1 when it runs without CFG), else the config's."""
        pipe = self._pipeline() if self._pipeline is not None else None
        guidance = getattr(pipe, "guidance_scale", None)  # the property raises before the pipeline's first call
        if guidance is None:
            return float(self.config.guidance_scale)
        return float(guidance) if getattr(pipe, "do_classifier_free_guidance", True) else 1.0

    # ---- ratios -------------------------------------------------------------------------------------------------
    def set_dc_ratios(self, nfe: int, ratios, guidance_scale: float | None = None) -> None:
        """Add calibrated ratios for ``nfe`` steps at ``guidance_scale`` (default: the config's) to the table."""
        ratios = [float(r) for r in ratios]
        if len(ratios) != nfe or not all(math.isfinite(r) for r in ratios):
            raise ValueError(f"need {nfe} finite ratios for NFE {nfe}, got {ratios}.")
        if any(r != 1.0 for r in ratios[: self.config.dc_order]):
            raise ValueError(
                f"the first dc_order={self.config.dc_order} ratios must be 1 (too few buffered outputs to "
                f"interpolate), got {ratios[: self.config.dc_order]}."
            )
        g = self.config.guidance_scale if guidance_scale is None else guidance_scale
        self.ratio_table[(int(nfe), float(g))] = ratios

    def ratios_for(self, nfe: int, guidance_scale: float | None = None) -> tuple[list[float], str]:
        """``(ratios, source)`` for an ``nfe``-step default grid: 'calibrated', 'cpr' or 'fallback' (all 1)."""
        g = float(self.config.guidance_scale if guidance_scale is None else guidance_scale)
        for (n, g_cal), ratios in self.ratio_table.items():
            if n == nfe and math.isclose(g_cal, g, rel_tol=1e-9, abs_tol=1e-9):
                return list(ratios), "calibrated"
        if self.cpr_coeffs is not None:
            return cpr_ratios(self.cpr_coeffs, nfe, g, self.config.dc_order), "cpr"
        return [1.0] * nfe, "fallback"

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None) -> None:
        """``VPScheduler.set_timesteps``, then pick this grid's ratios (see the class docstring).

        Ratios are calibrated for the default grid of ``n`` steps; custom ``timesteps`` / ``sigmas`` run with 1.
        """
        super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps, sigmas=sigmas, mu=mu)
        n, g = self.num_inference_steps, self.current_guidance_scale()
        self.dc_guidance_scale = g
        if timesteps is None and sigmas is None:
            self.dc_ratios, self.dc_ratio_source = self.ratios_for(n, g)
        else:
            self.dc_ratios, self.dc_ratio_source = [1.0] * n, "fallback"
        nfes, scales = [nfe for nfe, _ in self.ratio_table], [w for _, w in self.ratio_table]
        if self.dc_ratio_source == "cpr" and nfes and not min(nfes) <= n <= max(nfes):
            # a polynomial in NFE is unbounded outside its data: measured ratios of -2 at NFE 30 and -17 at NFE 50
            # (digits ratios from NFE 4-15), which diverge. Outside the range run as UniPC instead.
            self.dc_ratios, self.dc_ratio_source = [1.0] * n, "fallback"
            self._warn_once(
                (n, g),
                f"DCSolverScheduler: NFE {n} is outside the calibrated NFE {min(nfes)}-{max(nfes)}, where CPR would "
                "extrapolate; running with ratios 1 (UniPC). Calibrate this NFE with `diffalign calibrate`.",
            )
        elif self.dc_ratio_source == "cpr" and scales and not min(scales) - 1e-9 <= g <= max(scales) + 1e-9:
            # the same for the guidance scale: CPR is quadratic in it
            self.dc_ratios, self.dc_ratio_source = [1.0] * n, "fallback"
            self._warn_once(
                (n, g),
                f"DCSolverScheduler: guidance_scale {g:g} is outside the calibrated guidance {min(scales):g}-"
                f"{max(scales):g}, where CPR would extrapolate; running with ratios 1 (UniPC). Calibrate this "
                "guidance with `diffalign calibrate`.",
            )
        elif self.dc_ratio_source == "fallback":
            warn_each_time(
                f"DCSolverScheduler has no compensation ratios for NFE {n} at guidance_scale={g:g} (and no CPR "
                "coefficients): running with ratios 1, i.e. as UniPC. Calibrate with `diffalign calibrate` and load "
                "the folder with from_pretrained / load_side_info.",
                stacklevel=2,
            )

    def _warn_once(self, key: tuple, message: str) -> None:
        """Warn once per instance and (NFE, guidance) that calibrated ratios exist but not for this setting (a
        benchmark sweeping NFE would otherwise repeat it for every batch); missing ratios warn every time."""
        warned = self.__dict__.setdefault("_out_of_range_warned", set())
        if key not in warned:
            warned.add(key)
            warn_each_time(message, stacklevel=4)

    # ---- stepping -----------------------------------------------------------------------------------------------
    def _reset_solver_state(self) -> None:
        self._history: list[torch.Tensor] = []  # model terms of the last grid points, newest last
        self._last_sample: torch.Tensor | None = None
        self._last_order = 1
        self._first_index = 0

    @property
    def predicts_data(self) -> bool:
        """UniPC's ``predict_x0``: the buffered model terms are data predictions (else noise predictions)."""
        return bool(self.config.predict_x0)

    @property
    def _buffer_size(self) -> int:
        return max(self.config.solver_order, self.config.dc_order + 1)

    def _lambdas_back(self, i: int, count: int) -> list[float]:
        return [float(self.lambda_grid[i - k]) for k in range(count)]

    def uses_corrector(self, i: int) -> bool:
        """UniC on arrival at ``i`` unless ``i - 1`` is in ``disable_corrector`` (diffusers' convention)."""
        return i > self._first_index and (i - 1) not in (self.config.disable_corrector or [])

    def predictor_order(self, i: int) -> int:
        """UniPC's warm-up and ``lower_order_final``; a step to sigma 0 is first order (h is infinite)."""
        cfg, n = self.config, self.num_inference_steps
        order = min(cfg.solver_order, n - i) if cfg.lower_order_final else cfg.solver_order
        order = min(order, i - self._first_index + 1)
        return 1 if self.sigma_grid[i + 1] == 0 else order

    def multistep_uni_c_bh_update(self, m, i: int, history: list, x_prev: torch.Tensor, order: int) -> torch.Tensor:
        """UniC: ``x^c_i`` from ``x^c_{i-1}`` (``x_prev``), the buffer and the fresh model term ``m`` at ``x~_i``.

        diffusers' ``UniPCMultistepScheduler.multistep_uni_c_bh_update`` with the buffer passed in, not read from
        the scheduler's state (the calibration differentiates through it with compensated buffers).
        """
        ms = history[::-1]
        cfg, coeffs, lambdas = self.config, self.grid_alpha_sigma(i - 1, i), self._lambdas_back(i - 1, len(ms))
        return uni_c_update(x_prev, m, ms, lambdas, coeffs, order, cfg.solver_type, cfg.predict_x0)

    def dynamic_compensation(self, history: list[torch.Tensor], i: int, ratio) -> torch.Tensor:
        """DC-Solver Eq. 9: interpolate the last ``dc_order + 1`` terms at ``t_{i-1} + rho (t_i - t_{i-1})``."""
        k = self.config.dc_order + 1
        ts = self.timesteps.double().cpu().numpy()
        points = [float(ts[i - j]) for j in range(k)]
        tau = points[1] + ratio * (points[0] - points[1])
        return lagrange_compensation(history[::-1][:k], points, tau)

    def multistep_uni_p_bh_update(self, sample: torch.Tensor, history: list, i: int, order: int) -> torch.Tensor:
        """UniP-``order`` from grid point ``i`` to ``i + 1`` on the buffer ``history`` (newest last).

        diffusers' ``UniPCMultistepScheduler.multistep_uni_p_bh_update`` with the buffer passed in.
        """
        ms = history[::-1]
        cfg = self.config
        lambdas = self._lambdas_back(i, min(order, len(ms)))
        coeffs = self.grid_alpha_sigma(i, i + 1)
        return uni_p_update(sample, ms, lambdas, coeffs, order, cfg.solver_type, cfg.predict_x0)

    def can_compensate(self, i: int) -> bool:
        """Whether the buffer at step ``i`` holds the ``dc_order + 1`` terms the compensation interpolates."""
        return i - self._first_index >= self.config.dc_order

    def correct_and_buffer(
        self, model_output: torch.Tensor, sample: torch.Tensor, i: int
    ) -> tuple[torch.Tensor, list]:
        """Corrector on arrival at ``i`` and the buffer with ``i``'s model term appended: ``(x^c_i, history)``."""
        m = self.convert_model_output(model_output, sample, i)
        if self.uses_corrector(i):
            sample = self.multistep_uni_c_bh_update(m, i, self._history, self._last_sample, self._last_order)
        return sample, (self._history + [m])[-self._buffer_size :]

    def _solver_step(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        sample, history = self.correct_and_buffer(model_output, sample, i)
        ratio = self.dc_ratios[i] if self.dc_ratios is not None else 1.0
        if ratio != 1.0 and self.can_compensate(i):
            history[-1] = self.dynamic_compensation(history, i, ratio)
        order = self.predictor_order(i)
        self._history, self._last_sample, self._last_order = history, sample, order
        return self.multistep_uni_p_bh_update(sample, history, i, order)

    # ---- side information ---------------------------------------------------------------------------------------
    def side_info_identity(self) -> dict:
        """What the ratios depend on besides the model: schedule, prediction type and every sampler setting."""
        cfg = self.config
        return dict(
            schedule_sha256=schedule_fingerprint(self.noise_schedule),
            num_train_timesteps=int(cfg.num_train_timesteps),
            prediction_type=cfg.prediction_type,
            predict_x0=bool(cfg.predict_x0),
            solver_order=int(cfg.solver_order),
            solver_type=cfg.solver_type,
            lower_order_final=bool(cfg.lower_order_final),
            disable_corrector=sorted(int(k) for k in (cfg.disable_corrector or [])),
            dc_order=int(cfg.dc_order),
            timestep_spacing=self._grid_name(),
            steps_offset=int(cfg.steps_offset),
            final_sigmas_type=cfg.final_sigmas_type,
            sigma_min=cfg.sigma_min,
            sigma_max=cfg.sigma_max,
            lambda_min_clipped=str(float(cfg.lambda_min_clipped)),
            thresholding=bool(cfg.thresholding),
            clip_sample=bool(cfg.clip_sample),
        )

    def side_info_state(self):
        if not self.ratio_table and self.cpr_coeffs is None:
            return None
        tensors = {}
        if self.ratio_table:
            keys = sorted(self.ratio_table)
            width = max(n for n, _ in keys)
            table = torch.full((len(keys), width), float("nan"), dtype=torch.float64)  # (S, max NFE), NaN padded
            for row, key in enumerate(keys):
                table[row, : key[0]] = torch.tensor(self.ratio_table[key], dtype=torch.float64)
            tensors["nfe"] = torch.tensor([n for n, _ in keys], dtype=torch.int64)  # (S,)
            tensors["guidance_scale"] = torch.tensor([g for _, g in keys], dtype=torch.float64)  # (S,)
            tensors["ratios"] = table
        if self.cpr_coeffs is not None:
            tensors["cpr_coeffs"] = torch.as_tensor(np.asarray(self.cpr_coeffs, dtype=np.float64))  # (4, 3, 3)
        meta = dict(
            format=SIDE_INFO_FORMAT,
            identity=self.side_info_identity(),
            model_fingerprint=self.config.model_fingerprint,
            calibration=self.calibration_info,
        )
        return tensors, meta

    def _load_side_info(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("format") != SIDE_INFO_FORMAT:
            raise ValueError(f"side information has format {meta.get('format')!r}, expected {SIDE_INFO_FORMAT!r}.")
        theirs, ours = meta.get("identity", {}), self.side_info_identity()
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if diff:
            text = "; ".join(f"{k}: calibrated {a!r}, this scheduler {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"DC-Solver ratios were calibrated for another model schedule or sampler config ({text}). Build the "
                "scheduler with the calibrated settings, or recalibrate for these with `diffalign calibrate`."
            )
        fingerprint, expected = meta.get("model_fingerprint"), self.config.model_fingerprint
        if expected is not None and fingerprint != expected:
            raise ValueError(
                f"DC-Solver ratios were calibrated for model {fingerprint!r}, but this scheduler is for model "
                f"{expected!r}; recalibrate for this model with `diffalign calibrate`."
            )
        table = {}
        if "ratios" in tensors:
            for n, g, row in zip(
                tensors["nfe"].tolist(), tensors["guidance_scale"].tolist(), tensors["ratios"], strict=True
            ):
                table[(int(n), float(g))] = row[: int(n)].tolist()
        cpr = tensors.get("cpr_coeffs")
        if cpr is not None and tuple(cpr.shape) != CPR_SHAPE:
            raise ValueError(f"cpr_coeffs has shape {tuple(cpr.shape)}, expected {CPR_SHAPE}.")
        self.ratio_table = table
        self.cpr_coeffs = None if cpr is None else cpr.double().numpy()
        self.calibration_info = dict(meta.get("calibration", {}))
        if expected is None and fingerprint is not None:
            self.register_to_config(model_fingerprint=fingerprint)
