"""DC-Solver: UniPC parity with ratios 1, the compensation, calibration, CPR and the ratios' side information.

Parity: max abs difference of float32 samples (16 digits-mixture images, SD betas) against diffusers'
``UniPCMultistepScheduler`` after 5 / 10 / 20 steps; measured values in the comments. diffusers' ``bh1`` ends in NaN
when the last sigma is 0 (its ``B(h) = -inf`` times 0): there we compare every step but the last, whose result here is
the data prediction. Error ratios are measured against the exact mixture's dopri5 solution (rtol 1e-10) on starting
noises that calibration never saw.
"""

import itertools
import warnings

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from diffalign.evaluation.benchmark import make_scheduler
from diffalign.evaluation.sampling import sample
from diffalign.evaluation.targets import gmm_target
from diffalign.models.gmm import GMM_SCHEDULER_DIR, GaussianMixture
from diffalign.samplers import DCSolverScheduler
from diffalign.samplers.dc_calibrate import calibrate_dc, fit_cpr_coefficients, model_fingerprint
from diffalign.samplers.dc_cpr import cpr_ratios, fit_cpr
from diffalign.samplers.unipc import lagrange_compensation

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SIGMA_MIN = dict(final_sigmas_type="sigma_min")
BH = ("bh1", "bh2")
PARITY = [  # (config, tolerance): measured max difference over 5 / 10 / 20 steps in the comment
    *[(dict(solver_type="bh2", solver_order=o), 1e-5) for o in (1, 2, 3)],  # <= 2.9e-6
    *[(dict(solver_type=t, solver_order=o, **SIGMA_MIN), 1e-5) for t, o in itertools.product(BH, (1, 2, 3))],
    (dict(solver_type="bh1", solver_order=2, predict_x0=False, **SIGMA_MIN), 1e-5),  # 2.1e-6
    (dict(solver_type="bh2", solver_order=3, predict_x0=False, **SIGMA_MIN), 1e-5),  # 4.9e-6
    (dict(solver_type="bh2", solver_order=2, disable_corrector=[0, 2]), 1e-5),  # 1.5e-6
    (dict(solver_type="bh1", solver_order=3, lower_order_final=False, **SIGMA_MIN), 3e-5),  # 1.0e-5
    (dict(solver_type="bh2", solver_order=3, lower_order_final=False, **SIGMA_MIN), 3e-5),  # 1.2e-5
    (dict(solver_type="bh2", solver_order=2, prediction_type="v_prediction", timestep_spacing="trailing"), 5e-5),
]  # the last: 1.8e-5 at 20 steps (t = 999 with SD betas: alpha_T = 0.068 amplifies float32 rounding)


@pytest.fixture(scope="module")
def sd_gmm():
    return GaussianMixture.from_digits(**SD_BETAS)


@pytest.fixture(scope="module")
def gmm():
    return gmm_target()


def run(scheduler, model, x, n, steps=None):
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps[:steps]:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x


def x_T(batch=16, seed=0):
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config,tol", PARITY, ids=["-".join(f"{k}={v}" for k, v in c.items()) for c, _ in PARITY])
def test_ratios_one_match_diffusers_unipc(config, tol, sd_gmm):
    config = {**config, **SD_BETAS}
    for n in (5, 10, 20):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ours = run(DCSolverScheduler(**config), sd_gmm, x_T(), n)
        theirs = run(UniPCMultistepScheduler(**config), sd_gmm, x_T(), n)
        assert (ours - theirs).abs().max() <= tol, n


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bh1_to_sigma_zero_is_finite_where_diffusers_gives_nan(order, sd_gmm):
    config = dict(solver_type="bh1", solver_order=order, **SD_BETAS)
    theirs = UniPCMultistepScheduler(**config)
    assert torch.isnan(run(theirs, sd_gmm, x_T(), 6)).any()
    ours = DCSolverScheduler(**config)
    ours.set_dc_ratios(6, [1.0] * 6)
    before_last = run(ours, sd_gmm, x_T(), 6, steps=5)
    assert (before_last - run(UniPCMultistepScheduler(**config), sd_gmm, x_T(), 6, steps=5)).abs().max() < 1e-5
    t = ours.timesteps[-1]
    alpha, sigma = (float(v) for v in ours.noise_schedule.alpha_sigma(float(t)))
    last = ours.step(sd_gmm(before_last, t).sample, t, before_last).prev_sample
    x0 = (before_last - sigma * sd_gmm(before_last, t).sample) / alpha
    corrected = (last - x0).abs().max()  # the corrector moved x_t, so the data prediction differs a little
    assert torch.isfinite(last).all() and corrected < 0.5


