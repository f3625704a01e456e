"""The diffusers scheduler contract, run against every registered scheduler (and a few configs of each).

In the spirit of diffusers' tests/schedulers/test_schedulers.py: round trips, switching, dtypes, img2img hooks,
custom grids, prediction types, and clear errors on bad input. A scheduler added to ``SCHEDULERS`` runs all of it.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from diffalign.models.gmm import GaussianMixture
from diffalign.samplers import SCHEDULERS

VARIANTS = {
    "adjoint_dpm": [{}, {"solver_order": 3, "timestep_spacing": "logSNR"}],
    "dpm_solver": [{}, {"solver_order": 3}, {"solver_mode": "singlestep", "solver_order": 3}],
    "dpm_solver_pp": [
        {},
        {"solver_order": 3, "timestep_spacing": "karras"},
        {"solver_mode": "singlestep", "timestep_spacing": "logSNR"},
        {"thresholding": True, "timestep_spacing": "trailing"},
    ],
    "dpm_solver_v3": [
        {},
        {"solver_order": 2, "corrector_pseudo": True, "timestep_spacing": "linspace"},
        {"use_corrector": False, "predictor_pseudo": True, "thresholding": True, "timestep_spacing": "trailing"},
    ],
    "dc_solver": [
        {},
        {"solver_order": 3, "timestep_spacing": "karras", "final_sigmas_type": "sigma_min"},
        {"predict_x0": False, "disable_corrector": [0], "dc_order": 1},
    ],
}
CASES = [(name, variant) for name in sorted(SCHEDULERS) for variant in VARIANTS.get(name, [{}])]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in variant.items()) or 'default'}" for name, variant in CASES]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DIFFUSERS_CONFIGS = {
    "DDPM": DDPMScheduler(**SD_BETAS).config,
    "DDIM": DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1).config,
    "PNDM": PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).config,
    "Euler": EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1).config,
    "DPMSolverMultistep": DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True).config,
    "UniPC": UniPCMultistepScheduler(**SD_BETAS, solver_type="bh2").config,
}


@pytest.fixture(scope="module")
def gmm():
    """A 16-dimensional two-component mixture: an exact, smooth epsilon model for the checks below."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 16, generator=g, dtype=torch.float64)
    covs = torch.stack([torch.eye(16, dtype=torch.float64) * v for v in (0.3, 0.1)])
    return GaussianMixture.from_parameters(means, covs, sample_size=4, in_channels=1)


def make(name, variant, **overrides):
    return SCHEDULERS[name](**{**variant, **overrides})


def sample(scheduler, model, x, n=8, **set_kwargs):
    """Run a full sampling loop the way diffusers pipelines do."""
    scheduler.set_timesteps(n, **set_kwargs) if not set_kwargs else scheduler.set_timesteps(**set_kwargs)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(x_in, t).sample, t, x).prev_sample
    return x


