"""What every diffalign scheduler shares: the diffusers scheduler contract on a VP noise schedule.

Subclasses implement ``_solver_step(model_output, sample, i) -> prev_sample`` and may override ``_plan_grid``;
this module owns config handling, time grids, step indexing, ``add_noise``, model-output conversion and input
checks, so that every solver behaves the same at the pipeline boundary. The config keys themselves are declared in
``config.py``.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from .config import FINAL_SIGMAS_TYPES, PREDICTION_TYPES, keep_model_keys
from .learned_grid import LearnedGridMixin
from .schedule import INTEGER_SPACINGS, SPACINGS, NoiseScheduleVP, alpha_sigma_from_rho, clipped_t_max, time_grid

COMPATIBLES = [e.name for e in KarrasDiffusionSchedulers]


class VPScheduler(LearnedGridMixin, SchedulerMixin):
    """Base class: a diffusers scheduler over a VP schedule whose ``step`` calls ``_solver_step``.

    Grid state after ``set_timesteps(n)`` (``n`` = number of model evaluations = NFE):

    - ``timesteps``: (n,) model times (int64 for diffusers' integer spacings, float32 otherwise);
    - ``sigmas``: (n + 1,) diffusers' sigma ``sigma_t / alpha_t`` at each grid point, float32, last may be 0;
    - ``alpha_grid``, ``sigma_grid``, ``lambda_grid``: the same points as float64 numpy arrays
      (``lambda = +inf`` where the grid ends at sigma 0).
    """

    _compatibles = COMPATIBLES
    order = 1
    predicts_data = True
    """Whether the solver integrates the data prediction ``x0`` (DPM-Solver++, UniPC with ``predict_x0``) or the
    noise prediction ``eps`` (DPM-Solver); ``convert_model_output`` returns that one."""

    def __init_subclass__(cls, **kwargs):
        """Expose ``SchedulerMixin`` in each subclass's module: a saved pipeline's ``model_index.json`` names that
        module, and ``DiffusionPipeline.from_pretrained`` looks the loading base class up there."""
        super().__init_subclass__(**kwargs)
        module = sys.modules.get(cls.__module__)
        if module is not None and not hasattr(module, "SchedulerMixin"):
            module.SchedulerMixin = SchedulerMixin

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config`` that keeps the source's noise schedule and prediction type (keep_model_keys)."""
        if config is not None and not isinstance(config, str) and hasattr(config, "keys"):
            config = keep_model_keys(config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _init_vp(self) -> None:
        """Validate the registered config and build the noise schedule. Call at the end of ``__init__``."""
        cfg = self.config
        if cfg.prediction_type not in PREDICTION_TYPES:
            hint = (
                " Flow-matching models are not VP; use a flow-matching scheduler."
                if "flow" in str(cfg.prediction_type)
                else ""
            )
            raise ValueError(
                f"prediction_type={cfg.prediction_type!r} is not supported by {type(self).__name__}; "
                f"use one of {PREDICTION_TYPES}.{hint}"
            )
        if cfg.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type={cfg.final_sigmas_type!r}; use one of {FINAL_SIGMAS_TYPES}.")
        if cfg.use_flow_sigmas or cfg.use_dynamic_shifting:
            raise ValueError(
                f"{type(self).__name__} supports VP schedules only: use_flow_sigmas and use_dynamic_shifting "
                "are not implemented. Set them to False, or use timestep_spacing="
                "'karras' / 'logSNR' / 'time_uniform' / 'time_quadratic' for other grids."
            )
        if cfg.use_karras_sigmas + cfg.use_lu_lambdas + cfg.use_exponential_sigmas + cfg.use_beta_sigmas > 1:
            raise ValueError(
                "Only one of use_karras_sigmas, use_lu_lambdas, use_exponential_sigmas, use_beta_sigmas can be True."
            )
        self._spacing()  # validates timestep_spacing
        self.noise_schedule = NoiseScheduleVP.from_config(cfg)
        ac = self.noise_schedule.alphas_cumprod
        self.betas = torch.from_numpy(self.noise_schedule.betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(ac).float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(cfg.num_train_timesteps)[::-1].copy())
        self.sigmas = torch.from_numpy(np.sqrt((1 - ac) / ac)[::-1].copy()).float()
        self._step_index = None
        self._begin_index = None

    def _spacing(self) -> str:
        """The effective time grid, folding diffusers' boolean grid flags into ``timestep_spacing``."""
        cfg = self.config
        if cfg.use_karras_sigmas:
            return "karras"
        if cfg.use_lu_lambdas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:  # exponential: uniform lambda
            return "logSNR"
        spacing = cfg.timestep_spacing
        if spacing not in SPACINGS:
            raise ValueError(
                f"timestep_spacing={spacing!r} is not supported; use 'linspace', 'leading', 'trailing', "
                "'time_uniform', 'time_quadratic', 'logSNR' or 'karras'."
            )
        return spacing

    # ---- diffusers contract -------------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """Index of the next grid point to step from; advances by one per ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index for img2img / inpainting, set by the pipeline through ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid for ``num_inference_steps`` model evaluations, or from custom ``timesteps`` / ``sigmas``.

        ``timesteps``: n decreasing model times in training-timestep units; the solve then ends per
        ``final_sigmas_type``. ``sigmas``: n + 1 decreasing diffusers sigmas (``sigma_t / alpha_t``), the last one
        the end point (0 allowed). ``mu`` (dynamic shifting) is not supported by VP schedules. A learned grid for
        ``num_inference_steps`` (``load_learned_grids``, see ``learned_grid.py``) replaces the configured spacing.
        """
        if mu is not None:
            raise ValueError("mu (dynamic shifting) applies to flow-matching schedules only; do not pass it.")
        given = sum(x is not None for x in (num_inference_steps, timesteps, sigmas))
        if given != 1:
            raise ValueError("Pass exactly one of num_inference_steps, timesteps or sigmas to set_timesteps.")
        if num_inference_steps is not None and self.learned_sigmas(int(num_inference_steps)) is not None:
            num_inference_steps, sigmas = None, self.learned_sigmas(int(num_inference_steps))  # learned_grid.py
        schedule = self.noise_schedule
        if sigmas is not None:
            rhos = np.asarray(sigmas, dtype=np.float64).reshape(-1)
            if len(rhos) < 2 or np.any(np.diff(rhos) >= 0) or rhos[-1] < 0:
                raise ValueError(
                    "sigmas must be >= 2 strictly decreasing values >= 0 (n + 1 points for n steps); "
                    f"got {rhos.tolist()}."
                )
            times = schedule.t_of_lambda(-np.log(rhos[:-1]))
            integer_times = False
        else:
            if timesteps is not None:
                model_times = np.asarray(timesteps, dtype=np.float64).reshape(-1)
                if len(model_times) < 1 or np.any(np.diff(model_times) >= 0):
                    raise ValueError(f"timesteps must be strictly decreasing and non-empty:  {model_times.tolist()}.")
                if model_times.min() < 0 or model_times.max() > schedule.t_max:
                    raise ValueError(f"timesteps must lie in [0, {schedule.t_max:g}]; got {model_times.tolist()}.")
                times = np.concatenate([model_times, [0.0]])
                integer_times = bool(np.all(model_times == np.round(model_times)))
            elif self._sigma_flag():
                times, rhos = self._diffusers_sigma_grid(int(num_inference_steps))
                self._set_grid(times, rhos, True, device)
                return
            else:
                if int(num_inference_steps) < 1:
                    raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
                times = self._plan_grid(int(num_inference_steps))
                integer_times = self._spacing() in INTEGER_SPACINGS
            rhos = schedule.rho(times)
            if self.config.final_sigmas_type == "zero":
                rhos[-1] = 0.0
            times = times[:-1]
        self._set_grid(times, rhos, integer_times, device)

    def _grid_name(self) -> str:
        """The time grid in one word: the diffusers sigma flag that is set, else the effective ``timestep_spacing``."""
        flags = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas")
        return next((flag for flag in flags if self.config[flag]), None) or self._spacing()

    def _sigma_flag(self) -> bool:
        """Whether the grid comes from one of diffusers' sigma flags (not from ``timestep_spacing``)."""
        cfg = self.config
        return bool(cfg.use_karras_sigmas or cfg.use_lu_lambdas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas)

    def _diffusers_sigma_grid(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' grid for ``use_karras_sigmas`` / ``use_lu_lambdas`` / ``use_exponential_sigmas`` /
        ``use_beta_sigmas``, exactly: ``times`` (n,) and ``rhos`` (n + 1,).

        diffusers spaces its ``n`` model sigmas from ``sigma_max`` down to ``sigma_min`` inclusive (Karras et al.
        2022, Eq. 5; uniform in ``log sigma``; or at quantiles of Beta(0.6, 0.6), Lee et al. 2024), evaluates the
        model at their timesteps rounded to integers while the solver steps between the unrounded sigmas, and ends at
        0 or repeats the smallest training sigma per ``final_sigmas_type``. Our own ``timestep_spacing='karras'`` /
        ``'logSNR'`` instead place ``n + 1`` points and evaluate at their exact times (docs/samplers.md).
        """
        n, cfg, schedule = num_inference_steps, self.config, self.noise_schedule
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}.")
        top, bottom = float(schedule.rho(schedule.t_max)), float(schedule.rho(0.0))
        if not cfg.use_lu_lambdas:  # diffusers' Karras / exponential / beta grids honour sigma_min / sigma_max
            top = top if cfg.sigma_max is None else float(cfg.sigma_max)
            bottom = bottom if cfg.sigma_min is None else float(cfg.sigma_min)
        ramp = np.linspace(0.0, 1.0, n)
        if cfg.use_karras_sigmas:
            rhos = (top ** (1 / 7) + ramp * (bottom ** (1 / 7) - top ** (1 / 7))) ** 7
        elif cfg.use_beta_sigmas:
            try:
                from scipy.stats import beta
            except ImportError as err:
                raise ImportError("use_beta_sigmas needs scipy, as in diffusers: `pip install scipy`.") from err
            rhos = bottom + beta.ppf(1.0 - ramp, 0.6, 0.6) * (top - bottom)
        else:
            rhos = np.exp(np.log(top) + ramp * (np.log(bottom) - np.log(top)))
        # diffusers truncates (instead of rounding) exponential / beta / cosine timesteps in float32, which puts
        # even sigma_max at t = 998 for 1000 training steps; we round them all (docs/samplers.md)
        times = np.round(schedule.t_of_lambda(-np.log(rhos)))  # (n,)
        last = 0.0 if cfg.final_sigmas_type == "zero" else float(schedule.rho(0.0))
        return times, np.concatenate([rhos, [last]])

    def _plan_grid(self, num_inference_steps: int) -> np.ndarray:
        """``n + 1`` decreasing grid times for ``n`` steps; singlestep solvers override it to place stages."""
        cfg = self.config
        return time_grid(
            self.noise_schedule,
            num_inference_steps,
            spacing=self._spacing(),
            steps_offset=cfg.steps_offset,
            t_max=clipped_t_max(self.noise_schedule, cfg.lambda_min_clipped),
            rho_min=cfg.sigma_min,
            rho_max=cfg.sigma_max,
        )

    def _set_grid(self, times: np.ndarray, rhos: np.ndarray, integer_times: bool, device) -> None:
        """Store the grid (``times``: (n,), ``rhos``: (n + 1,)) and reset all solver state."""
        self.alpha_grid, self.sigma_grid = alpha_sigma_from_rho(rhos)  # (n + 1,) each
        with np.errstate(divide="ignore"):
            self.lambda_grid = np.log(self.alpha_grid) - np.log(self.sigma_grid)  # +inf where rho = 0
        dtype = torch.int64 if integer_times else torch.float32
        self.timesteps = torch.from_numpy(np.ascontiguousarray(times)).to(device=device, dtype=dtype)
        self.sigmas = torch.from_numpy(np.ascontiguousarray(rhos)).float()
        self.num_inference_steps = len(times)
        self._step_index = None
        self._begin_index = None
        self._reset_solver_state()

    def _reset_solver_state(self) -> None:
        """Clear model-output history; called by ``set_timesteps``."""

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """VP models take ``x_t`` unscaled."""
        return sample

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Grid index of ``timestep`` (the second match when a timestep repeats, as diffusers does; the last index,
        with a warning, when it is not on the grid, as diffusers does without one)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = torch.as_tensor(timestep).to(schedule_timesteps.device).reshape(-1)[0]
        matches = torch.isclose(schedule_timesteps.double(), t.double(), rtol=0.0, atol=1e-4).nonzero()
        if len(matches) == 0:
            warnings.warn(
                f"timestep {float(t):g} is not on this scheduler's grid {schedule_timesteps.tolist()}; stepping "
                "from the last grid point, as diffusers does. Pass the scheduler's own `timesteps`, or call "
                "set_begin_index(i) to start from a later index.",
                stacklevel=3,
            )
            return len(schedule_timesteps) - 1
        return int(matches[1 if len(matches) > 1 else 0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        self._first_index = self._step_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> SchedulerOutput | tuple:
        """One model evaluation's worth of solver: from grid point ``step_index`` to the next one.

        ``sample``'s dtype is kept; the update itself runs in float32 (float64 if ``sample`` is float64).
        """
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step was called before set_timesteps; call set_timesteps first.")
        model_output = self.check_model_output(model_output, sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(
                f"all {self.num_inference_steps} steps were already taken; call set_timesteps again to sample anew."
            )
        compute_dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x = sample.to(compute_dtype)
        prev_sample = self._solver_step(model_output.to(compute_dtype), x, i)
        self._step_index += 1
        prev_sample = prev_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _solver_step(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t x_0 + sigma_t eps`` at any (integer or float) training timesteps, one per sample."""
        if original_samples.shape != noise.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(original_samples.shape)}.")
        t = torch.as_tensor(timesteps).reshape(-1).detach().cpu().double().numpy()
        if len(t) not in (1, original_samples.shape[0]):
            raise ValueError(f"got {len(t)} timesteps for a batch of {original_samples.shape[0]} samples.")
        alpha, sigma = self.noise_schedule.alpha_sigma(t)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        kw = dict(device=original_samples.device, dtype=original_samples.dtype)
        return (
            torch.tensor(alpha, **kw).reshape(shape) * original_samples
            + torch.tensor(sigma, **kw).reshape(shape) * noise
        )

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- model outputs ------------------------------------------------------------------------------------------
    def check_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Shape check; models with a learned variance return 2C channels, of which we keep the first C."""
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError(
                "model_output and sample must be torch.Tensors; got "
                f"{type(model_output).__name__} and {type(sample).__name__} (did you pass the UNet's output object "
                "instead of `.sample`?)."
            )
        if model_output.shape == sample.shape:
            return model_output
        learned = self.config.variance_type in ("learned", "learned_range")
        if learned and model_output.ndim == sample.ndim and model_output.shape[1] == 2 * sample.shape[1]:
            return model_output[:, : sample.shape[1]]
        raise ValueError(
            f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}; "
            "they must match (a model with a learned variance returns 2C channels: set variance_type='learned')."
        )

    def grid_alpha_sigma(self, s: int, t: int) -> tuple[float, float, float, float]:
        """``(alpha_s, sigma_s, alpha_t, sigma_t)`` at grid points ``s`` and ``t``: the ends of a step ``s -> t``."""
        a, sg = self.alpha_grid, self.sigma_grid
        return float(a[s]), float(sg[s]), float(a[t]), float(sg[t])

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """The model term the solver integrates at grid point ``i``: ``x0`` or ``eps`` (see ``predicts_data``).

        diffusers' ``convert_model_output``, with the grid index passed instead of read from ``step_index``.
        """
        x0, eps = self.x0_and_eps(model_output, sample, i)
        return x0 if self.predicts_data else eps

    def x0_and_eps(self, model_output: torch.Tensor, sample: torch.Tensor, i: int):
        """Data and noise predictions ``(x0, eps)`` at grid point ``i`` from the raw model output.

        epsilon: ``x0 = (x - sigma eps) / alpha``; v: ``x0 = alpha x - sigma v``, ``eps = alpha v + sigma x``;
        sample: ``eps = (x - alpha x0) / sigma`` (Salimans & Ho 2022, Sec. 4). Thresholding and ``clip_sample``
        act on ``x0`` and ``eps`` is recomputed from it.
        """
        alpha, sigma = float(self.alpha_grid[i]), float(self.sigma_grid[i])
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
            x0 = (sample - sigma * eps) / alpha
        elif kind == "v_prediction":
            x0 = alpha * sample - sigma * model_output
            eps = alpha * model_output + sigma * sample
        else:
            x0 = model_output
            eps = (sample - alpha * x0) / sigma
        if self.config.thresholding or self.config.clip_sample:
            x0 = self._threshold_sample(x0)
            eps = (sample - alpha * x0) / sigma
        return x0, eps

    def _threshold_sample(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3), or plain clipping with ``clip_sample``."""
        cfg = self.config
        if cfg.thresholding:
            flat = x0.reshape(x0.shape[0], -1).abs().float()  # (B, C*H*W)
            s = torch.quantile(flat, cfg.dynamic_thresholding_ratio, dim=1).clamp(min=1.0, max=cfg.sample_max_value)
            s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
            x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0


def eps_from_model_output(out, x, alpha, sigma, prediction_type: str):
    """The noise prediction from a raw model output of any diffusers prediction type (Salimans & Ho 2022, Sec. 4)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha * out + sigma * x
    if prediction_type == "sample":
        return (x - alpha * out) / sigma
    raise ValueError(f"prediction_type={prediction_type!r}; use one of {PREDICTION_TYPES}.")
