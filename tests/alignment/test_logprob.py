"""Step log-probabilities of DDIM (eta > 0) and DDPM: the sample equals diffusers' own step, the log-probability the
closed-form Gaussian density (torch.distributions.Normal, float64, written from the papers' equations), and a DDIM
rollout on the embedded digits-cond UNet stores log-probabilities that rescoring its latents reproduces."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.distributions import Normal

from diffalign.alignment.logprob import ddim_sample_with_logprob, ddim_step_with_logprob, ddpm_step_with_logprob
from diffalign.models.digits import load_digits_pipeline

SHAPE = (4, 2, 4, 4)  # (B, C, H, W)
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def ddim_scheduler(prediction_type: str, num_steps: int = 20) -> DDIMScheduler:
    """Stable Diffusion's DDIM config: the last step goes to alphas_cumprod[0], not 1, so every step is stochastic."""
    scheduler = DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler.set_timesteps(num_steps)
    return scheduler


def ddpm_scheduler(prediction_type: str, variance_type: str = "fixed_small", num_steps: int | None = 25):
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, variance_type=variance_type)
    if num_steps is not None:
        scheduler.set_timesteps(num_steps)
    return scheduler


def model_output_and_sample(seed: int, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def x0_and_eps(prediction_type: str, output, x, a_t):
    """x_0 and eps from the model output (Salimans & Ho 2022, Sec. 4), float64."""
    if prediction_type == "epsilon":
        return (x - (1 - a_t).sqrt() * output) / a_t.sqrt(), output
    return a_t.sqrt() * x - (1 - a_t).sqrt() * output, a_t.sqrt() * output + (1 - a_t).sqrt() * x  # v


def per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def reduce(log_density: torch.Tensor, reduction: str) -> torch.Tensor:
    return log_density.mean(dim=(1, 2, 3)) if reduction == "mean" else log_density.sum(dim=(1, 2, 3))


def ddim_closed_form(scheduler, prediction_type, output, t, x, prev, eta, reduction):
    """log N(prev; mu, sigma^2) of DDIM (Song et al. 2021, Eq. 12 and 16) in float64."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    prev_t = t - 1000 // scheduler.num_inference_steps
    a_t = per_sample(alphas_cumprod[t])
    a_prev = per_sample(torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp_min(0)], alphas_cumprod[0]))
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    x0, eps = x0_and_eps(prediction_type, output.double(), x.double(), a_t)
    mu = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    return reduce(Normal(mu, sigma.expand_as(mu)).log_prob(prev.double()), reduction)


def ddpm_closed_form(scheduler, prediction_type, output, t, x, prev, variance_type, reduction):
    """log N(prev; mu~_t, var) of the DDPM posterior (Ho et al. 2020, Eq. 6-7) in float64."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    grid = scheduler.timesteps.tolist()
    prev_t = torch.tensor([grid[grid.index(s) + 1] if grid.index(s) + 1 < len(grid) else -1 for s in t.tolist()])
    a_t = per_sample(alphas_cumprod[t])
    a_prev = per_sample(torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp_min(0)], 1.0))
    beta_t = 1 - a_t / a_prev
    x0, _ = x0_and_eps(prediction_type, output.double(), x.double(), a_t)
    mu = a_prev.sqrt() * beta_t / (1 - a_t) * x0 + (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t) * x.double()
    variance = beta_t if variance_type == "fixed_large" else (1 - a_prev) / (1 - a_t) * beta_t
    return reduce(Normal(mu, variance.sqrt().expand_as(mu)).log_prob(prev.double()), reduction)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_sample_equals_diffusers_step(prediction_type, eta):
    scheduler = ddim_scheduler(prediction_type)
    for index in (0, 9, 19):  # first, middle and last step (the last onto final_alpha_cumprod)
        t = scheduler.timesteps[index]
        output, x = model_output_and_sample(index)
        expected = scheduler.step(output, t, x, eta=eta, generator=torch.Generator().manual_seed(7)).prev_sample
        prev, log_prob = ddim_step_with_logprob(
            scheduler, output, t, x, eta, generator=torch.Generator().manual_seed(7)
        )
        torch.testing.assert_close(prev, expected, rtol=0, atol=1e-6)
        assert log_prob.shape == (SHAPE[0],) and log_prob.dtype == torch.float32


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ddim_log_prob_is_the_gaussian_density(prediction_type, eta, reduction):
    scheduler = ddim_scheduler(prediction_type)
    t = scheduler.timesteps[[0, 7, 13, 19]]  # (B,) one timestep per sample, the last onto final_alpha_cumprod
    output, x = model_output_and_sample(1)
    prev, log_prob = ddim_step_with_logprob(
        scheduler, output, t, x, eta, generator=torch.Generator().manual_seed(3), reduction=reduction
    )
    expected = ddim_closed_form(scheduler, prediction_type, output, t, x, prev, eta, reduction)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-4)
    # a given x_{t-1} far from the mean is scored, not redrawn
    far = prev + 0.3
    same, far_log_prob = ddim_step_with_logprob(scheduler, output, t, x, eta, prev_sample=far, reduction=reduction)
    assert same is far or torch.equal(same, far)
    expected_far = ddim_closed_form(scheduler, prediction_type, output, t, x, far, eta, reduction)
    # float32 maths against float64: |log p| ~ 100 here
    torch.testing.assert_close(far_log_prob.double(), expected_far, rtol=5e-5, atol=1e-4)
    assert (far_log_prob < log_prob - 0.1).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_sample_and_log_prob(prediction_type, variance_type):
    scheduler = ddpm_scheduler(prediction_type, variance_type)
    output, x = model_output_and_sample(2)
    for index in (0, 12, 23):  # the last stochastic step of the 25-step grid, t = 41 -> 1
        t = scheduler.timesteps[index]
        expected = scheduler.step(output, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        prev, _ = ddpm_step_with_logprob(scheduler, output, t, x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(prev, expected, rtol=0, atol=1e-6)
    t = scheduler.timesteps[[0, 5, 17, 23]]  # (B,)
    prev, log_prob = ddpm_step_with_logprob(scheduler, output, t, x, generator=torch.Generator().manual_seed(4))
    expected = ddpm_closed_form(scheduler, prediction_type, output, t, x, prev, variance_type, "mean")
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-4)


def test_ddpm_without_inference_grid_steps_to_t_minus_one():
    scheduler = ddpm_scheduler("epsilon", num_steps=None)
    output, x = model_output_and_sample(3)
    t = torch.tensor([999, 500, 10, 1])
    prev, log_prob = ddpm_step_with_logprob(scheduler, output, t, x, generator=torch.Generator().manual_seed(0))
    for row in range(4):  # each row as diffusers' scalar step with the same noise
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))[row : row + 1]
        alphas_cumprod = scheduler.alphas_cumprod.double()
        a_t, a_prev = alphas_cumprod[t[row]], alphas_cumprod[t[row] - 1]
        beta_t = 1 - a_t / a_prev
        x0 = (x[row].double() - (1 - a_t).sqrt() * output[row].double()) / a_t.sqrt()
        mu = a_prev.sqrt() * beta_t / (1 - a_t) * x0 + (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t) * x[row].double()
        sigma = ((1 - a_prev) / (1 - a_t) * beta_t).sqrt()
        torch.testing.assert_close(prev[row].double(), mu + sigma * noise[0].double(), rtol=0, atol=5e-5)
        expected = Normal(mu, sigma).log_prob(prev[row].double()).mean().item()
        assert log_prob[row].item() == pytest.approx(expected, abs=1e-4)


