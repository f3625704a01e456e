"""SmPO, RankDPO, DenseDPO and PatchDPO losses on hand-made errors: limits that reduce to Diffusion-DPO, weights
computed by hand, zero gradients where the paper says a term carries no signal."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.alignment.losses import (
    SMPO_PICKSCORE_RANGE,
    candidate_errors,
    denoising_errors,
    densedpo_loss,
    diffusion_dpo_loss,
    frame_segments,
    patchdpo_loss,
    rankdpo_loss,
    rankdpo_weights,
    smpo_loss,
    smpo_preference,
    synpic_scores,
)

LOG2 = math.log(2)


def squared_errors(weight: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Unreduced errors (eps - weight * x)^2 of a linear 'denoiser', same shape as x."""
    return (weight * x - noise).pow(2)


def pair_errors(seed: int, shape=(4, 2, 3, 4, 4), reference_weight: float = 0.5):
    """A trainable weight, its unreduced errors and those of a frozen reference with another weight."""
    generator = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    noise[:, 1:] = noise[:, :1]  # the candidates of a prompt share their noise
    weight = torch.full((1,), 0.3, requires_grad=True)
    return weight, squared_errors(weight, x, noise), squared_errors(torch.tensor(reference_weight), x, noise)


def test_candidate_errors_reduce_like_denoising_errors():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 5, 5), torch.randn(3, 2, 4, 5, 5)
    expected = denoising_errors(pred.flatten(0, 1), target.flatten(0, 1)).view(3, 2)
    torch.testing.assert_close(candidate_errors((pred - target).pow(2)), expected, rtol=1e-6, atol=0)
    assert candidate_errors(torch.zeros(3, 2, dtype=torch.float64)).dtype == torch.float64
    assert candidate_errors(torch.zeros(3, 2, 1, 2, 2, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        candidate_errors(torch.zeros(3))


# SmPO ------------------------------------------------------------------------------------------------------------


def test_smpo_preference_by_hand():
    # Official train.py: n = (s - 0.11543526500463486) / (0.28201571106910706 - 0.11543526500463486);
    # n_w = 0.80779..., n_l = 0.50764..., p = e^n_w / (e^n_w + e^n_l) = sigmoid(0.05 / 0.16658044606447220).
    p = smpo_preference(torch.tensor([0.25, 0.20, 0.21]), torch.tensor([0.20, 0.25, 0.21]))
    assert p[0].item() == pytest.approx(0.574481, abs=1e-6)
    assert p[1].item() == pytest.approx(1 - 0.574481, abs=1e-6)
    assert p[2].item() == 0.5
    # A PickScore scaled by CLIP's logit scale (x100) with the range x100 gives the same p.
    scaled = smpo_preference(torch.tensor([25.0]), torch.tensor([20.0]), tuple(100 * v for v in SMPO_PICKSCORE_RANGE))
    assert scaled.item() == pytest.approx(0.574481, abs=1e-6)
    with pytest.raises(ValueError, match="max > min"):
        smpo_preference(torch.zeros(1), torch.zeros(1), (1.0, 1.0))


def test_smpo_no_preference_gives_exactly_zero_gradient():
    weight, policy, reference = pair_errors(1)
    p = smpo_preference(torch.full((4,), 0.2), torch.full((4,), 0.2))  # equal scores: p = 1/2
    loss, metrics = smpo_loss(policy, reference, p, beta=5000.0)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7)
    (grad,) = torch.autograd.grad(loss, weight)
    assert torch.all(grad == 0)
    assert metrics["pair_beta"] == 0 and metrics["preference"] == 0.5


def test_smpo_certain_preference_is_diffusion_dpo_with_scaled_beta():
    weight, policy, reference = pair_errors(2)
    loss, metrics = smpo_loss(policy, reference, torch.ones(4), beta=50.0)
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True)
    policy_pair, reference_pair = candidate_errors(policy), candidate_errors(reference)  # (B, 2)
    expected, expected_metrics = diffusion_dpo_loss(
        policy_pair[:, 0], policy_pair[:, 1], reference_pair[:, 0], reference_pair[:, 1], beta=50.0 * 10
    )
    (expected_grad,) = torch.autograd.grad(expected, weight)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(loss.item() - LOG2) > 1e-3  # policy differs from the reference: not a trivial log 2
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=0)
    assert metrics["implicit_accuracy"] == expected_metrics["implicit_accuracy"]
    assert metrics["pair_beta"].item() == pytest.approx(500.0)


