"""SmPO's official ReNoise inversion (noise.official_inversion): the grid stops below t, sampling undoes it on
digits, and the method hands its options to it."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from sklearn.datasets import load_digits

from diffalign.alignment.noise import NoiseRequest, official_inversion, official_inversion_noise
from diffalign.alignment.smpo import SmPO, SmPOOptions
from diffalign.models.digits import load_digits_pipeline


@pytest.fixture(scope="module")
def digits_denoiser():
    """digits-cond's UNet on 8 sklearn digits in [-1, 1], each conditioned on its own label."""
    pipeline = load_digits_pipeline(True)
    digits = load_digits()
    x0 = torch.tensor(digits.images[:8] / 8 - 1, dtype=torch.float32)[:, None]  # (8, 1, 8, 8)
    cond = pipeline.text_encoder(torch.tensor(digits.target[:8])).detach()

    def unet(x, t):
        with torch.no_grad():
            return pipeline.unet(x, t, encoder_hidden_states=cond.repeat(len(x) // 8, 1, 1)).sample

    return unet, pipeline.scheduler, x0


def test_the_grid_is_the_schedulers_and_the_latent_stops_at_the_last_point_below_t(digits_denoiser):
    unet, scheduler, x0 = digits_denoiser
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(5)
    assert inverse.timesteps.tolist() == [199, 399, 599, 799, 999]  # digits' "trailing" spacing
    inverse.set_timesteps(2)
    assert inverse.timesteps.tolist() == [499, 999]  # the demo's grid: as coarse as its 2-step sampler
    at = {t: official_inversion(unet, scheduler, x0, torch.full((8,), t)) for t in (0, 199, 200, 400, 599, 999)}
    assert torch.equal(at[0], x0) and torch.equal(at[199], x0)  # no grid point below t: the clean sample
    assert torch.equal(at[400], at[599]) and not torch.equal(at[200], at[400])  # both stop at 399
    mixed = official_inversion(unet, scheduler, x0, torch.tensor([0, 200, 400, 999] * 2))  # per-sample t
    for i, t in enumerate([0, 200, 400, 999] * 2):
        torch.testing.assert_close(mixed[i], at[t][i], atol=1e-5, rtol=0)
    # one grid step by hand: DDIM from the clean x0 to 199 with the average of the predictions at x0 and at the
    # first estimate, both at timestep 199 (the official loop)
    abar = scheduler.alphas_cumprod[199]
    t199 = torch.full((8,), 199)
    first = abar.sqrt() * x0 + (1 - abar).sqrt() * unet(x0, t199)
    eps = (unet(x0, t199) + unet(first, t199)) / 2
    torch.testing.assert_close(at[200], abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-5, rtol=0)


def test_official_inversion_then_ddim_sampling_returns_the_clean_sample(digits_denoiser):
    unet, scheduler, x0 = digits_denoiser
    inverted = official_inversion(unet, scheduler, x0, torch.full((8,), 999))  # at grid point 799
    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(5)  # 999, 799, 599, 399, 199 -> clean
    x = inverted
    for t in sampler.timesteps[1:]:
        x = sampler.step(unet(x, t.expand(8)), t, x).prev_sample
    # measured RMS 0.14 on these 8 digits, per digit at most 0.18 on 40 (images span [-1, 1]); one averaged
    # ReNoise iteration per step
    assert (x - x0).pow(2).mean().sqrt().item() < 0.2
    # the latent at 799 is not the clean sample (RMS 0.37 from it), but keeps its shape: its implied noise is not
    # a Gaussian draw (docs/methods/smpo_rankdpo.md)
    assert (inverted - x0).pow(2).mean().sqrt().item() > 0.3


def test_the_provider_trains_the_inverted_latent_at_t_and_the_method_selects_it(digits_denoiser):
    unet, scheduler, x0 = digits_denoiser
    latents = x0.reshape(4, 2, 1, 8, 8)  # B = 4 prompts, K = 2 candidates
    request = NoiseRequest(latents, torch.arange(4), 0, 7, scheduler, unet)
    timesteps, eps = official_inversion_noise(request)
    assert (timesteps == timesteps[:, :1]).all()  # one t per prompt
    flat, t = latents.transpose(0, 1).flatten(0, 1), timesteps.transpose(0, 1).flatten()
    noised = scheduler.add_noise(flat, eps.transpose(0, 1).flatten(0, 1), t)
    torch.testing.assert_close(noised, official_inversion(unet, scheduler, flat, t), atol=1e-5, rtol=1e-5)
    method_t, method_eps = SmPO(SmPOOptions()).noise_provider()(request)  # official, 5 steps: the default
    assert torch.equal(method_t, timesteps) and torch.equal(method_eps, eps)
    ten = SmPO(SmPOOptions(smpo_inversion_steps=10)).noise_provider()(request)[1]
    assert not torch.equal(ten, eps)
    with pytest.raises(ValueError, match="--smpo_inversion uniform"):
        SmPOOptions(smpo_renoise=1)
    with pytest.raises(ValueError, match="needs the policy UNet"):
        official_inversion_noise(NoiseRequest(latents, torch.arange(4), 0, 7, scheduler, None))
