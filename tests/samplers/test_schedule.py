"""The VP schedule and time grids against diffusers and against their definitions."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from diffalign.samplers.schedule import NoiseScheduleVP, alpha_sigma_from_lambda, time_grid

BETA_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(trained_betas=np.linspace(1e-4, 2e-2, 1000).tolist()),
]


@pytest.mark.parametrize("config", BETA_CONFIGS)
def test_alphas_cumprod_match_diffusers(config):
    ours = NoiseScheduleVP.from_config(config)
    theirs = DPMSolverMultistepScheduler(**config).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours.alphas_cumprod, theirs, rtol=2e-6, atol=1e-9)  # float32 cumprod tail
    alpha, sigma = ours.alpha_sigma(np.arange(1000))
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-12)
    np.testing.assert_allclose(alpha**2, ours.alphas_cumprod, rtol=1e-10)


def test_lambda_is_piecewise_linear_and_inverse_is_exact():
    s = NoiseScheduleVP.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    t = np.linspace(0, 999, 7919)
    np.testing.assert_allclose(s.t_of_lambda(s.lambda_t(t)), t, atol=1e-8)
    mid = s.lambda_t(10.5)
    assert mid == pytest.approx(0.5 * (s.lambdas[10] + s.lambdas[11]), abs=1e-14)
    a, b = alpha_sigma_from_lambda(np.array([-30.0, 0.0, 30.0]))
    np.testing.assert_allclose(a**2 + b**2, 1.0, atol=1e-14)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        s.lambda_t(1000.5)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 5, 10, 25, 50])
def test_integer_spacings_match_diffusers(spacing, n):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    theirs = DPMSolverMultistepScheduler(timestep_spacing=spacing, **config)
    theirs.set_timesteps(n)
    grid = time_grid(NoiseScheduleVP.from_config(config), n, spacing=spacing, steps_offset=1)
    assert grid.shape == (n + 1,) and grid[-1] == 0
    np.testing.assert_array_equal(grid[:-1], theirs.timesteps.numpy())


def test_continuous_grids_follow_their_definitions():
    s = NoiseScheduleVP.from_config({})
    lam = s.lambda_t(time_grid(s, 12, spacing="logSNR"))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)  # uniform in lambda
    tu = time_grid(s, 12, spacing="time_uniform")
    np.testing.assert_allclose(np.diff(tu), -999 / 12, rtol=1e-12)
    tq = time_grid(s, 12, spacing="time_quadratic")
    np.testing.assert_allclose(np.diff(np.sqrt(tq)), np.diff(np.sqrt(tq))[0], rtol=1e-9)
    rho = s.rho(time_grid(s, 12, spacing="karras"))
    np.testing.assert_allclose(np.diff(rho ** (1 / 7)), np.diff(rho ** (1 / 7))[0], rtol=1e-6)
    assert rho[0] == pytest.approx(s.rho(999.0)) and rho[-1] == pytest.approx(s.rho(0.0))


@pytest.mark.parametrize("spacing", ["linspace", "logSNR", "karras", "time_uniform", "time_quadratic"])
def test_grids_decrease_and_reject_bad_counts(spacing):
    s = NoiseScheduleVP.from_config({})
    for n in (1, 2, 7, 100):
        g = time_grid(s, n, spacing=spacing)
        assert g.shape == (n + 1,) and np.all(np.diff(g) < 0)
    for bad in (0, -3, None):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            time_grid(s, bad, spacing=spacing)


def test_bad_schedule_inputs_are_named():
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        NoiseScheduleVP.from_config(dict(beta_schedule="cosine"))
    with pytest.raises(ValueError, match="trained_betas has shape"):
        NoiseScheduleVP.from_config(dict(trained_betas=[[0.1, 0.2]]))
    with pytest.warns(UserWarning, match="trained_betas has 2 entries but num_train_timesteps=1000"):
        assert NoiseScheduleVP.from_config(dict(trained_betas=[0.1, 0.2])).num_train_timesteps == 2
    with pytest.raises(ValueError, match="timestep_spacing='uniform'"):
        time_grid(NoiseScheduleVP.from_config({}), 5, spacing="uniform")


def test_ddpm_default_config_gives_same_schedule():
    cfg = DDPMScheduler().config
    np.testing.assert_allclose(
        NoiseScheduleVP.from_config(cfg).alphas_cumprod, DDPMScheduler().alphas_cumprod.to(torch.float64), rtol=1e-6
    )
