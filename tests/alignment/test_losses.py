"""Diffusion-DPO loss on hand-made per-sample errors: log 2 at init, sign under label flips, metrics, shapes."""

import math

import pytest
import torch

from diffalign.alignment.losses import denoising_errors, diffusion_dpo_loss
from diffalign.alignment.methods import METHODS, get_method


def errors_from_model(weight: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample errors of a linear 'denoiser' eps = weight * x: (B,)."""
    return denoising_errors(weight * x, noise)


def test_loss_is_log2_at_init_with_nonzero_gradient():
    torch.manual_seed(0)
    weight = torch.full((1, 1, 4, 4), 0.3, requires_grad=True)
    x_w, x_l, noise = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    policy_w, policy_l = errors_from_model(weight, x_w, noise), errors_from_model(weight, x_l, noise)
    loss, metrics = diffusion_dpo_loss(policy_w, policy_l, policy_w.detach(), policy_l.detach(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.abs().max() > 1e-3
    assert metrics["implicit_accuracy"] == 0 and metrics["reward_margin"] == 0 and metrics["kl_proxy"] == 0


def test_flipped_labels_reverse_the_gradient():
    torch.manual_seed(1)
    weight = torch.full((1, 1, 4, 4), 0.3, requires_grad=True)
    x_w, x_l, noise = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    grads = []
    for first, second in ((x_w, x_l), (x_l, x_w)):
        policy_w, policy_l = errors_from_model(weight, first, noise), errors_from_model(weight, second, noise)
        loss, _ = diffusion_dpo_loss(policy_w, policy_l, policy_w.detach(), policy_l.detach(), beta=100.0)
        grads.append(torch.autograd.grad(loss, weight)[0])
    torch.testing.assert_close(grads[0], -grads[1])
    assert grads[0].abs().max() > 1e-3


def test_metrics_on_a_hand_made_batch():
    policy_w, policy_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.20])
    reference_w, reference_l = torch.tensor([0.15, 0.25]), torch.tensor([0.20, 0.20])
    loss, metrics = diffusion_dpo_loss(policy_w, policy_l, reference_w, reference_l, beta=20.0)
    inside = torch.tensor([-10 * (-0.10 + 0.05), -10 * (0.10 - 0.05)])  # -beta/2 (gap - ref gap): [0.5, -0.5]
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(inside).mean().item(), rel=1e-6)
    assert metrics["implicit_accuracy"].item() == 0.5
    assert metrics["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["policy_mse_gap"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["reference_mse_gap"].item() == pytest.approx(0.0, abs=1e-7)


def test_shape_mismatch_and_unknown_method_are_clear_errors():
    with pytest.raises(ValueError, match="per-sample errors"):
        diffusion_dpo_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4, 2), torch.zeros(4), beta=1.0)
    with pytest.raises(ValueError, match="registered methods"):
        get_method("ppo")
    assert METHODS["dpo"].noise == "shared" and METHODS["dpo"].needs_reference
