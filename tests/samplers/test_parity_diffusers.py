"""Parity with diffusers' DPMSolverMultistepScheduler / DPMSolverSinglestepScheduler on the same model function.

Max abs difference of float32 samples (16 digits-mixture images, SD betas) after 5 / 10 / 20 steps. The tolerance
is 1e-5 where float32 allows it: data prediction ending at sigma 0 (measured <= 6.0e-6). Noise prediction and
``sigma_min`` endings amplify float32 rounding: there diffusers' own result is 1e-5 to 2.5e-3 from a float64 run of
the same algorithm, so those configs carry the looser tolerance listed next to them (measured differences in
comments). The one place where we differ by design: singlestep third order with ``solver_type='midpoint'``, whose
intermediate stage ``u_2`` is the paper's Taylor form (Lu et al. 2022a, Alg. 2; official code) here and diffusers'
own midpoint form there.

Per sample, the bound is the stated tolerance plus twice diffusers' own float32 conditioning: how far diffusers'
result moves when x_T moves by one ulp. That term is ~5e-7 for 15 of the 16 samples; one sample (index 7) lies
where the mixture's posterior weights nearly tie, and there diffusers itself moves by 3.8e-5 at 10 steps under a
one-ulp change of x_T (measured with numpy 2.4 / OpenBLAS Haswell kernels; other BLAS builds put it below 1e-5).
"""

import warnings

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

from diffalign.models.gmm import GaussianMixture
from diffalign.samplers import DPMSolverPPScheduler, DPMSolverScheduler

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PP, NOISE = dict(algorithm_type="dpmsolver++"), dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")

MULTISTEP = [  # (config, tolerance); measured max difference over 5 / 10 / 20 steps in the comment
    (dict(**PP, solver_order=2), 1e-5),  # 1.7e-6
    (dict(**PP, solver_order=2, solver_type="heun"), 1e-5),  # 6.0e-6
    (dict(**PP, solver_order=3), 1e-5),  # 4.1e-6
    (dict(**PP, solver_order=2, **SD_BETAS, timestep_spacing="leading", steps_offset=1), 1e-5),  # 1.1e-6
    (
        dict(**PP, solver_order=2, **SD_BETAS, timestep_spacing="trailing", prediction_type="v_prediction"),
        1e-5,
    ),  # 5.7e-6
    (dict(**PP, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), 1e-4),  # 2.6e-5
    (dict(**PP, solver_order=2, euler_at_final=True, final_sigmas_type="sigma_min"), 1e-5),  # 1.5e-6
    (dict(**PP, solver_order=2, thresholding=True, sample_max_value=1.5), 1e-5),  # 1.3e-6
    (dict(**NOISE, solver_order=2), 2e-4),  # 5.2e-5
    (dict(**NOISE, solver_order=2, solver_type="heun"), 1e-4),  # 7.4e-6
    (dict(**NOISE, solver_order=3), 2e-4),  # 8.3e-5
]
SINGLESTEP = [
    (dict(**PP, solver_order=2), 1e-5),  # 5.4e-6
    (dict(**PP, solver_order=2, solver_type="heun"), 1e-5),  # 4.5e-6
    (dict(**PP, solver_order=3, solver_type="heun"), 1e-5),  # 8.0e-6
    (dict(**PP, solver_order=2, final_sigmas_type="sigma_min"), 1e-5),  # 5.5e-6
    (dict(**NOISE, solver_order=2), 1e-3),  # 3.0e-4 at 5 steps (diffusers 3.5e-4 from float64), else 3.3e-6
    (dict(**NOISE, solver_order=2, solver_type="heun"), 2e-4),  # 5.0e-5 at 5 steps, else 2.9e-6
    (dict(**NOISE, solver_order=3, solver_type="heun"), 5e-3),  # 1.6e-3 at 5 steps (diffusers 2.5e-3), else 1.1e-5
]


def _id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items() if k not in ("beta_start", "beta_end"))


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.from_digits(**SD_BETAS)


def run(scheduler, model, x, n):
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x


def pair(diffusers_cls, config, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates algorithm_type="dpmsolver"
        theirs = diffusers_cls(**config)
    ours_cls = DPMSolverPPScheduler if config["algorithm_type"] == "dpmsolver++" else DPMSolverScheduler
    # Explicit keys: `from_config` drops keys the source left at its defaults (diffusers' `_use_default_values`).
    ours = ours_cls(**{k: v for k, v in config.items() if k != "algorithm_type"}, solver_mode=mode)
    return theirs, ours


def x_T():
    return torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def assert_parity(diffusers_cls, config, mode, model, n, tol):
    """max |ours - theirs| per sample <= tol + 2 * (diffusers' own change under a one-ulp change of x_T)."""
    theirs, ours = pair(diffusers_cls, config, mode)
    reference = run(theirs, model, x_T(), n)  # (16, 1, 8, 8)
    nudged = torch.nextafter(x_T(), torch.tensor(float("inf")))
    spread = (run(pair(diffusers_cls, config, mode)[0], model, nudged, n) - reference).abs().flatten(1).amax(1)
    difference = (run(ours, model, x_T(), n) - reference).abs().flatten(1).amax(1)  # (16,)
    assert (difference <= tol + 2 * spread).all(), (difference.max().item(), spread.max().item())


def _case_id(case):
    return _id(case[0])


@pytest.mark.parametrize("n", [5, 10, 20])
@pytest.mark.parametrize("case", MULTISTEP, ids=_case_id)
def test_multistep_matches_diffusers(case, n, gmm):
    config, tol = case
    assert_parity(DPMSolverMultistepScheduler, config, "multistep", gmm, n, tol)


@pytest.mark.parametrize("n", [5, 10, 20])
@pytest.mark.parametrize("case", SINGLESTEP, ids=_case_id)
def test_singlestep_matches_diffusers(case, n, gmm):
    config, tol = case
    assert_parity(DPMSolverSinglestepScheduler, {**config, "lower_order_final": True}, "singlestep", gmm, n, tol)


@pytest.mark.parametrize("config", [c for c, tol in MULTISTEP + SINGLESTEP if tol > 1e-5][:3], ids=_id)
def test_where_tolerance_is_looser_ours_is_no_less_accurate_in_float32(config, gmm):
    """Against the float64 run of the same algorithm, our float32 result is at least as close as diffusers'."""
    theirs, ours = pair(DPMSolverMultistepScheduler, config, "multistep")
    truth = run(ours, gmm, x_T().double(), 10)
    theirs_err = (run(theirs, gmm, x_T(), 10).double() - truth).abs().max()
    ours_err = (run(ours, gmm, x_T(), 10).double() - truth).abs().max()
    assert ours_err <= theirs_err


@pytest.mark.parametrize("n", [6, 9])
def test_singlestep_third_order_midpoint_uses_the_papers_intermediate_stage(n, gmm):
    config = dict(**PP, solver_order=3, lower_order_final=True)
    theirs, ours = pair(DPMSolverSinglestepScheduler, config, "singlestep")
    assert (run(theirs, gmm, x_T(), n) - run(ours, gmm, x_T(), n)).abs().max() > 1e-3


def test_timesteps_and_sigmas_match(gmm):
    theirs, ours = pair(DPMSolverMultistepScheduler, dict(**PP, **SD_BETAS, timestep_spacing="leading"), "multistep")
    theirs.set_timesteps(13)
    ours.set_timesteps(13)
    assert torch.equal(theirs.timesteps, ours.timesteps)
    torch.testing.assert_close(theirs.sigmas, ours.sigmas, rtol=1e-6, atol=0)
