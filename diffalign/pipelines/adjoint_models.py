"""Model adapters for AdjointDPM: a diffusers UNet (with classifier-free guidance) as ``model(x, t, cond)``.

``diffalign.samplers.adjoint_sample`` takes a plain callable; these wrap the pipelines' UNets into one, and give the
digits-cond prompt embeddings and the classifier reward that the AdjointDPM demos optimise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .digits import NULL_LABEL, DigitsPromptEncoder


def unet_model(unet, guidance_scale: float | None = None, **unet_kwargs) -> Callable:
    """``model(x, t, cond)`` for a ``UNet2DConditionModel``; ``cond`` is its ``encoder_hidden_states``.

    Without guidance ``cond`` is (B, L, D). With ``guidance_scale`` (classifier-free guidance, Ho & Salimans 2022)
    ``cond`` is (2B, L, D): the unconditional embeddings first, then the conditional ones, as diffusers pipelines
    stack them; the output is ``eps_u + s (eps_c - eps_u)``. ``unet_kwargs`` (e.g. ``added_cond_kwargs``) go to
    every call.
    """

    def model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        if guidance_scale is None:
            return unet(x, t, encoder_hidden_states=cond, **unet_kwargs).sample
        if cond.shape[0] != 2 * x.shape[0]:
            raise ValueError(
                f"with guidance_scale the conditioning must stack [unconditional; conditional] embeddings: expected "
                f"{2 * x.shape[0]} rows for {x.shape[0]} samples, got {cond.shape[0]}."
            )
        eps_uncond, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=cond, **unet_kwargs).sample.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return model


def digits_prompt_embeddings(
    text_encoder: DigitsPromptEncoder, labels: torch.Tensor, guidance: bool = True
) -> torch.Tensor:
    """digits-cond ``encoder_hidden_states`` for digit ``labels`` (B,): (B, 1, D), or (2B, 1, D) with the empty prompt
    first when ``guidance`` (the layout ``unet_model(..., guidance_scale=...)`` expects)."""
    labels = labels.to(text_encoder.device)
    if guidance:
        labels = torch.cat([torch.full_like(labels, NULL_LABEL), labels])
    return text_encoder(labels)


def classifier_log_prob(classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability (B,) that ``classifier`` gives ``labels`` for digits ``images`` (B, 1, 8, 8) in [-1, 1]."""
    log_probs = torch.log_softmax(classifier(images.clamp(-1.0, 1.0)), dim=-1)  # (B, 10)
    return log_probs.gather(1, labels.to(log_probs.device)[:, None])[:, 0]
