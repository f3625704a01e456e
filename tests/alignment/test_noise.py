"""Noise providers: shared and independent draws seeded per record, and DDIM inversion that sampling undoes."""

import pytest
import torch
from diffusers import DDPMScheduler
from sklearn.datasets import load_digits

from diffalign.alignment.noise import (
    NoiseRequest,
    ddim_path,
    independent_noise,
    inversion_grid,
    inversion_noise,
    record_generator,
    shared_noise,
)
from diffalign.models.digits import load_digits_pipeline


def request(index, epoch=0, num_candidates=3, unet=None, scheduler=None):
    latents = torch.zeros(len(index), num_candidates, 1, 4, 4)
    return NoiseRequest(latents, torch.tensor(index), epoch, 7, scheduler or DDPMScheduler(), unet)


def test_shared_noise_is_one_draw_per_record_whatever_the_batch():
    timesteps, noise = shared_noise(request([5, 9]))  # (B, K), (B, K, 1, 4, 4)
    assert timesteps.shape == (2, 3) and noise.shape == (2, 3, 1, 4, 4)
    assert (timesteps == timesteps[:, :1]).all() and (noise == noise[:, :1]).all()  # shared by the candidates
    generator = record_generator(7, 0, 9)  # record 9: a t, then an eps, from its own generator
    assert timesteps[1, 0] == torch.randint(0, 1000, (1,), generator=generator).item()
    torch.testing.assert_close(noise[1, 0], torch.randn(1, 4, 4, generator=generator), atol=0, rtol=0)
    alone_t, alone_noise = shared_noise(request([9]))  # the same record in another batch: the same draws
    assert torch.equal(alone_t[0], timesteps[1]) and torch.equal(alone_noise[0], noise[1])
    other_epoch = shared_noise(request([9], epoch=1))[1]
    assert not torch.equal(other_epoch[0], noise[1])


def test_independent_noise_draws_per_candidate():
    timesteps, noise = independent_noise(request([5, 9]))
    assert timesteps.shape == (2, 3) and noise.shape == (2, 3, 1, 4, 4)
    assert not torch.equal(noise[:, 0], noise[:, 1]) and len(set(timesteps.flatten().tolist())) > 2
    assert torch.equal(independent_noise(request([9]))[1][0], noise[1])


@pytest.fixture(scope="module")
def digits_denoiser():
    """digits-cond's UNet on 8 sklearn digits in [-1, 1], each conditioned on its own label."""
    pipeline = load_digits_pipeline(True)
    digits = load_digits()
    x0 = torch.tensor(digits.images[:8] / 8 - 1, dtype=torch.float32)[:, None]  # (8, 1, 8, 8)
    cond = pipeline.text_encoder(torch.tensor(digits.target[:8]))

    def unet(x, t):
        return pipeline.unet(x, t, encoder_hidden_states=cond.repeat(len(x) // 8, 1, 1)).sample

    return unet, pipeline.scheduler, x0


def test_ddim_inversion_then_ddim_sampling_returns_the_clean_sample(digits_denoiser):
    unet, scheduler, x0 = digits_denoiser
    grid4, grid10 = inversion_grid(torch.full((8,), 200), 4), inversion_grid(torch.full((8,), 200), 10)
    assert grid4[0].tolist() == [0, 50, 100, 150, 200]
    errors = {}
    for name, grid, renoise in (("4 steps", grid4, 0), ("10 steps, renoise 2", grid10, 2)):
        with torch.no_grad():
            back = ddim_path(unet, scheduler, ddim_path(unet, scheduler, x0, grid, renoise), grid.flip(1))
        errors[name] = (back - x0).pow(2).mean().sqrt().item()
    # measured RMS on 20 digits: 0.062 (4 steps), 0.005 (10 steps, renoise 2); the images span [-1, 1]
    assert errors["4 steps"] < 0.1
    assert errors["10 steps, renoise 2"] < 0.01


def test_inversion_noise_reproduces_the_inverted_latent_through_add_noise(digits_denoiser):
    unet, scheduler, x0 = digits_denoiser
    latents = x0.reshape(4, 2, 1, 8, 8)  # B = 4 prompts, K = 2 candidates
    flat = latents.transpose(0, 1).flatten(0, 1)  # (K B, 1, 8, 8) candidate-major, as the provider calls the UNet
    timesteps, eps = inversion_noise(NoiseRequest(latents, torch.arange(4), 0, 7, scheduler, unet))
    assert (timesteps == timesteps[:, :1]).all()  # one t per prompt
    t = timesteps.transpose(0, 1).flatten()
    with torch.no_grad():
        inverted = ddim_path(unet, scheduler, flat, inversion_grid(t, 4))
    noised = scheduler.add_noise(flat, eps.transpose(0, 1).flatten(0, 1), t)
    torch.testing.assert_close(noised, inverted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the policy UNet"):
        inversion_noise(NoiseRequest(latents, torch.arange(4), 0, 7, scheduler, None))