def test_smpo_preference_below_half_equals_the_swapped_pair():
    weight, policy, reference = pair_errors(3)
    p = torch.tensor([0.3, 0.6, 0.45, 0.9])
    loss, _ = smpo_loss(policy, reference, p, beta=80.0)
    swapped, _ = smpo_loss(policy.flip(1), reference.flip(1), 1 - p, beta=80.0)
    assert loss.item() == pytest.approx(swapped.item(), rel=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        smpo_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4), beta=1.0)


# RankDPO ---------------------------------------------------------------------------------------------------------

# 1/D(r) = 1/log2(1 + r) for the positions 1..4, and the gains G = 2^phi - 1 of phi = 1, 1/2, 1/4, 0.
INV_D = [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5)]  # 1, 0.630930, 0.5, 0.430677
GAIN = {1.0: 1.0, 0.5: math.sqrt(2) - 1, 0.25: 2**0.25 - 1, 0.0: 0.0}  # 1, 0.414214, 0.189207, 0


def test_synpic_scores_count_wins_over_models_and_candidates():
    rewards = torch.tensor([[[3.0, 0.0], [1.0, 2.0], [2.0, 1.0], [2.0, 3.0]]])  # (B=1, K=4, n=2)
    # wins (model 1 + model 2) / (n (K - 1) = 6): x0 3+0, x1 0+2, x2 1+1, x3 1+3
    torch.testing.assert_close(synpic_scores(rewards), torch.tensor([[3.0, 2.0, 2.0, 4.0]]) / 6)
    torch.testing.assert_close(
        synpic_scores(torch.tensor([[3.0, 1.0, 2.0, 2.0]])), torch.tensor([[1.0, 0, 1 / 3, 1 / 3]])
    )
    # a tie margin: digits-like log p, three correct candidates apart only by float rounding, one wrong digit
    saturated = torch.tensor([[0.0, -1.1921e-07, -2.3842e-07, -3.2]])
    torch.testing.assert_close(synpic_scores(saturated), torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0]]))
    torch.testing.assert_close(synpic_scores(saturated, tie_margin=1e-3), torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]))
    weights = rankdpo_weights(synpic_scores(saturated, tie_margin=1e-3))  # (1, 4, 4)
    assert (weights[0, :3, :3] == 0).all() and (weights[0, :3, 3] > 0).all()  # only the pairs with the wrong digit


def test_rankdpo_weights_by_hand_k4():
    # Candidates in shuffled order: phi = 1/4, 1, 0, 1/2, so the ranking by phi puts x1, x3, x0, x2 at 1, 2, 3, 4.
    weights = rankdpo_weights(torch.tensor([[0.25, 1.0, 0.0, 0.5]]))[0]
    expected = torch.zeros(4, 4)
    expected[1, 3] = (GAIN[1.0] - GAIN[0.5]) * (INV_D[0] - INV_D[1])  # 0.585786 * 0.369070 = 0.216197
    expected[1, 0] = (GAIN[1.0] - GAIN[0.25]) * (INV_D[0] - INV_D[2])  # 0.810793 * 0.5 = 0.405396
    expected[1, 2] = (GAIN[1.0] - GAIN[0.0]) * (INV_D[0] - INV_D[3])  # 1 * 0.569323
    expected[3, 0] = (GAIN[0.5] - GAIN[0.25]) * (INV_D[1] - INV_D[2])  # 0.225007 * 0.130930 = 0.029460
    expected[3, 2] = (GAIN[0.5] - GAIN[0.0]) * (INV_D[1] - INV_D[3])  # 0.414214 * 0.200253 = 0.082948
    expected[0, 2] = (GAIN[0.25] - GAIN[0.0]) * (INV_D[2] - INV_D[3])  # 0.189207 * 0.069323 = 0.013116
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    assert weights[1, 3].item() == pytest.approx(0.216197, abs=1e-6)
    assert weights[3, 0].item() == pytest.approx(0.029460, abs=1e-6)


