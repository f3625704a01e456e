"""The config keys every diffalign scheduler shares: their types, their defaults, and which describe the model.

Each scheduler spells its keys out in its own ``__init__`` so that diffusers' ``@register_to_config`` records every
one of them (and ``save_pretrained`` writes them). ``SharedConfig`` is the one source those signatures copy:
``tests/samplers/test_config_keys.py`` checks that every registered scheduler takes each of its keys with the same
type and default, as diffusers' "Copied from" checks keep copied code in step. Enumerated keys are ``Literal`` types,
as in diffusers' own schedulers; the lists the schedulers validate against are read from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["linspace", "leading", "trailing", "time_uniform", "time_quadratic", "logSNR", "karras"]
"""diffusers' three integer spacings (Lin et al. 2023, Table 2), then DPM-Solver's continuous ``time_uniform`` /
``time_quadratic`` / ``logSNR`` (Lu et al. 2022, Sec. 3.3 and App. D) and EDM's ``karras`` (Karras et al. 2022, Eq. 5,
rho = 7)."""
FinalSigmasType = Literal["zero", "sigma_min"]
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
SolverType = Literal["midpoint", "heun", "dpmsolver", "taylor", "bh1", "bh2", "logrho"]
"""Every diffusers ``solver_type`` (DPM-Solver's, UniPC's ``bh1`` / ``bh2``, DEIS' ``logrho``); each scheduler reads
the ones of other families as its own default, as diffusers does."""
SolverMode = Literal["multistep", "singlestep"]
# keys of other diffusers schedulers, accepted (and ignored) so that `from_config` round-trips through ours
AlgorithmType = Literal[
    "dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++", "deis", "data_prediction", "noise_prediction"
]
TimeShiftType = Literal["exponential", "linear"]
TimestepType = Literal["discrete", "continuous"]
InterpolationType = Literal["linear", "log_linear"]

PREDICTION_TYPES = get_args(PredictionType)
FINAL_SIGMAS_TYPES = get_args(FinalSigmasType)
SOLVER_MODES = get_args(SolverMode)


@dataclass(frozen=True)
class SharedConfig:
    """The keys (type and default) that every registered scheduler's ``__init__`` takes; diffusers' defaults."""

    # the model: its noise schedule and output (MODEL_KEYS)
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: np.ndarray | list[float] | None = None
    rescale_betas_zero_snr: bool = False
    prediction_type: PredictionType = "epsilon"
    variance_type: VarianceType | None = None
    # the solver's order
    solver_order: int = 2
    lower_order_final: bool = True
    # the data prediction: Imagen's dynamic thresholding or plain clipping
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # the time grid
    timestep_spacing: TimestepSpacing = "linspace"
    steps_offset: int = 0
    final_sigmas_type: FinalSigmasType = "zero"
    lambda_min_clipped: float = -float("inf")
    use_karras_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_exponential_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    # other diffusers schedulers' keys: accepted so that `from_config` round-trips; the flow / beta ones must be off
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: TimeShiftType = "exponential"
    algorithm_type: AlgorithmType | None = None
    set_alpha_to_one: bool | None = None
    skip_prk_steps: bool | None = None
    interpolation_type: InterpolationType | None = None
    timestep_type: TimestepType | None = None
    disable_corrector: list[int] | None = None
    solver_p: object | None = None
    shift_terminal: float | None = None


OWN_DEFAULTS: dict[str, dict[str, object]] = {
    "dpm_solver_v3": {"timestep_spacing": "time_quadratic"},
}
"""Shared keys whose default a scheduler sets otherwise, by measurement. DPM-Solver-v3 on ``time_quadratic`` (the
official code's ``skip_type`` for pixel models) has 0.14-0.82x the error of diffusers' UniPC at its defaults at NFE
5-10 on both digits models as shipped, where on ``linspace`` it had 0.97-7.2x (docs/dpm_solver_v3.md,
``scripts/v3_defaults.py``)."""

MODEL_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
)
"""Config keys that describe the model (its noise schedule and output), not the sampler."""


def keep_model_keys(config) -> dict:
    """A copy of a scheduler config whose model keys survive ``from_config`` into any other scheduler class.

    diffusers drops the keys listed in ``_use_default_values`` when switching classes, so that the target's own
    defaults apply. For sampler settings that is right; for the noise schedule it is not: HeunDiscreteScheduler's
    default betas (0.00085..0.012) differ from DDPMScheduler's (0.0001..0.02), and a default-built DDPM config
    switched to Heun would silently sample another model's schedule.
    """
    config = dict(config)
    used_defaults = config.get("_use_default_values", [])
    config["_use_default_values"] = [k for k in used_defaults if k not in MODEL_KEYS]
    return config
