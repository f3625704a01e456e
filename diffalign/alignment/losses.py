"""Preference losses over denoising errors: one pure function per method, plus the reductions they share.

The trainer hands a method the unreduced per-element squared errors (model output - target)^2 of the policy and the
reference, (B, K, c, h, w); a method reduces them (``per_candidate_errors``: the mean over elements, the L_m(x) =
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


def per_candidate_errors(errors: torch.Tensor) -> torch.Tensor:
    """Mean over the elements of each candidate: (B, K, c, h, w) -> (B, K)."""
    return errors.flatten(2).mean(dim=2)


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
