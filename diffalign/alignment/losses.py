"""Preference losses over denoising errors: one pure function per method, plus the reductions they share.

The trainer hands a method the unreduced per-element squared errors (model output - target)^2 of the policy and the
reference, (B, K, c, h, w); a method reduces them (``candidate_errors``: the mean over elements, the L_m(x) =
||eps - eps_m(x_t, c, t)||^2 of Diffusion-DPO; per segment or per patch for the dense methods) and passes them to
its loss here, which returns ``(loss, metrics)``. Nothing here touches a model, so each method's maths is testable
on hand-made numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def squared_errors(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unreduced per-element squared errors in float32: (N, C, H, W) x 2 -> (N, C, H, W)."""
    return (model_pred.float() - target.float()).pow(2)


def denoising_errors(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error in float32: (B, C, H, W) x 2 -> (B,)."""
    return squared_errors(model_pred, target).flatten(1).mean(dim=1)


def diffusion_dpo_loss(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    reference_w: torch.Tensor,
    reference_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14): -log sigmoid(-beta/2 [(L_w - L_l) - (L_ref_w - L_ref_l)]).

    All inputs are (B,) per-sample denoising errors; ``beta`` is the paper's beta (5000 for SD 1.5 / SDXL with
    the factor 1/2, as in the official code). At initialisation (policy = reference) the loss is log 2.

    Metrics (detached scalars): ``implicit_accuracy``, the fraction of pairs whose implicit reward margin is
    positive; ``reward_margin``, the mean of that margin (the sigmoid's argument); ``policy_mse_gap`` and
    ``reference_mse_gap``, the mean L_w - L_l of each model; ``kl_proxy``, the mean L_policy - L_ref over both
    samples (how far the policy's errors have drifted from the reference's).
    """
    for name, value in (("policy_l", policy_l), ("reference_w", reference_w), ("reference_l", reference_l)):
        if value.shape != policy_w.shape or value.ndim != 1:
            raise ValueError(
                f"diffusion_dpo_loss expects four (B,) per-sample errors of the same shape; policy_w has shape "
                f"{tuple(policy_w.shape)} but {name} has {tuple(value.shape)}. Reduce errors with denoising_errors()."
            )
    policy_gap = policy_w - policy_l  # (B,)
    reference_gap = reference_w - reference_l  # (B,)
    inside = -0.5 * beta * (policy_gap - reference_gap)  # (B,) implicit reward margin r_w - r_l
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "implicit_accuracy": (inside > 0).float().mean(),
        "reward_margin": inside.mean(),
        "policy_mse_gap": policy_gap.mean(),
        "reference_mse_gap": reference_gap.mean(),
        "kl_proxy": 0.5 * ((policy_w - reference_w) + (policy_l - reference_l)).mean(),
    }
    return loss, {key: value.detach() for key, value in metrics.items()}


# Offline methods of issue 15: SmPO, RankDPO, DenseDPO, PatchDPO. Their inputs are the UNREDUCED per-element squared
# errors (eps - eps_m(x_t, c, t))^2 of K candidates per prompt, (B, K, c, h, w) ((B, K, c, F, h, w) for video), that
# share one timestep and one noise; where a method allows it, per-candidate errors (B, K) are accepted as well.

SMPO_PICKSCORE_RANGE = (0.11543526500463486, 0.28201571106910706)
"""(min, max) of PickScore's cosine similarity on Pick-a-Pic v2, hard-coded in SmPO's official train.py."""


def candidate_errors(errors: torch.Tensor) -> torch.Tensor:
    """Per-candidate denoising errors L_m(x_k): (B, K) as given, (B, K, ...) per-element errors -> their mean (B, K).

    Half-precision errors are reduced in float32, float64 stays float64.
    """
    if errors.ndim < 2:
        raise ValueError(
            f"expected errors shaped (B, K) or (B, K, c, h, w) (K candidates per prompt); got {tuple(errors.shape)}."
        )
    errors = errors.to(torch.promote_types(errors.dtype, torch.float32))
    return errors if errors.ndim == 2 else errors.flatten(2).mean(dim=2)


def _check_same_shape(method: str, policy_errors: torch.Tensor, reference_errors: torch.Tensor) -> None:
    if policy_errors.shape != reference_errors.shape:
        raise ValueError(
            f"{method}: policy and reference errors must have the same shape, got {tuple(policy_errors.shape)} and "
            f"{tuple(reference_errors.shape)}; compute both on the same noised candidates."
        )