def test_lagrange_compensation_reproduces_polynomials_and_ratio_one():
    ts = [999.0, 799.0, 599.0]  # newest first, as the scheduler passes them
    a, b, c = (torch.randn(4, generator=torch.Generator().manual_seed(k)) for k in range(3))
    ms = [a + b * t + c * t**2 for t in ts]
    for tau in (700.0, 999.0, 1100.0):
        torch.testing.assert_close(lagrange_compensation(ms, ts, tau), a + b * tau + c * tau**2, rtol=1e-4, atol=1e-3)
    rho = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    out = lagrange_compensation(ms, ts, ts[1] + rho * (ts[0] - ts[1]))
    torch.testing.assert_close(out, ms[0], rtol=1e-6, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(rho.grad.float(), ((b + 2 * c * ts[0]) * (ts[0] - ts[1])).sum(), rtol=1e-4, atol=1e-3)


def test_ratio_one_is_unipc_and_other_ratios_change_the_sample(sd_gmm):
    base = run(UniPCMultistepScheduler(**SD_BETAS), sd_gmm, x_T(), 5)
    s = DCSolverScheduler(**SD_BETAS)
    s.set_dc_ratios(5, [1.0] * 5)
    unipc = run(s, sd_gmm, x_T(), 5)
    assert (unipc - base).abs().max() < 1e-5
    s.set_dc_ratios(5, [1.0, 1.0, 1.1, 1.0, 1.0])
    assert (run(s, sd_gmm, x_T(), 5) - unipc).abs().max() > 1e-3
    with pytest.raises(ValueError, match="first dc_order=2 ratios must be 1"):
        s.set_dc_ratios(5, [1.0, 1.2, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="need 5 finite ratios"):
        s.set_dc_ratios(5, [1.0] * 4)


# ---- calibration ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated(gmm):
    """Ratios for NFE 5 and 6 on 10 datapoints of seed 0 (about 2 s)."""
    return calibrate_dc(
        gmm.model,
        gmm.scheduler_config,
        sample_shape=gmm.sample_shape,
        nfe=[5, 6],
        n_datapoints=10,
        seed=0,
        substeps=20,
    )


def _mse(scheduler, target, noise, reference, n):
    return (sample(target.model, noise, scheduler, n).double() - reference).pow(2).mean().item()


@pytest.fixture(scope="module")
def unseen(gmm):
    noise = x_T(batch=100, seed=123)
    rho_T = float(DCSolverScheduler().noise_schedule.rho(999))
    return noise, gmm.reference(noise, rho_T)


@pytest.mark.parametrize("nfe,margin", [(5, 1.25), (6, 1.2)])  # measured error ratios 1.43 and 1.37
def test_calibrated_dc_beats_unipc_on_unseen_noises(nfe, margin, calibrated, gmm, unseen):
    unipc = UniPCMultistepScheduler.from_config(gmm.scheduler_config)
    assert calibrated.ratios_for(nfe)[1] == "calibrated"
    ratio = _mse(unipc, gmm, *unseen, nfe) / _mse(calibrated, gmm, *unseen, nfe)
    assert ratio > margin


def test_calibration_is_deterministic_under_a_seed(gmm, calibrated):
    again = calibrate_dc(
        gmm.model, gmm.scheduler_config, sample_shape=gmm.sample_shape, nfe=5, n_datapoints=10, seed=0, substeps=20
    )
    assert again.ratio_table[(5, 1.0)] == calibrated.ratio_table[(5, 1.0)]
    other = calibrate_dc(
        gmm.model, gmm.scheduler_config, sample_shape=gmm.sample_shape, nfe=5, n_datapoints=10, seed=1, substeps=20
    )
    assert np.abs(np.subtract(other.ratio_table[(5, 1.0)], again.ratio_table[(5, 1.0)])).max() > 1e-3


# ---- side information -----------------------------------------------------------------------------------------------
def test_ratios_round_trip_through_save_and_from_pretrained(calibrated, gmm, tmp_path):
    calibrated.register_to_config(model_fingerprint="gmm-test")
    calibrated.save_pretrained(tmp_path)
    loaded = DCSolverScheduler.from_pretrained(tmp_path)
    assert loaded.ratio_table == calibrated.ratio_table and loaded.config.model_fingerprint == "gmm-test"
    noise = x_T(batch=4)
    assert torch.equal(sample(gmm.model, noise, loaded, 6), sample(gmm.model, noise, calibrated, 6))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(solver_order=3), "solver_order: calibrated 2, this scheduler 3"),
        (dict(solver_type="bh1"), "solver_type"),
        (dict(beta_end=0.012), "schedule_sha256"),
        (dict(timestep_spacing="trailing"), "timestep_spacing"),
        (dict(model_fingerprint="another-model"), "calibrated for model 'gmm-test'"),
    ],
)
def test_ratios_for_another_model_or_config_are_refused(change, match, calibrated, tmp_path):
    calibrated.register_to_config(model_fingerprint="gmm-test")
    calibrated.save_pretrained(tmp_path)
    other = DCSolverScheduler.from_config(calibrated.config, **change)
    with pytest.raises(ValueError, match=match):
        other.load_side_info(tmp_path)
    with pytest.raises(ValueError, match=match):
        DCSolverScheduler.from_pretrained(tmp_path, **change)