def x_T(shape=(3, 1, 4, 4), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_basic_attributes(name, variant):
    s = make(name, variant)
    assert s.order == 1 and s.init_noise_sigma == 1.0 and len(s) == 1000
    assert DDIMScheduler in s.compatibles and DPMSolverMultistepScheduler in s.compatibles
    s.set_timesteps(7)
    assert len(s.timesteps) == 7 and s.num_inference_steps == 7 and len(s.sigmas) == 8
    assert torch.all(s.timesteps[:-1] > s.timesteps[1:])
    x = x_T()
    assert s.scale_model_input(x, s.timesteps[0]) is x


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_save_load_round_trip(name, variant, gmm, tmp_path):
    s = make(name, variant)
    s.save_pretrained(tmp_path)
    loaded = type(s).from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(s.config)
    torch.testing.assert_close(sample(loaded, gmm, x_T()), sample(s, gmm, x_T()), rtol=0, atol=0)


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
@pytest.mark.parametrize("other", [DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_switch_to_diffusers_and_back(name, variant, other, gmm):
    s = make(name, variant, **SD_BETAS)
    there = other.from_config(s.config)
    assert there.config.beta_schedule == "scaled_linear" and there.config.beta_end == 0.012
    back = type(s).from_config(there.config)
    for key, value in variant.items():
        assert back.config[key] == value
    torch.testing.assert_close(sample(back, gmm, x_T()), sample(s, gmm, x_T()), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("source", sorted(DIFFUSERS_CONFIGS))
def test_from_diffusers_configs_accepts_every_key(name, source, gmm):
    cls = SCHEDULERS[name]
    _, unused, _ = cls.extract_init_dict(dict(DIFFUSERS_CONFIGS[source]))
    assert not unused, f"{cls.__name__} ignores {source} config keys {sorted(unused)}"
    s = cls.from_config(DIFFUSERS_CONFIGS[source])
    assert np.allclose(s.alphas_cumprod.numpy(), DDIMScheduler(**SD_BETAS).alphas_cumprod.numpy())
    out = sample(s, gmm, x_T())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-2), (torch.bfloat16, 1.5e-1)])
def test_dtype_is_preserved(name, variant, dtype, tol, gmm):
    ref = sample(make(name, variant), gmm, x_T())
    out = sample(make(name, variant), gmm, x_T(dtype=dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out.float() - ref).abs().max() < tol


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_set_begin_index_for_img2img(name, variant, gmm):
    s = make(name, variant)
    s.set_timesteps(10)
    start = 4
    s.set_begin_index(start)
    x = x_T()
    for k, t in enumerate(s.timesteps[start:]):
        assert s.step_index in (None, start + k)
        x = s.step(gmm(x, t).sample, t, x).prev_sample
    assert s.step_index == 10 and torch.isfinite(x).all()
    # Without set_begin_index the first timestep locates its index on the grid.
    s.set_timesteps(10)
    t = s.timesteps[start]
    s.step(gmm(x, t).sample, t, x)
    assert s.step_index == start + 1


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_add_noise_matches_diffusers(name, variant):
    s = make(name, variant, **SD_BETAS)
    x0, noise = x_T((4, 1, 4, 4)), x_T((4, 1, 4, 4)) * 0.5 + 1
    t = torch.tensor([0, 10, 500, 999])
    ref = DDPMScheduler(**SD_BETAS).add_noise(x0, noise, t)
    torch.testing.assert_close(s.add_noise(x0, noise, t), ref, rtol=1e-5, atol=1e-6)
    s.set_timesteps(6)  # after set_timesteps too, and at the grid's own (possibly float) timesteps
    t_grid = s.timesteps[:4]
    alpha, sigma = s.noise_schedule.alpha_sigma(t_grid.double().numpy())
    expected = (
        torch.tensor(alpha).float()[:, None, None, None] * x0
        + torch.tensor(sigma).float()[:, None, None, None] * noise
    )
    torch.testing.assert_close(s.add_noise(x0, noise, t_grid), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="noise has shape"):
        s.add_noise(x0, noise[:2], t)


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_custom_timesteps_and_sigmas(name, variant, gmm):
    s = make(name, variant)
    s.set_timesteps(timesteps=[999, 800, 600, 300, 100, 20])
    assert s.timesteps.tolist() == [999, 800, 600, 300, 100, 20] and s.num_inference_steps == 6
    assert torch.isfinite(sample(s, gmm, x_T(), timesteps=[999, 800, 600, 300, 100, 20])).all()
    sigmas = [80.0, 20.0, 5.0, 1.5, 0.5, 0.1, 0.0]
    s.set_timesteps(sigmas=sigmas)
    assert s.num_inference_steps == 6
    torch.testing.assert_close(s.sigmas, torch.tensor(sigmas))
    assert torch.isfinite(sample(s, gmm, x_T(), sigmas=sigmas)).all()
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(5, timesteps=[999, 500])
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.set_timesteps(timesteps=[500, 999])


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_prediction_types_give_the_same_samples(name, variant, gmm):
    """An exact model expressed as eps, v or x0 must drive the solver to the same result (Salimans & Ho 2022)."""
    outs = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        s = make(name, {**variant, "thresholding": False}, prediction_type=kind)
        s.set_timesteps(8)
        x = x_T()
        for t in s.timesteps:
            alpha, sigma = (float(v) for v in s.noise_schedule.alpha_sigma(float(t)))
            eps = gmm(x, t).sample
            x0 = (x - sigma * eps) / alpha
            out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[kind]
            x = s.step(out, t, x).prev_sample
        outs[kind] = x
    torch.testing.assert_close(outs["v_prediction"], outs["epsilon"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["sample"], outs["epsilon"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,variant", CASES, ids=IDS)
def test_bad_input_gets_a_clear_error(name, variant, gmm):
    with pytest.raises(ValueError, match="prediction_type='noise'"):
        make(name, variant, prediction_type="noise")
    with pytest.raises(ValueError, match="flow-matching"):
        make(name, variant, prediction_type="flow_prediction")
    s = make(name, variant)
    x = x_T()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            s.set_timesteps(bad)
    s.set_timesteps(4)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:, :, :2], t, x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        s.step(gmm(x, t), t, x)
    with pytest.warns(UserWarning, match="not on this scheduler's grid"):  # diffusers: the last index
        s.step(x, 123.5, x)
    assert s.step_index == 4
    sample(s, gmm, x, n=4)
    with pytest.raises(ValueError, match="already taken"):
        s.step(x, s.timesteps[-1], x)


def test_learned_variance_output_is_split():
    s = make("dpm_solver_pp", {}, variance_type="learned_range")
    s.set_timesteps(3)
    x = x_T((2, 3, 4, 4))
    out = s.step(torch.cat([torch.zeros_like(x), torch.ones_like(x)], dim=1), s.timesteps[0], x).prev_sample
    assert out.shape == x.shape


def test_dynamic_thresholding_bounds_the_data_prediction():
    s = make("dpm_solver_pp", {}, thresholding=True, sample_max_value=1.0, prediction_type="sample")
    s.set_timesteps(4)
    x = x_T() * 10
    for t in s.timesteps:
        x = s.step(torch.full_like(x, 5.0), t, x).prev_sample  # wildly out-of-range x0 predictions
    assert x.abs().max() <= 1.0 + 1e-6