def smpo_preference(
    scores_w: torch.Tensor, scores_l: torch.Tensor, score_range: tuple[float, float] = SMPO_PICKSCORE_RANGE
) -> torch.Tensor:
    """Smoothed preference p(x_w > x_l) from two reward scores: SmPO (Lu et al. 2025, arXiv 2506.02698).

    As in the official ``train.py`` (JaydenLyh/SmPO), each score is min-max normalised with a FIXED range,
    n = (s - min) / (max - min), and p is the softmax over the pair: p = exp(n_w) / (exp(n_w) + exp(n_l)) =
    sigmoid((s_w - s_l) / (max - min)); only the width of the range matters. The default range is the official one,
    for PickScore as the cosine similarity of the normalised CLIP embeddings (no logit scale); for a PickScore
    multiplied by CLIP's logit scale (100) pass the range times 100, for other rewards their range over the data.
    The official code reorders each pair so that x_w has the higher PickScore (p >= 1/2); here p < 1/2 where the
    reward disagrees with the stored order, which ``smpo_loss`` turns into the same reordering through (2p - 1).

    ``scores_w``, ``scores_l``: (B,) reward scores of candidate 0 and candidate 1 -> p (B,) float32.
    """
    low, high = score_range
    if not high > low:
        raise ValueError(f"smpo_preference: score_range must be (min, max) with max > min, got {score_range}.")
    n_w = (scores_w.float() - low) / (high - low)  # (B,)
    n_l = (scores_l.float() - low) / (high - low)  # (B,)
    return torch.sigmoid(n_w - n_l)


def smpo_loss(
    policy_errors: torch.Tensor,
    reference_errors: torch.Tensor,
    p: torch.Tensor,
    beta: float,
    scale: float = 10.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SmPO loss: Diffusion-DPO with a per-pair beta scaled by the smoothed preference (Lu et al. 2025).

    -log sigmoid(-beta/2 * scale * (2p - 1) * [(L_0 - L_1) - (L_ref_0 - L_ref_1)]), averaged over the pairs, as
    ``scale_term = -0.5 * beta_dpo * (2 * probs - 1) * 10`` in the official ``train.py`` (beta 2000 for SD 1.5,
    5000 for SDXL there). p = 1/2 (no preference) gives a zero gradient; p = 1 gives Diffusion-DPO with beta * scale.
    The official code applies ``probs[0]`` to the whole batch (it trains with one pair per device); here each pair
    has its own p. The ReNoise inversion that produces the noised latents of SmPO happens before this loss.

    ``policy_errors``, ``reference_errors``: (B, 2) per-candidate or (B, 2, c, h, w) per-element errors, candidate
    0 first; ``p``: (B,) preference of candidate 0 over candidate 1 (``smpo_preference``).
    Metrics: those of ``diffusion_dpo_loss`` plus ``preference`` (mean p) and ``pair_beta`` (mean scaled beta).
    """
    _check_same_shape("smpo_loss", policy_errors, reference_errors)
    policy, reference = candidate_errors(policy_errors), candidate_errors(reference_errors)  # (B, 2), (B, 2)
    if policy.shape[1] != 2 or p.shape != policy.shape[:1]:
        raise ValueError(
            f"smpo_loss expects errors of pairs (B, 2, ...) and p shaped (B,); got errors {tuple(policy_errors.shape)}"
            f" and p {tuple(p.shape)}."
        )
    pair_beta = beta * scale * (2 * p.to(policy.dtype) - 1)  # (B,)
    policy_gap = policy[:, 0] - policy[:, 1]  # (B,)
    reference_gap = reference[:, 0] - reference[:, 1]  # (B,)
    inside = -0.5 * pair_beta * (policy_gap - reference_gap)  # (B,)
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "implicit_accuracy": (inside > 0).float().mean(),
        "reward_margin": inside.mean(),
        "policy_mse_gap": policy_gap.mean(),
        "reference_mse_gap": reference_gap.mean(),
        "kl_proxy": (policy - reference).mean(),
        "preference": p.float().mean(),
        "pair_beta": pair_beta.mean(),
    }
    return loss, {key: value.detach() for key, value in metrics.items()}


def synpic_scores(rewards: torch.Tensor, tie_margin: float = 0.0) -> torch.Tensor:
    """Syn-Pic preference scores phi(x_i) = C_i / (n (K - 1)) (Karthik et al. 2024, arXiv 2410.18013, Alg. 1).

    C_i counts the comparisons x_i wins against the K - 1 other candidates under each of the n reward models, so
    phi lies in [0, 1] and ties share a score. A win needs R_m(x_i) - R_m(x_j) > ``tie_margin`` (0: any strict
    difference, as Alg. 1; > 0 for a saturated reward whose near-equal scores differ by rounding).
    ``rewards``: (B, K) one reward model or (B, K, n) -> phi (B, K).
    """
    if rewards.ndim == 2:
        rewards = rewards.unsqueeze(-1)  # (B, K, 1)
    if rewards.ndim != 3 or rewards.shape[1] < 2:
        raise ValueError(
            f"synpic_scores expects rewards shaped (B, K) or (B, K, n) with K >= 2, got {tuple(rewards.shape)}."
        )
    num_candidates, num_models = rewards.shape[1], rewards.shape[2]
    beats = rewards.unsqueeze(2) - rewards.unsqueeze(1) > tie_margin  # (B, K, K, n): R_m(x_i) beats R_m(x_j)
    wins = beats.sum(dim=(2, 3))  # (B, K)
    return wins.float() / (num_models * (num_candidates - 1))


def _ranking_positions(scores: torch.Tensor, model_scores: torch.Tensor | None) -> torch.Tensor:
    """1-based positions (B, K) in the ranking by descending ``model_scores``, ties broken by descending ``scores``."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (B, K)
    if model_scores is not None:
        keys = model_scores.gather(1, order)  # (B, K) model scores in the order of the labels
        order = order.gather(1, torch.argsort(keys, dim=1, descending=True, stable=True))
    ranks = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)  # (B, K)
    return torch.empty_like(order).scatter_(1, order, ranks).to(scores.dtype)