def test_rankdpo_predicted_ranking_penalises_the_outer_swap_most():
    # Fig. 2 of the paper: the model ranks the four candidates in reverse; the pair (1, 4) gets a larger weight than
    # (2, 3). Predicted positions 4, 3, 2, 1 for the candidates ranked 1, 2, 3, 4 by phi.
    weights = rankdpo_weights(torch.tensor([[1.0, 0.5, 0.25, 0.0]]), model_scores=torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    assert weights[0, 0, 3].item() == pytest.approx((GAIN[1.0] - GAIN[0.0]) * (INV_D[0] - INV_D[3]), rel=1e-6)
    assert weights[0, 1, 2].item() == pytest.approx((GAIN[0.5] - GAIN[0.25]) * (INV_D[1] - INV_D[2]), rel=1e-6)
    assert weights[0, 0, 3] > 10 * weights[0, 1, 2]
    # Ties of the model's scores (policy = reference) fall back to the ranking by phi.
    torch.testing.assert_close(
        rankdpo_weights(torch.tensor([[1.0, 0.5, 0.25, 0.0]]), torch.zeros(1, 4)),
        rankdpo_weights(torch.tensor([[1.0, 0.5, 0.25, 0.0]])),
    )


@pytest.mark.parametrize("ranking", ["predicted", "labels"])
def test_rankdpo_with_two_candidates_is_diffusion_dpo(ranking):
    weight, policy, reference = pair_errors(4, shape=(6, 2, 2, 4, 4))
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.5, 0.4], [0.0, 1.0], [0.3, 0.31], [0.8, 0.6]])
    loss, metrics = rankdpo_loss(policy, reference, scores, beta=40.0, ranking=ranking)
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True)
    winner_first = torch.where((scores[:, 0] > scores[:, 1])[:, None], torch.tensor([0, 1]), torch.tensor([1, 0]))
    policy_pair = candidate_errors(policy).gather(1, winner_first)  # (B, 2) winner first
    reference_pair = candidate_errors(reference).gather(1, winner_first)
    expected, expected_metrics = diffusion_dpo_loss(
        policy_pair[:, 0], policy_pair[:, 1], reference_pair[:, 0], reference_pair[:, 1], beta=40.0
    )
    (expected_grad,) = torch.autograd.grad(expected, weight)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=0)
    assert metrics["implicit_accuracy"] == expected_metrics["implicit_accuracy"]
    assert metrics["reward_margin"].item() == pytest.approx(expected_metrics["reward_margin"].item(), rel=1e-5)


def test_rankdpo_tied_scores_get_zero_weight_and_zero_gradient():
    weights = rankdpo_weights(torch.tensor([[0.5, 0.8, 0.8, 0.1]]))[0]
    assert weights[1, 2] == 0 and weights[2, 1] == 0 and weights[1, 0] > 0 and weights[2, 3] > 0
    # Prompt 0 all tied: it adds nothing, and the loss is prompt 1's alone.
    policy = torch.tensor([[0.3, 0.2, 0.4], [0.1, 0.5, 0.2]], requires_grad=True)
    reference = torch.tensor([[0.25, 0.25, 0.25], [0.2, 0.3, 0.2]])
    scores = torch.tensor([[0.4, 0.4, 0.4], [0.9, 0.2, 0.5]])
    loss, _ = rankdpo_loss(policy, reference, scores, beta=10.0)
    (grad,) = torch.autograd.grad(loss, policy)
    alone, _ = rankdpo_loss(policy[1:].detach(), reference[1:], scores[1:], beta=10.0)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    assert torch.all(grad[0] == 0) and grad[1].abs().min() > 1e-4


