"""AdjointDPM gradients: against backprop through the same sampler, against torchdiffeq's adjoint, and their order.

Measured (this file's setups, float64; relative L2 error of the x_T / cond / params gradients):

- ``trajectory="store"`` vs backprop through the sampler at 20 NFE: ~1e-15 on the mixture, ~1e-15 on the tiny SD UNet
  with classifier-free guidance (it is the exact adjoint of the discrete steps).
- ``trajectory="reconstruct"`` vs backprop, 2M on a logSNR grid, NFE 20 / 40 / 80 / 160:
  x_T 5.0e-2 / 1.0e-2 / 2.2e-3 / 5.3e-4, cond 4.1e-3 / 9.1e-4 / 2.2e-4 / 5.5e-5,
  params 9.3e-2 / 1.8e-2 / 4.0e-3 / 9.4e-4
  (order 2.0-2.1).
- vs torchdiffeq ``odeint_adjoint`` (dopri5, rtol 1e-9) at NFE 10 / 20 / 40 / 80, x_T gradient: store
  0.78 / 0.18 / 0.046 / 0.012, reconstruct 0.67 / 0.14 / 0.037 / 0.0098 (order 1.9-2.0 for all three gradients).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffalign.models.adapters import GuidedUNet
from diffalign.models.gmm import GaussianMixture
from diffalign.samplers import SCHEDULERS, AdjointDPMScheduler, DPMSolverPPScheduler, adjoint_sample
from diffalign.samplers.schedule import alpha_sigma_from_rho

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_pipelines import sd_components  # noqa: E402


class ShiftedMixture(nn.Module):
    """An exact eps model with a conditioning and a parameter: the mixture shifted by ``cond`` and scaled by ``gain``.

    ``eps(x, t, c) = gain * eps_gmm(x - alpha_t c)``: with ``gain = 1`` it is the exact model of the data shifted
    by ``c``, so gradients with respect to ``c`` and ``gain`` are smooth and non-trivial.
    """

    def __init__(self, gmm: GaussianMixture):
        super().__init__()
        self.gmm = gmm
        self.gain = nn.Parameter(torch.ones(gmm.config.dim, dtype=torch.float64))

    def eps(self, x, alpha, sigma, cond=None):  # x: (B, D)
        shifted = x if cond is None else x - alpha * cond
        return self.gain * self.gmm.eps(shifted, alpha, sigma)

    def forward(self, x, t, cond=None):  # x: (B, D), t: a training timestep
        alpha, sigma = (float(v) for v in self.gmm.noise_schedule.alpha_sigma(float(t)))
        return self.eps(x, alpha, sigma, cond)


class ProbabilityFlowInRho(nn.Module):
    """``dy/drho = eps(alpha y, rho)`` with ``y = x / alpha``, ``rho = sigma / alpha`` (AdjointDPM's variables)."""

    def __init__(self, model: ShiftedMixture, cond: torch.Tensor):
        super().__init__()
        self.model, self.cond = model, nn.Parameter(cond)

    def forward(self, rho, y):  # y: (B, D)
        alpha = 1.0 / torch.sqrt(1.0 + rho**2)
        return self.model.eps(alpha * y, alpha, rho * alpha, self.cond)


@pytest.fixture(scope="module")
def mixture():
    """A smooth 16-D three-component mixture (broad components, so that its ODE is well resolved at 20 NFE)."""
    g = torch.Generator().manual_seed(0)
    means = 0.7 * torch.randn(3, 16, generator=g, dtype=torch.float64)
    covs = torch.stack([torch.eye(16, dtype=torch.float64) * v for v in (0.5, 0.3, 0.4)])
    return GaussianMixture.from_parameters(means, covs)


def loss_fn(x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A nonlinear scalar loss of the sample, so that the cotangent varies along the batch."""
    return ((x0 - target) ** 2).sum() + 0.1 * (x0**3).sum()


def backprop_sample(model, x_T, scheduler, n, cond=None):
    """The same sampler with autograd recording every step: the reference gradient."""
    scheduler.set_timesteps(n)
    x = x_T
    for t in scheduler.timesteps:
        out = model(x, t) if cond is None else model(x, t, cond)
        x = scheduler.step(out.sample if hasattr(out, "sample") else out, t, x).prev_sample
    return x


def rel_err(got, ref) -> float:
    return float((got - ref).norm() / ref.norm())


def leaves_and_target(dim=16, batch=4):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    cond = 0.3 * torch.randn(1, dim, generator=g, dtype=torch.float64)
    return x_T, cond, torch.randn(batch, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("config", [{}, {"solver_order": 3, "timestep_spacing": "logSNR"}], ids=["2M", "3M-logSNR"])
def test_store_matches_backprop_on_the_mixture(mixture, config):
    """x_T, conditioning and parameter gradients equal backprop through the sampler (20 NFE, float64)."""
    model = ShiftedMixture(mixture)
    x_T, cond, target = leaves_and_target()
    scheduler = AdjointDPMScheduler(**config)
    grads = {}
    for how in ("backprop", "adjoint"):
        x, c = x_T.clone().requires_grad_(True), cond.clone().requires_grad_(True)
        if how == "backprop":
            x0 = backprop_sample(model, x, scheduler, 20, c)
        else:
            x0 = adjoint_sample(model, x, scheduler, 20, cond=c)  # params default: model's requires_grad ones
        grads[how] = torch.autograd.grad(loss_fn(x0, target), [x, c, model.gain])
    for name, got, ref in zip(("x_T", "cond", "params"), grads["adjoint"], grads["backprop"], strict=True):
        assert rel_err(got, ref) <= 1e-10, name


def test_store_matches_backprop_on_a_tiny_unet_with_guidance(tmp_path):
    """Tiny SD UNet, classifier-free guidance 3, gradients for x_T, prompt embeddings and two weight tensors."""
    unet = sd_components(tmp_path)["unet"].double().requires_grad_(False)
    weights = [unet.conv_in.weight, unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight]
    for w in weights:
        w.requires_grad_(True)
    model = GuidedUNet(unet, guidance_scale=3.0)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 3, 32, generator=g, dtype=torch.float64)  # [unconditional; conditional] embeddings
    target = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    scheduler = AdjointDPMScheduler.from_config(sd_components(tmp_path)["scheduler"].config)
    grads = {}
    for how in ("backprop", "adjoint"):
        x, c = x_T.clone().requires_grad_(True), cond.clone().requires_grad_(True)
        if how == "backprop":
            x0 = backprop_sample(model, x, scheduler, 20, c)
        else:
            x0 = adjoint_sample(model, x, scheduler, 20, cond=c, params=weights)
        grads[how] = torch.autograd.grad(loss_fn(x0, target), [x, c, *weights])
    for k, (got, ref) in enumerate(zip(grads["adjoint"], grads["backprop"], strict=True)):
        assert ref.norm() > 0 and rel_err(got, ref) <= 1e-10, k


def test_reconstruct_error_falls_at_second_order(mixture):
    """The constant-memory backward pass converges to the discrete gradient at the solver's order (2M)."""
    model = ShiftedMixture(mixture)
    x_T, cond, target = leaves_and_target()
    errors = []
    for n in (20, 40, 80, 160):
        grads = {}
        for how in ("backprop", "reconstruct"):
            x, c = x_T.clone().requires_grad_(True), cond.clone().requires_grad_(True)
            scheduler = AdjointDPMScheduler(timestep_spacing="logSNR")
            if how == "backprop":
                x0 = backprop_sample(model, x, scheduler, n, c)
            else:
                x0 = adjoint_sample(model, x, scheduler, n, cond=c, trajectory="reconstruct")
            grads[how] = torch.autograd.grad(loss_fn(x0, target), [x, c, model.gain])
        errors.append([rel_err(a, b) for a, b in zip(grads["reconstruct"], grads["backprop"], strict=True)])
    errors = np.array(errors)  # (4 NFE, 3 leaves)
    slopes = np.log2(errors[:-1] / errors[1:])  # (3, 3) observed orders
    assert np.all(errors[-1] < 2e-3), errors
    assert np.all(slopes[-1] > 1.8), slopes
    assert np.all(errors[1:] < errors[:-1]), errors


def test_gradients_converge_to_the_continuous_adjoint(mixture):
    """Against torchdiffeq's odeint_adjoint (dopri5, rtol 1e-9) on the same ODE: both modes' errors fall with NFE."""
    from torchdiffeq import odeint_adjoint

    model = ShiftedMixture(mixture)
    x_T, cond, target = leaves_and_target()
    rho_T = float(mixture.noise_schedule.rho(999.0))
    alpha_T, _ = alpha_sigma_from_rho(rho_T)
    func = ProbabilityFlowInRho(model, cond.clone())
    x = x_T.clone().requires_grad_(True)
    rhos = torch.tensor([rho_T, 0.0], dtype=torch.float64)
    y0 = odeint_adjoint(func, x / float(alpha_T), rhos, rtol=1e-9, atol=1e-9, method="dopri5")[-1]
    ref = torch.autograd.grad(loss_fn(y0, target), [x, func.cond, model.gain])
    errors = {"store": [], "reconstruct": []}
    for n in (10, 20, 40, 80):
        for how in errors:
            x, c = x_T.clone().requires_grad_(True), cond.clone().requires_grad_(True)
            x0 = adjoint_sample(model, x, AdjointDPMScheduler(timestep_spacing="logSNR"), n, cond=c, trajectory=how)
            got = torch.autograd.grad(loss_fn(x0, target), [x, c, model.gain])
            errors[how].append([rel_err(a, b) for a, b in zip(got, ref, strict=True)])
    for how, errs in errors.items():
        errs = np.array(errs)  # (4 NFE, 3 leaves)
        slope = np.log2(errs[-2] / errs[-1])
        assert np.all(slope > 1.7), (how, errs)
        assert np.all(errs[-1] < 2e-2), (how, errs)


def test_scheduler_is_left_untouched_and_samples_match_the_pipeline_loop(mixture):
    """adjoint_sample's forward solve is the scheduler's own; the caller's scheduler keeps its grid."""
    x_T, _, _ = leaves_and_target()
    scheduler = DPMSolverPPScheduler(solver_order=3)
    scheduler.set_timesteps(7)
    x0 = adjoint_sample(mixture, x_T, scheduler, 12)
    assert scheduler.num_inference_steps == 7
    torch.testing.assert_close(x0, backprop_sample(mixture, x_T, DPMSolverPPScheduler(solver_order=3), 12))
    assert "adjoint_dpm" in SCHEDULERS


def test_bad_input_gets_a_clear_error(mixture):
    x_T, _, _ = leaves_and_target()
    with pytest.raises(ValueError, match="trajectory='checkpoint'"):
        adjoint_sample(mixture, x_T, AdjointDPMScheduler(), 4, trajectory="checkpoint")
    with pytest.raises(ValueError, match="multistep"):
        adjoint_sample(mixture, x_T, DPMSolverPPScheduler(solver_mode="singlestep"), 4)
    with pytest.raises(ValueError, match="multistep"):
        adjoint_sample(mixture, x_T, AdjointDPMScheduler(solver_mode="singlestep"), 4)
    with pytest.raises(TypeError, match="scheduler must be"):
        adjoint_sample(mixture, x_T, "dpm", 4)
    with pytest.raises(TypeError, match="cond must be"):
        adjoint_sample(mixture, x_T, AdjointDPMScheduler(), 4, cond={"a": x_T})