def rankdpo_weights(scores: torch.Tensor, model_scores: torch.Tensor | None = None) -> torch.Tensor:
    """RankDPO's DCG pair weights (Karthik et al. 2024, arXiv 2410.18013, Eq. 6 and Alg. 2), (B, K) -> (B, K, K).

    W[b, i, j] = |G_i - G_j| * |1/D(pi(i)) - 1/D(pi(j))| where candidate i is preferred (scores_i > scores_j), 0
    otherwise (tied scores get zero weight): the LambdaRank change in DCG when i and j swap places. Gain
    G_i = 2^{phi_i} - 1 (Alg. 2: G_ij = 2^{phi(x_i)} - 2^{phi(x_j)}), phi the scores (Syn-Pic's phi lies in [0, 1];
    see ``synpic_scores``); discount D(r) = log2(1 + r) of the 1-based position r.
    The paper is ambiguous about the ranking pi: Alg. 2 sorts by phi, the caption of Fig. 2 by the current model's
    scores s_i (Eq. 5), as LambdaRank / LiPO-lambda do. With ``model_scores`` (B, K) (higher = better, e.g. the
    implicit rewards -(L_theta - L_ref)) pi is that predicted ranking, ties broken by ``scores``; without, pi ranks
    by ``scores``.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"rankdpo_weights expects scores shaped (B, K) with K >= 2, got {tuple(scores.shape)}.")
    if model_scores is not None and model_scores.shape != scores.shape:
        raise ValueError(
            f"rankdpo_weights: model_scores must have the shape of scores {tuple(scores.shape)}, got "
            f"{tuple(model_scores.shape)}."
        )
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    gain = torch.exp2(scores) - 1  # (B, K)
    inverse_discount = 1 / torch.log2(1 + _ranking_positions(scores, model_scores))  # (B, K)
    gain_difference = (gain[:, :, None] - gain[:, None, :]).abs()  # (B, K, K)
    discount_difference = (inverse_discount[:, :, None] - inverse_discount[:, None, :]).abs()  # (B, K, K)
    preferred = scores[:, :, None] > scores[:, None, :]  # (B, K, K): i ranked above j by the labels
    return gain_difference * discount_difference * preferred


def rankdpo_loss(
    policy_errors: torch.Tensor,
    reference_errors: torch.Tensor,
    scores: torch.Tensor,
    beta: float,
    ranking: str = "predicted",
    normalize: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RankDPO loss (Karthik et al. 2024, arXiv 2410.18013, Eq. 7 and Alg. 2): DCG-weighted pairwise DPO terms.

    sum_{i above j} W_ij * -log sigmoid(-beta/2 [(L_i - L_ref_i) - (L_j - L_ref_j)]) over every ordered pair of
    the K candidates of a prompt, which share one timestep and noise; W from ``rankdpo_weights``. ``beta`` carries
    the factor 1/2 of ``diffusion_dpo_loss`` so that one beta means the same in both.
    ``ranking``: "predicted" takes the discount positions from the ranking by the implicit rewards
    -(L_theta - L_ref) of this batch (Fig. 2; detached, ties, as at initialisation, broken by the scores), "labels"
    from the ranking by the scores (Alg. 2).
    ``normalize``: True divides each prompt's weights by their sum, so every prompt counts once whatever its gains
    and K = 2 gives Diffusion-DPO exactly; False keeps the paper's raw sum of weighted terms. The loss is the mean
    over the prompts that have at least one strict preference (prompts whose scores all tie add nothing).

    ``policy_errors``, ``reference_errors``: (B, K) or (B, K, c, h, w); ``scores``: (B, K), higher = better.
    Metrics: ``implicit_accuracy`` (fraction of weighted pairs with a positive margin), ``reward_margin`` (their
    mean margin), ``pair_weight`` (mean raw weight of a weighted pair), ``kl_proxy``.
    """
    if ranking not in ("predicted", "labels"):
        raise ValueError(f"rankdpo_loss: ranking must be 'predicted' or 'labels', got {ranking!r}.")
    _check_same_shape("rankdpo_loss", policy_errors, reference_errors)
    excess = candidate_errors(policy_errors) - candidate_errors(reference_errors)  # (B, K): L_theta - L_ref
    if scores.shape != excess.shape:
        raise ValueError(
            f"rankdpo_loss: scores must be (B, K) = {tuple(excess.shape)} like the errors, got {tuple(scores.shape)}."
        )
    model_scores = -excess.detach() if ranking == "predicted" else None
    raw_weights = rankdpo_weights(scores, model_scores).to(excess.dtype)  # (B, K, K)
    weights = raw_weights
    if normalize:
        total = raw_weights.sum(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        weights = torch.where(total > 0, raw_weights / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    inside = -0.5 * beta * (excess[:, :, None] - excess[:, None, :])  # (B, K, K): margin of i over j
    ranked_prompts = (raw_weights > 0).flatten(1).any(dim=1).sum().clamp_min(1)
    loss = (weights * -F.logsigmoid(inside)).sum() / ranked_prompts
    weighted = raw_weights > 0  # (B, K, K)
    pairs = weighted.sum().clamp_min(1)
    metrics = {
        "implicit_accuracy": ((inside > 0) & weighted).sum() / pairs,
        "reward_margin": (inside * weighted).sum() / pairs,
        "pair_weight": raw_weights.sum() / pairs,
        "kl_proxy": excess.mean(),
    }
    return loss, {key: value.detach().float() for key, value in metrics.items()}


def frame_segments(num_frames: int, num_segments: int) -> torch.Tensor:
    """Segment index of each latent frame, the F frames split evenly in time: s(f) = floor(f S / F), (F,) int64.

    DenseDPO labels short segments of the decoded video (e.g. 1 s each); this maps S segments onto the F latent
    frames in order, consecutive frames to one segment, sizes differing by at most one. A video VAE whose latent
    frames do not cover equal spans of pixels (e.g. a causal first frame) needs its own map, passed to
    ``densedpo_loss`` as ``segments``.
    """
    if not 1 <= num_segments <= num_frames:
        raise ValueError(
            f"frame_segments: need 1 <= segments <= latent frames to give every segment a frame, got "
            f"{num_segments} segments for {num_frames} frames; label fewer, longer segments."
        )
    return torch.arange(num_frames) * num_segments // num_frames


def densedpo_loss(
    policy_errors: torch.Tensor,
    reference_errors: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DenseDPO loss (Wu et al. 2025, arXiv 2506.03517): one Diffusion-DPO term per labelled temporal segment.

    For each segment s with label y_s in {+1, -1}: -log sigmoid(-beta/2 * y_s * [(L_0,s - L_1,s) - (L_ref_0,s -
    L_ref_1,s)]), L_k,s the mean squared error of candidate k over the latent frames of segment s (and c, h, w);
    y_s = +1 prefers candidate 0, -1 candidate 1 (the same as swapping the candidates), 0 is a tie and skipped.
    The paper sums the segment terms; here they are averaged over all labelled segments of the batch, so the scale
    matches ``diffusion_dpo_loss`` at the same beta: with one segment, or with the same label on every segment and
    equal per-segment margins, the loss is the clip-level Diffusion-DPO loss exactly, and at initialisation
    (policy = reference) identical labels give its value log 2 and its gradient for any errors (equal segments).
    A batch with no labelled segment gives loss 0 with a zero gradient.

    ``policy_errors``, ``reference_errors``: (B, 2, c, F, h, w) per-element squared errors of the two clips (one
    timestep and noise per pair); ``labels``: (B, S); ``segments``: (F,) segment index of each latent frame,
    default ``frame_segments(F, S)``.
    Metrics: ``implicit_accuracy`` and ``reward_margin`` over labelled segments, ``labelled_fraction``, ``kl_proxy``.
    """
    _check_same_shape("densedpo_loss", policy_errors, reference_errors)
    if policy_errors.ndim != 6 or policy_errors.shape[1] != 2:
        raise ValueError(
            f"densedpo_loss expects unreduced errors of video pairs shaped (B, 2, c, F, h, w), got "
            f"{tuple(policy_errors.shape)}."
        )
    batch, num_frames = policy_errors.shape[0], policy_errors.shape[3]
    if labels.ndim != 2 or labels.shape[0] != batch:
        raise ValueError(f"densedpo_loss expects labels shaped (B={batch}, S), got {tuple(labels.shape)}.")
    if not torch.isin(labels, labels.new_tensor([-1.0, 0.0, 1.0])).all():
        raise ValueError("densedpo_loss: labels must be +1 (candidate 0 better), -1 (candidate 1 better) or 0 (tie).")
    num_segments = labels.shape[1]
    segments = frame_segments(num_frames, num_segments) if segments is None else segments
    if segments.shape != (num_frames,) or not torch.equal(segments.unique().cpu(), torch.arange(num_segments)):
        raise ValueError(
            f"densedpo_loss: segments must give each of the {num_frames} latent frames a segment index in "
            f"[0, {num_segments}) and every segment at least one frame; got {segments.tolist()}."
        )
    membership = F.one_hot(segments.to(policy_errors.device), num_segments).to(  # (F, S)
        torch.promote_types(policy_errors.dtype, torch.float32)
    )
    membership = membership / membership.sum(dim=0)  # (F, S): mean over each segment's frames

    def segment_errors(errors: torch.Tensor) -> torch.Tensor:
        return errors.to(membership.dtype).mean(dim=(2, 4, 5)) @ membership  # (B, 2, F) @ (F, S) -> (B, 2, S)

    policy, reference = segment_errors(policy_errors), segment_errors(reference_errors)  # (B, 2, S)
    label = labels.to(policy.dtype)  # (B, S)
    inside = -0.5 * beta * label * ((policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1]))  # (B, S)
    labelled = label != 0  # (B, S)
    count = labelled.sum().clamp_min(1)
    loss = (-F.logsigmoid(inside) * labelled).sum() / count
    metrics = {
        "implicit_accuracy": ((inside > 0) & labelled).sum() / count,
        "reward_margin": (inside * labelled).sum() / count,
        "labelled_fraction": labelled.float().mean(),
        "kl_proxy": (policy - reference).mean(),
    }
    return loss, {key: value.detach().float() for key, value in metrics.items()}


def patchdpo_loss(
    policy_errors: torch.Tensor, weight_maps: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PatchDPO loss (Huang et al. 2025, arXiv 2412.03177): patch-quality-weighted denoising MSE, no reference model.

    mean over (B, K, c, h, w) of w * (eps - eps_theta)^2 with w = 1 - q_0 on candidate 0, the reference image, and
    w = q_k on the generated images k >= 1, where q in [0, 1] is the patch quality map (1: the patch matches the
    reference): the reference is learnt where the generation failed, a generated image where it is faithful. This
    is ``weighted_mse_loss`` with ``region_weight = cat([1 - target_rmap, contra_rmap])`` in the official training
    script (``train_patchdpo.py`` of the fork rfan-debug/PatchDPO of hqhQAQ/PatchDPO): no sigmoid, no reference.
    The official data pair one generated image with its reference (K = 2); with K > 2 the generated images share
    one reference term, which then counts 1/K of the mean. Maps at the pixel resolution are area-pooled to the
    latent (h, w). q_0 = 0 and q_k = 1 everywhere give the image-level loss (plain MSE over all candidates).

    ``policy_errors``: (B, K, c, h, w) per-element squared errors, candidate 0 the reference image; ``weight_maps``:
    (B, K, 1, H, W), q_0 on the reference image and q_k of each generated image, in [0, 1].
    Metrics: ``reference_error`` / ``generated_error`` (unweighted MSE of each side) and the mean weights
    ``reference_weight`` / ``generated_weight``.
    """
    if policy_errors.ndim != 5 or policy_errors.shape[1] < 2:
        raise ValueError(
            f"patchdpo_loss expects unreduced errors shaped (B, K, c, h, w), K >= 2 (reference image first), got "
            f"{tuple(policy_errors.shape)}."
        )
    batch, num_candidates, _, height, width = policy_errors.shape
    if weight_maps.ndim != 5 or weight_maps.shape[:3] != (batch, num_candidates, 1):
        raise ValueError(
            f"patchdpo_loss expects weight_maps shaped (B={batch}, K={num_candidates}, 1, H, W), got "
            f"{tuple(weight_maps.shape)}."
        )
    if weight_maps.min() < 0 or weight_maps.max() > 1:
        raise ValueError("patchdpo_loss: patch quality maps must lie in [0, 1] (1: the patch matches the reference).")
    errors = policy_errors.to(torch.promote_types(policy_errors.dtype, torch.float32))  # (B, K, c, h, w)
    quality = F.interpolate(weight_maps.to(errors.dtype).flatten(0, 1), size=(height, width), mode="area")
    quality = quality.view(batch, num_candidates, 1, height, width)  # (B, K, 1, h, w)
    weights = torch.cat([1 - quality[:, :1], quality[:, 1:]], dim=1)  # (B, K, 1, h, w)
    loss = (errors * weights).mean()
    metrics = {
        "reference_error": errors[:, 0].mean(),
        "generated_error": errors[:, 1:].mean(),
        "reference_weight": weights[:, 0].mean(),
        "generated_weight": weights[:, 1:].mean(),
    }
    return loss, {key: value.detach() for key, value in metrics.items()}


# Online methods of issue 16: D3PO over per-step log-probabilities of sampled trajectories (``alignment/logprob.py``),
# Diffusion-DRO over per-sample denoising errors of expert images and of the policy's own samples.


def d3po_loss(
    logp_policy: torch.Tensor,
    logp_reference: torch.Tensor,
    beta: float = 0.1,
    clip_range: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D3PO loss (Yang et al., CVPR 2024): -log sigmoid(beta [log clip(r_w) - log clip(r_l)]) per step.

    r = exp(log pi_theta(x_{t-1} | x_t) - log pi_ref(x_{t-1} | x_t)) of each stored step of the preferred (w,
    candidate 0) and rejected (l, candidate 1) trajectory, clipped to [1 - clip_range, 1 + clip_range] BEFORE its
    log, so a ratio outside the range gives no gradient, as the official ``scripts/rm/train_d3po.py`` (yk7333/d3po)::

        ratio_0 = torch.clamp(torch.exp(total_prob_0 - total_ref_prob_0), 1 - config.train.eps, 1 + config.train.eps)
        loss = -torch.log(torch.sigmoid(beta * torch.log(ratio_0) * human_prefer[:, 0] + ...)).mean()

    with ``train.eps = 0.1`` and ``train.beta = 0.1`` (config/base.py). The loss is the mean over the batch and the
    steps: the official code back-propagates each step's batch mean under gradient accumulation over
    ``gradient_accumulation_steps * num_train_timesteps`` micro-steps, which accelerate divides by, and takes one
    optimizer step per trajectory batch — the mean over steps, not the sum. In the official code pi_ref is a frozen
    copy of the initial UNet (``ref = copy.deepcopy(pipeline.unet)``), not the log-probabilities stored at sampling
    time; pass either. At pi_theta = pi_ref every step's loss is log 2.

    ``logp_policy``, ``logp_reference``: (B, 2, T) step log-probabilities (``ddim_step_with_logprob``, mean
    reduction as the official code) of the T trained steps of both trajectories, candidate 0 preferred.
    Metrics: ``implicit_accuracy`` (fraction of steps with a positive margin), ``reward_margin`` (mean margin),
    ``clip_fraction`` (fraction of ratios outside the range), ``log_ratio_w`` / ``log_ratio_l`` (mean unclipped
    log-ratios).
    """
    if logp_policy.shape != logp_reference.shape or logp_policy.ndim != 3 or logp_policy.shape[1] != 2:
        raise ValueError(
            f"d3po_loss expects two (B, 2, T) tensors of step log-probabilities (preferred trajectory first), got "
            f"{tuple(logp_policy.shape)} and {tuple(logp_reference.shape)}."
        )
    if not 0 < clip_range < 1:
        raise ValueError(f"d3po_loss: clip_range must lie in (0, 1) (official: 0.1), got {clip_range}.")
    log_ratio = logp_policy.float() - logp_reference.float()  # (B, 2, T)
    unclipped_ratio = torch.exp(log_ratio)  # (B, 2, T)
    ratio = unclipped_ratio.clamp(1 - clip_range, 1 + clip_range)  # (B, 2, T)
    clipped_log_ratio = torch.log(ratio)  # (B, 2, T)
    inside = beta * (clipped_log_ratio[:, 0] - clipped_log_ratio[:, 1])  # (B, T)
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "implicit_accuracy": (inside > 0).float().mean(),
        "reward_margin": inside.mean(),
        "clip_fraction": (unclipped_ratio != ratio).float().mean(),
        "log_ratio_w": log_ratio[:, 0].mean(),
        "log_ratio_l": log_ratio[:, 1].mean(),
    }
    return loss, {key: value.detach() for key, value in metrics.items()}


def dro_loss(
    expert_policy: torch.Tensor,
    expert_reference: torch.Tensor,
    online_policy: torch.Tensor,
    online_reference: torch.Tensor,
    margin: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DRO hinge: mean of max(0, (L_expert - L_expert_ref) - (L_online - L_online_ref) + margin).

    The errors L are (B,) per-sample denoising errors (``denoising_errors``: mean over c, h, w) of the policy and
    of the frozen reference on noised expert images and on the policy's own (online) samples at the same
    timesteps, as ``train.py`` of basiclab/DiffusionDRO::

        diff = loss_expert_diff - loss_policy_diff
        loss = torch.maximum(diff + args.margin, torch.zeros_like(diff)).mean()

    with ``--margin`` 0.001, no weighting; the hinge pulls the expert error below the reference's and pushes the
    online one above, until the gap exceeds the margin, then the pair gives no gradient.
    Gradient clipping: the official code's ``clip_grad_norm_`` receives a ``filter`` generator that the optimizer
    already consumed, so it clips nothing; the trainer clips a list of the trainable parameters.

    Metrics: ``diff`` (mean of the hinge's argument without the margin), ``active_fraction`` (fraction of samples
    inside the hinge), ``expert_excess`` / ``online_excess`` (mean L - L_ref of each side), ``expert_error`` /
    ``online_error`` (mean policy errors).
    """
    for name, value in (
        ("expert_reference", expert_reference),
        ("online_policy", online_policy),
        ("online_reference", online_reference),
    ):
        if value.shape != expert_policy.shape or value.ndim != 1:
            raise ValueError(
                f"dro_loss expects four (B,) per-sample errors of the same shape; expert_policy has shape "
                f"{tuple(expert_policy.shape)} but {name} has {tuple(value.shape)}; reduce with denoising_errors()."
            )
    expert_excess = expert_policy - expert_reference  # (B,)
    online_excess = online_policy - online_reference  # (B,)
    diff = expert_excess - online_excess  # (B,)
    loss = F.relu(diff + margin).mean()
    metrics = {
        "diff": diff.mean(),
        "active_fraction": (diff + margin > 0).float().mean(),
        "expert_excess": expert_excess.mean(),
        "online_excess": online_excess.mean(),
        "expert_error": expert_policy.mean(),
        "online_error": online_policy.mean(),
    }
    return loss, {key: value.detach() for key, value in metrics.items()}
