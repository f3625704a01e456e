"""D3PO and Diffusion-DRO losses on hand-made numbers: the value at initialisation, the clipped ratios that stop the
gradient, the direction of each gradient, and the hinge's inactive region."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.alignment.losses import d3po_loss, dro_loss

LOG2 = math.log(2)


# D3PO ------------------------------------------------------------------------------------------------------------


def test_d3po_is_log2_at_policy_equal_reference_with_the_gradient_by_hand():
    torch.manual_seed(0)
    batch, steps, beta = 3, 5, 0.1
    reference = torch.randn(batch, 2, steps)
    policy = reference.clone().requires_grad_(True)
    loss, metrics = d3po_loss(policy, reference, beta=beta, clip_range=0.1)
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)  # float32
    loss.backward()
    # d/d log pi_w of -log sigmoid(beta (log r_w - log r_l)) at r = 1 is -beta / 2, averaged over B * T steps
    expected = torch.full((batch, 2, steps), beta / 2 / (batch * steps))
    expected[:, 0] *= -1
    torch.testing.assert_close(policy.grad, expected, rtol=1e-6, atol=0)
    assert metrics["clip_fraction"].item() == 0 and metrics["reward_margin"].item() == 0


def test_d3po_clipped_ratios_give_no_gradient():
    # one pair, four steps; log-ratios of (w, l) per step, the clip range (0.9, 1.1)
    ratios_w = torch.tensor([1.2, 1.05, 1.0, 0.5])
    ratios_l = torch.tensor([1.0, 0.8, 0.95, 1.09])
    reference = torch.zeros(1, 2, 4)
    policy = torch.stack([ratios_w.log(), ratios_l.log()])[None].requires_grad_(True)  # (1, 2, 4)
    beta = 0.1
    loss, metrics = d3po_loss(policy, reference, beta=beta, clip_range=0.1)
    clipped_w = torch.tensor([1.1, 1.05, 1.0, 0.9]).log()
    clipped_l = torch.tensor([1.0, 0.9, 0.95, 1.09]).log()
    expected = -F.logsigmoid(beta * (clipped_w - clipped_l)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grad = policy.grad[0]  # (2, 4)
    assert grad[0, 0] == 0 and grad[0, 3] == 0 and grad[1, 1] == 0  # outside (0.9, 1.1): clipped
    assert (grad[0, 1:3] < 0).all() and (grad[1, [0, 2, 3]] > 0).all()  # inside: w pulled up, l pushed down
    inside = beta * (clipped_w[1] - clipped_l[1])
    assert grad[0, 1].item() == pytest.approx(-beta * torch.sigmoid(-inside).item() / 4, rel=1e-5)
    assert metrics["clip_fraction"].item() == pytest.approx(3 / 8)


def test_d3po_swapping_the_candidates_flips_the_gradient():
    torch.manual_seed(1)
    reference = torch.randn(4, 2, 6)
    offset = 0.08 * torch.rand(4, 2, 6) - 0.04  # |log r| < 0.04: every ratio inside the clip range
    policy = (reference + offset).requires_grad_(True)
    swapped = (reference + offset).flip(1).detach().requires_grad_(True)
    d3po_loss(policy, reference)[0].backward()
    d3po_loss(swapped, reference.flip(1))[0].backward()
    assert (policy.grad != 0).all()
    assert torch.equal(torch.sign(swapped.grad.flip(1)), -torch.sign(policy.grad))


def test_d3po_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, 2, T\)"):
        d3po_loss(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="clip_range"):
        d3po_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), clip_range=1.5)


# Diffusion-DRO ---------------------------------------------------------------------------------------------------


def errors(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_dro_loss_by_hand():
    expert, expert_ref = errors(0.5, 0.2, 0.3), errors(0.4, 0.3, 0.3)
    online, online_ref = errors(0.6, 0.1, 0.2), errors(0.5, 0.4, 0.6)
    loss, metrics = dro_loss(expert, expert_ref, online, online_ref)  # margin 1e-3 as the official --margin
    # diff = (L_e - L_e_ref) - (L_o - L_o_ref) = [0.1 - 0.1, -0.1 + 0.3, 0 + 0.4] = [0, 0.2, 0.4]
    assert loss.item() == pytest.approx((0.001 + 0.201 + 0.401) / 3, abs=1e-12)
    assert metrics["diff"].item() == pytest.approx(0.2, abs=1e-12)
    assert metrics["active_fraction"].item() == 1.0
    loss.backward()
    # d loss / d L_expert = +1/B on active samples: lowering the policy's expert error lowers the loss
    torch.testing.assert_close(expert.grad, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(online.grad, torch.full((3,), -1 / 3, dtype=torch.float64))
    torch.testing.assert_close(expert_ref.grad, torch.full((3,), -1 / 3, dtype=torch.float64))
    torch.testing.assert_close(online_ref.grad, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_dro_inactive_hinge_gives_zero_loss_and_gradient():
    expert, expert_ref = errors(0.2, 0.1), errors(0.4, 0.3)
    online, online_ref = errors(0.5, 0.3), errors(0.4, 0.25)
    # diff = [-0.2 - 0.1, -0.2 - 0.05] = [-0.3, -0.25]: both below -margin
    loss, metrics = dro_loss(expert, expert_ref, online, online_ref, margin=0.1)
    assert loss.item() == 0 and metrics["active_fraction"].item() == 0
    loss.backward()
    assert expert.grad.abs().sum() == 0 and online.grad.abs().sum() == 0


def test_dro_margin_activates_a_sample_with_a_small_gap():
    expert, expert_ref = errors(0.3, 0.3), errors(0.3, 0.3)
    online, online_ref = errors(0.3005, 0.5), errors(0.3, 0.3)
    # diff = [-0.0005, -0.2]: only the first is within the default margin 1e-3
    loss, metrics = dro_loss(expert, expert_ref, online, online_ref)
    assert loss.item() == pytest.approx(0.0005 / 2, abs=1e-12)
    assert metrics["active_fraction"].item() == 0.5
    loss.backward()
    torch.testing.assert_close(expert.grad, torch.tensor([0.5, 0.0], dtype=torch.float64))


def test_dro_rejects_unreduced_errors():
    with pytest.raises(ValueError, match="denoising_errors"):
        dro_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2, 4), torch.zeros(2))