def test_ratio_source_and_the_fallback_warning(calibrated):
    s = DCSolverScheduler.from_config(dict(calibrated.config))  # a copy of the config: no ratios carried
    with pytest.warns(UserWarning, match="no compensation ratios for NFE 5"):
        s.set_timesteps(5)
    assert s.dc_ratio_source == "fallback" and s.dc_ratios == [1.0] * 5
    with pytest.warns(UserWarning, match="no compensation ratios for NFE 7"):
        s.set_timesteps(7)  # at every set_timesteps
    s.ratio_table = dict(calibrated.ratio_table)
    s.set_timesteps(6)
    assert s.dc_ratio_source == "calibrated"
    s.set_timesteps(timesteps=[999, 700, 400, 200, 50])
    assert s.dc_ratio_source == "fallback"


def test_bench_loads_the_shipped_ratios_and_falls_back_on_a_mismatch(gmm):
    s = make_scheduler(DCSolverScheduler, gmm.scheduler_config, {}, GMM_SCHEDULER_DIR)
    for nfe in (5, 6, 8, 10):
        s.set_timesteps(nfe)
        assert s.dc_ratio_source == "calibrated" and s.dc_ratios[-1] != 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.set_timesteps(11)  # inside the calibrated NFE 4-15: CPR interpolates, silently
    assert s.dc_ratio_source == "cpr"
    with pytest.warns(UserWarning, match="NFE 30 is outside the calibrated NFE 4-15"):
        s.set_timesteps(30)
    assert s.dc_ratio_source == "fallback" and s.dc_ratios == [1.0] * 30  # CPR gave ratios of -2 there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.set_timesteps(30)  # said once per instance and NFE: a sweep over batches does not repeat it
        s.set_timesteps(31)
    assert len(caught) == 1 and str(caught[0].message).startswith("DCSolverScheduler: NFE 31 is outside")
    with pytest.warns(UserWarning, match="side information not used.*solver_order"):
        other = make_scheduler(DCSolverScheduler, gmm.scheduler_config, {"solver_order": 3}, GMM_SCHEDULER_DIR)
    assert not other.ratio_table and other.cpr_coeffs is None