def test_rankdpo_unnormalised_is_the_papers_weighted_sum():
    # K = 3, labels ranking: x0 > x1 > x2 with phi = 1, 1/2, 0; errors chosen so every margin is known.
    policy = torch.tensor([[0.2, 0.4, 0.5]])
    reference = torch.tensor([[0.3, 0.3, 0.3]])  # excess L - L_ref = -0.1, 0.1, 0.2
    loss, _ = rankdpo_loss(policy, reference, torch.tensor([[1.0, 0.5, 0.0]]), beta=10.0, normalize=False)
    margin = {(0, 1): -5 * (-0.1 - 0.1), (0, 2): -5 * (-0.1 - 0.2), (1, 2): -5 * (0.1 - 0.2)}  # 1, 1.5, 0.5
    weight = {
        (0, 1): (GAIN[1.0] - GAIN[0.5]) * (INV_D[0] - INV_D[1]),
        (0, 2): (GAIN[1.0] - GAIN[0.0]) * (INV_D[0] - INV_D[2]),
        (1, 2): (GAIN[0.5] - GAIN[0.0]) * (INV_D[1] - INV_D[2]),
    }
    expected = sum(weight[pair] * math.log1p(math.exp(-margin[pair])) for pair in margin)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="scores must be"):
        rankdpo_loss(policy, reference, torch.zeros(1, 4), beta=1.0)


# DenseDPO --------------------------------------------------------------------------------------------------------


def video_errors(seed: int, frames: int = 8, uniform_in_time: bool = False):
    """Trainable weight, unreduced (B=3, 2, c=2, F, 3, 3) errors of policy and reference."""
    generator = torch.Generator().manual_seed(seed)
    shape = (3, 2, 2, 1 if uniform_in_time else frames, 3, 3)
    x, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    if uniform_in_time:
        x, noise = x.expand(-1, -1, -1, frames, -1, -1), noise.expand(-1, -1, -1, frames, -1, -1)
    weight = torch.full((1,), 0.3, requires_grad=True)
    return weight, squared_errors(weight, x, noise), squared_errors(torch.tensor(0.6), x, noise)


def clip_dpo(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    policy_pair, reference_pair = candidate_errors(policy), candidate_errors(reference)  # (B, 2)
    loss, _ = diffusion_dpo_loss(
        policy_pair[:, 0], policy_pair[:, 1], reference_pair[:, 0], reference_pair[:, 1], beta
    )
    return loss


def test_frame_segments_split_frames_evenly():
    assert frame_segments(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert frame_segments(5, 2).tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="fewer, longer segments"):
        frame_segments(3, 4)


def test_densedpo_identical_labels_reproduce_clip_level_dpo():
    # Errors the same in every frame: every segment has the clip's margin, so the mean of the terms is the clip term.
    weight, policy, reference = video_errors(5, uniform_in_time=True)
    loss, metrics = densedpo_loss(policy, reference, torch.ones(3, 4), beta=30.0)
    expected = clip_dpo(policy, reference, beta=30.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(loss.item() - LOG2) > 1e-3 and metrics["labelled_fraction"] == 1
    # One segment: the clip-level loss for any errors.
    weight, policy, reference = video_errors(6)
    one_segment, _ = densedpo_loss(policy, reference, torch.ones(3, 1), beta=30.0)
    assert one_segment.item() == pytest.approx(clip_dpo(policy, reference, beta=30.0).item(), rel=1e-6)


def test_densedpo_identical_labels_at_initialisation_give_the_clip_gradient():
    weight, policy, _ = video_errors(7)
    loss, _ = densedpo_loss(policy, policy.detach(), torch.ones(3, 4), beta=30.0)
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True)
    expected = clip_dpo(policy, policy.detach(), beta=30.0)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert expected_grad.abs().item() > 1e-3
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=0)


def test_densedpo_ties_give_no_gradient_and_are_skipped():
    weight, policy, reference = video_errors(8)
    loss, metrics = densedpo_loss(policy, reference, torch.zeros(3, 4), beta=30.0)
    (grad,) = torch.autograd.grad(loss, weight)
    assert loss.item() == 0 and torch.all(grad == 0) and metrics["labelled_fraction"] == 0
    # Labels (+1, 0) on frames (0-3, 4-7): the loss of the first half alone.
    half, _ = densedpo_loss(policy, reference, torch.tensor([[1.0, 0.0]] * 3), beta=30.0)
    first, _ = densedpo_loss(policy[:, :, :, :4], reference[:, :, :, :4], torch.ones(3, 1), beta=30.0)
    assert half.item() == pytest.approx(first.item(), rel=1e-6)


