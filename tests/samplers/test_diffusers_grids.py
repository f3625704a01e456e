"""diffusers' behaviour at the pipeline boundary: its sigma-flag grids, off-grid timesteps, short trained_betas.

Each test pins one fix that the diffusers scheduler suite (scripts/diffusers_scheduler_suite.py) found; that suite
itself runs in tests/samplers/test_diffusers_suite.py when a diffusers checkout is at hand.
"""

import warnings

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffalign.models.gmm import GaussianMixture
from diffalign.samplers import SCHEDULERS, DCSolverScheduler, DPMSolverPPScheduler

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLAGS = ["use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"]


def run(scheduler, model, x, n):
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def v_model(gmm):
    """The mixture's exact v-prediction ``v = alpha_t eps - sigma_t x`` (Salimans & Ho 2022, Sec. 4)."""
    ac = DPMSolverMultistepScheduler(**SD_BETAS).alphas_cumprod.double()

    def model(x, t):
        alpha, sigma = ac[int(t)].sqrt().item(), (1 - ac[int(t)]).sqrt().item()
        return alpha * gmm(x, t).sample - sigma * x

    return model


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_sigma_flags_give_diffusers_grid(name, flag, final):
    """Same sigmas (float32 rtol 1e-6) as diffusers for n = 1 .. 25; same timesteps, or one above where diffusers
    truncates."""
    config = dict(**SD_BETAS, final_sigmas_type=final, **{flag: True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # v3 / DC without side information
        ours = SCHEDULERS[name](**config)
        theirs = DPMSolverMultistepScheduler(**config)
        for n in (1, 2, 5, 10, 25):
            ours.set_timesteps(n)
            theirs.set_timesteps(n)
            torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-6, atol=0)
            if flag in ("use_karras_sigmas", "use_lu_lambdas"):
                assert torch.equal(ours.timesteps, theirs.timesteps), (n, ours.timesteps, theirs.timesteps)
            else:  # diffusers truncates a float32 999 - 6e-5 to 998 where we round (docs/samplers.md)
                difference = ours.timesteps - theirs.timesteps
                assert ours.timesteps[0] == 999 and theirs.timesteps[0] == 998
                assert ((difference == 0) | (difference == 1)).all(), (n, ours.timesteps, theirs.timesteps)


@pytest.mark.parametrize(
    "ours_cls,theirs_cls,extra",
    [
        (DPMSolverPPScheduler, DPMSolverMultistepScheduler, {}),
        (DCSolverScheduler, UniPCMultistepScheduler, {"solver_type": "bh2"}),
    ],
)
@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_lu_lambdas"])
def test_karras_and_lu_v_prediction_sample_as_diffusers(ours_cls, theirs_cls, extra, flag):
    """The full loops diffusers' suite failed on (Karras / lu lambdas + v-prediction): max |difference| < 1e-4
    on 16 digits-mixture images in float32 at 10 steps (measured 2.6e-6, 1.2e-6, 1.9e-6)."""
    if ours_cls is DCSolverScheduler and flag == "use_lu_lambdas":
        pytest.skip("UniPCMultistepScheduler has no use_lu_lambdas")
    model = v_model(GaussianMixture.from_digits(**SD_BETAS))
    config = dict(**SD_BETAS, prediction_type="v_prediction", **{flag: True}, **extra)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        difference = (run(ours_cls(**config), model, x, 10) - run(theirs_cls(**config), model, x, 10)).abs().max()
    assert difference < 1e-4


def test_off_grid_timestep_steps_from_the_last_index_with_a_warning():
    """diffusers steps from the last grid point when the timestep is not on the grid; we do too, and say so."""
    ours, theirs = DPMSolverPPScheduler(), DPMSolverMultistepScheduler()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for s in (ours, theirs):
        s.set_timesteps(10)
    with pytest.warns(UserWarning, match="not on this scheduler's grid"):
        mine = ours.step(eps, 3, x).prev_sample
    assert ours.step_index == 10
    torch.testing.assert_close(mine, theirs.step(eps, 3, x).prev_sample, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_short_trained_betas_are_used_with_a_warning(name, tmp_path):
    """diffusers takes trained_betas as given even when num_train_timesteps disagrees; so do we, with a warning."""
    with pytest.warns(UserWarning, match="trained_betas has 2 entries but num_train_timesteps=1000"):
        scheduler = SCHEDULERS[name](trained_betas=np.array([0.1, 0.3]))
    reference = DPMSolverMultistepScheduler(trained_betas=np.array([0.1, 0.3]))
    assert scheduler.betas.tolist() == reference.betas.tolist()
    scheduler.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="trained_betas has 2 entries"):
        loaded = SCHEDULERS[name].from_pretrained(tmp_path)
    assert loaded.betas.tolist() == scheduler.betas.tolist()


def test_matching_trained_betas_do_not_warn():
    betas = np.linspace(1e-4, 0.02, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = DPMSolverPPScheduler(trained_betas=betas)
    torch.testing.assert_close(scheduler.betas, torch.from_numpy(betas).float(), rtol=0, atol=0)