def test_deterministic_steps_raise():
    output, x = model_output_and_sample(4)
    scheduler = ddim_scheduler("epsilon")
    with pytest.raises(ValueError, match="eta=0.*deterministic"):
        ddim_step_with_logprob(scheduler, output, scheduler.timesteps[0], x, eta=0.0)
    one_at_end = DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=True, steps_offset=1)
    one_at_end.set_timesteps(20)
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        ddim_step_with_logprob(one_at_end, output, one_at_end.timesteps[-1], x, eta=1.0)
    ddpm = ddpm_scheduler("epsilon", num_steps=None)
    with pytest.raises(ValueError, match="t = 0"):
        ddpm_step_with_logprob(ddpm, output, torch.tensor([5, 4, 0, 2]), x)
    with pytest.raises(ValueError, match="either generator .* or prev_sample"):
        ddim_step_with_logprob(scheduler, output, 1, x, prev_sample=x, generator=torch.Generator())
    with pytest.raises(TypeError, match="DDIMScheduler"):
        ddim_step_with_logprob(ddpm, output, 1, x)


def test_log_prob_gradient_flows_through_the_model_output_only():
    scheduler = ddim_scheduler("epsilon")
    output, x = model_output_and_sample(5)
    output.requires_grad_(True)
    prev = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    _, log_prob = ddim_step_with_logprob(scheduler, output, scheduler.timesteps[3], x, prev_sample=prev)
    log_prob.sum().backward()
    assert prev.grad is None
    assert output.grad.abs().sum() > 0