def test_densedpo_negative_labels_swap_the_candidates():
    weight, policy, reference = video_errors(9)
    labels = torch.tensor([[1.0, -1.0, 0.0, 1.0], [-1.0, -1.0, 1.0, 0.0], [1.0, 1.0, 1.0, -1.0]])
    loss, _ = densedpo_loss(policy, reference, labels, beta=30.0)
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True)
    swapped, _ = densedpo_loss(policy.flip(1), reference.flip(1), -labels, beta=30.0)
    (swapped_grad,) = torch.autograd.grad(swapped, weight)
    assert loss.item() == pytest.approx(swapped.item(), rel=1e-6)
    torch.testing.assert_close(grad, swapped_grad, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"\+1"):
        densedpo_loss(policy, reference, torch.full((3, 4), 0.5), beta=1.0)
    with pytest.raises(ValueError, match="every segment"):
        densedpo_loss(policy, reference, labels, beta=1.0, segments=torch.tensor([0, 0, 1, 1, 1, 1, 3, 3]))


# PatchDPO --------------------------------------------------------------------------------------------------------


def test_patchdpo_uniform_maps_give_the_image_level_loss():
    torch.manual_seed(10)
    pred, noise = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 4, 4, 4)
    errors = (pred - noise).pow(2)
    reference_map, generated_map = torch.zeros(2, 1, 1, 8, 8), torch.ones(2, 1, 1, 8, 8)
    loss, metrics = patchdpo_loss(errors, torch.cat([reference_map, generated_map], dim=1))
    assert loss.item() == pytest.approx(F.mse_loss(pred, noise).item(), rel=1e-6)  # the official non-DPO loss
    assert metrics["reference_weight"] == 1 and metrics["generated_weight"] == 1
    # A uniform quality q everywhere: (1 - q) on the reference's MSE, q on the generated image's, averaged.
    uniform, _ = patchdpo_loss(errors, torch.full((2, 2, 1, 8, 8), 0.25))
    expected = 0.5 * (0.75 * errors[:, 0].mean() + 0.25 * errors[:, 1].mean())
    assert uniform.item() == pytest.approx(expected.item(), rel=1e-6)
    # A pixel checkerboard of 0 / 1 area-pools to 1/2 on every latent cell (pixels 2x2 per latent).
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    pooled, _ = patchdpo_loss(errors, checkerboard.float().expand(2, 2, 1, 8, 8))
    half, _ = patchdpo_loss(errors, torch.full((2, 2, 1, 8, 8), 0.5))
    assert pooled.item() == pytest.approx(half.item(), rel=1e-6)


def test_patchdpo_zero_weight_patches_get_zero_gradient():
    torch.manual_seed(11)
    pred = torch.randn(1, 2, 3, 4, 4, requires_grad=True)
    errors = (pred - torch.randn(1, 2, 3, 4, 4)).pow(2)
    maps = torch.full((1, 2, 1, 8, 8), 0.5)
    maps[0, 0, 0, :4, :4] = 1.0  # reference patches reproduced perfectly: weight 1 - 1 = 0 (latent cells :2, :2)
    maps[0, 1, 0, 4:, 2:6] = 0.0  # bad generated patches: weight 0 (latent cells 2:, 1:3)
    loss, _ = patchdpo_loss(errors, maps)
    (grad,) = torch.autograd.grad(loss, pred)
    zero = torch.zeros(1, 2, 1, 4, 4, dtype=torch.bool)
    zero[0, 0, 0, :2, :2] = True
    zero[0, 1, 0, 2:, 1:3] = True
    zero = zero.expand_as(grad)
    assert torch.all(grad[zero] == 0)
    assert grad[~zero].abs().min() > 1e-6
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        patchdpo_loss(errors, maps * 2)
    with pytest.raises(ValueError, match="weight_maps shaped"):
        patchdpo_loss(errors, maps[:, :1])