def test_model_fingerprint_tells_models_apart():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert model_fingerprint(a) == model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint("my-model") == "my-model"
    with pytest.raises(TypeError, match="nn.Module or a str"):
        model_fingerprint(lambda x, t: x)


# ---- cascade polynomial regression ----------------------------------------------------------------------------------
def test_cpr_recovers_a_cascade_polynomial_and_needs_three_nfe_values():
    W = np.random.default_rng(0).normal(size=(4, 3, 3)) * 0.1
    settings = [(n, g, cpr_ratios(W, n, g, 2)) for n in (5, 6, 8, 10, 15) for g in (1.5, 4.0, 7.5)]
    fitted = fit_cpr(settings, dc_order=2)
    for n, g in [(7, 3.0), (12, 6.0)]:
        np.testing.assert_allclose(cpr_ratios(fitted, n, g, 2), cpr_ratios(W, n, g, 2), atol=1e-8)
    with pytest.raises(ValueError, match="at least 3 different NFE values"):
        fit_cpr(settings[:6], dc_order=2)


def test_cpr_on_a_held_out_nfe_is_within_10_percent_of_direct_calibration(gmm, unseen):
    """Shipped gmm ratios (NFE 4-15): CPR fitted without NFE 7 predicts NFE 7's ratios."""
    s = make_scheduler(DCSolverScheduler, gmm.scheduler_config, {}, GMM_SCHEDULER_DIR)
    assert s.ratios_for(7)[1] == "calibrated"
    direct = _mse(s, gmm, *unseen, 7)
    fit_cpr_coefficients(s, exclude=[(7, 1.0)])
    del s.ratio_table[(7, 1.0)]
    assert s.ratios_for(7)[1] == "cpr"
    held_out = _mse(s, gmm, *unseen, 7)
    unipc = _mse(UniPCMultistepScheduler.from_config(gmm.scheduler_config), gmm, *unseen, 7)
    assert held_out <= 1.1 * direct and held_out < unipc / 1.2


def test_calibrate_command_writes_beside_an_existing_scheduler_config(gmm, tmp_path, capsys):
    from diffalign.cli import main

    config = (GMM_SCHEDULER_DIR / "scheduler_config.json").read_text()
    (tmp_path / "scheduler_config.json").write_text(config)
    assert main(["calibrate", "--model", "gmm", "--nfe", "4", "--num-iters", "5", "--out", str(tmp_path)]) == 0
    assert "NFE  4  guidance 1:  1.000 1.000" in capsys.readouterr().out
    assert (tmp_path / "scheduler_config.json").read_text() == config  # the pipeline's own config is left alone
    s = make_scheduler(DCSolverScheduler, gmm.scheduler_config, {}, tmp_path)
    assert s.ratios_for(4)[1] == "calibrated" and s.config.model_fingerprint.startswith("GaussianMixture:sha256:")


@pytest.mark.slow
@pytest.mark.parametrize("nfe,margin", [(5, 1.04), (6, 1.05)])  # measured error ratios 1.09 and 1.11
def test_shipped_digits_ratios_beat_unipc_on_unseen_noises(nfe, margin, digits_unseen):
    target, noise, reference = digits_unseen
    dc = make_scheduler(DCSolverScheduler, target.scheduler_config, {}, target.side_info)
    assert dc.ratios_for(nfe)[1] == "calibrated"
    unipc = UniPCMultistepScheduler.from_config(target.scheduler_config)
    assert _mse(unipc, target, noise, reference, nfe) / _mse(dc, target, noise, reference, nfe) > margin


@pytest.fixture(scope="module")
def digits_unseen():
    from diffalign.evaluation.targets import digits_target

    target = digits_target()
    noise = x_T(batch=64, seed=7)
    return target, noise, target.reference(noise, float(DCSolverScheduler().noise_schedule.rho(999))).double()