def test_half_precision_latents_are_scored_as_stored():
    scheduler = ddim_scheduler("epsilon")
    output, x = model_output_and_sample(8)
    x = x.bfloat16()
    t = scheduler.timesteps[5]
    prev, log_prob = ddim_step_with_logprob(scheduler, output, t, x, generator=torch.Generator().manual_seed(1))
    assert prev.dtype == torch.bfloat16 and log_prob.dtype == torch.float32
    _, rescored = ddim_step_with_logprob(scheduler, output, t, x, prev_sample=prev)
    torch.testing.assert_close(rescored, log_prob, rtol=0, atol=0)


@pytest.fixture(scope="module")
def digits_cond():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny UNet: one thread is faster than two on a loaded machine
    pipe = load_digits_pipeline(conditional=True)
    cond = pipe.text_encoder(pipe.text_encoder.tokenize(["a handwritten 3", "seven"])).detach()  # (2, 1, D)
    uncond = pipe.text_encoder(pipe.text_encoder.tokenize([""])).detach()  # (1, 1, D)
    yield pipe.unet, pipe.scheduler.config, cond, uncond
    torch.set_num_threads(threads)


def test_digits_rollout_stores_rescorable_log_probs(digits_cond):
    unet, scheduler_config, cond, uncond = digits_cond
    scheduler = DDIMScheduler.from_config(scheduler_config, set_alpha_to_one=False)
    guidance, steps = 2.0, 8

    def unet_fn(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rollouts = [
        ddim_sample_with_logprob(
            unet_fn, scheduler, x_T, steps, 1.0, guidance, cond, uncond, torch.Generator().manual_seed(seed)
        )
        for seed in (1, 2)
    ]
    (latents, log_probs, timesteps), (other_latents, _, _) = rollouts
    assert latents.shape == (2, steps + 1, 1, 8, 8) and log_probs.shape == (2, steps) and timesteps.shape == (steps,)
    assert torch.equal(latents[:, 0], other_latents[:, 0])
    assert (latents[:, -1] - other_latents[:, -1]).abs().amax() > 0.1  # different generators, different samples
    assert torch.isfinite(log_probs).all()

    # rescore all B * T steps in one batch with per-sample timesteps, as a trainer does
    current = latents[:, :-1].flatten(0, 1)  # (B T, 1, 8, 8)
    t = timesteps.repeat(2)  # (B T,)
    states = cond.repeat_interleave(steps, dim=0)  # (B T, 1, D)
    with torch.no_grad():
        outputs = unet_fn(torch.cat([current] * 2), torch.cat([t] * 2), torch.cat([uncond.expand_as(states), states]))
    output_uncond, output_cond = outputs.chunk(2)
    guided = output_uncond + guidance * (output_cond - output_uncond)
    _, rescored = ddim_step_with_logprob(scheduler, guided, t, current, 1.0, prev_sample=latents[:, 1:].flatten(0, 1))
    torch.testing.assert_close(rescored.view(2, steps), log_probs, rtol=0, atol=1e-5)
