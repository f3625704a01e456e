"""Model adapters: a network as the bare ``model(x, t[, cond])`` that samplers, benchmarks and AdjointDPM call.

``GuidedUNet`` is the one classifier-free-guidance wrapper (Ho & Salimans 2022): SD / SDXL prompts (``for_prompts``),
the digits-cond label table (``for_digits``) and per-call conditioning (AdjointDPM) all go through it.
``model_output`` unwraps diffusers' output objects to the raw tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..samplers import model_output
from .digits import NULL_LABEL, NUM_CLASSES

__all__ = ["GuidedUNet", "model_output", "plain_unet"]


def plain_unet(unet) -> Callable:
    """``model(x, t)`` of an unconditional UNet: input cast to the UNet's dtype, output to the sample's."""
    return lambda x, t: unet(x.to(unet.dtype), t).sample.to(x.dtype)


class GuidedUNet:
    """``model(x, t[, cond])`` of a conditional UNet with classifier-free guidance, ``eps_u + s (eps_c - eps_u)``.

    Both branches run in one UNet call on ``[x; x]`` with the unconditional embeddings first, as diffusers pipelines
    stack them. The conditioning is either fixed at construction (``embeds`` (2P, L, D): P unconditional then P
    conditional rows; sample ``i`` of a batch gets prompt ``i % P``, and SDXL's pooled ``text_embeds`` (2P, D) and
    ``time_ids`` (1, 6) alike) or given per call as ``cond`` (2B, L, D), through which AdjointDPM differentiates.
    ``guidance_scale=None``: no guidance, ``cond`` (B, L, D) goes to the UNet as is. ``unet_kwargs`` go to every call.
    """

    def __init__(
        self,
        unet,
        guidance_scale: float | None = None,
        embeds: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        **unet_kwargs,
    ):
        if embeds is not None and guidance_scale is None:
            raise ValueError("fixed prompt embeddings need a guidance_scale (1.0: the conditional model alone).")
        self.unet, self.guidance_scale, self.unet_kwargs = unet, guidance_scale, unet_kwargs
        self.embeds, self.text_embeds, self.time_ids = embeds, text_embeds, time_ids

    @classmethod
    def for_prompts(cls, pipe, prompts: list[str], guidance_scale: float) -> GuidedUNet:
        """SD 1.x / 2.x / SDXL: ``prompts`` encoded once (empty negative prompt), cycled over each batch."""
        device = pipe.unet.device
        encoded = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        if len(encoded) == 4:  # SDXL: (embeds, negative embeds, pooled, negative pooled)
            cond, uncond, pooled, uncond_pooled = encoded
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            proj_dim = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), cond.dtype, proj_dim).to(device)
            pooled = torch.cat([uncond_pooled, pooled])  # (2P, D)
            return cls(pipe.unet, guidance_scale, torch.cat([uncond, cond]), pooled, time_ids)
        cond, uncond = encoded  # SD 1.x / 2.x: (embeds, negative embeds)
        return cls(pipe.unet, guidance_scale, torch.cat([uncond, cond]))  # (2P, L, D)

    @classmethod
    def for_digits(cls, unet, text_encoder, guidance_scale: float, prompts: list[str] | None = None) -> GuidedUNet:
        """digits-cond: batches cycle through ``prompts`` (default: the digits 0..9); the empty prompt is the
        unconditional branch."""
        table = text_encoder(torch.arange(NULL_LABEL + 1, device=text_encoder.device)).detach()  # (11, 1, D)
        labels = text_encoder.tokenize(prompts) if prompts else torch.arange(NUM_CLASSES)  # (P,)
        uncond = table[NULL_LABEL:].expand(len(labels), -1, -1)  # (P, 1, D): row 10 = the empty prompt
        return cls(unet, guidance_scale, torch.cat([uncond, table[labels]]))  # (2P, 1, D)

    def _fixed_conditioning(self, B: int) -> tuple[torch.Tensor, dict]:
        """(2B, L, D) embeddings of prompts ``i % P`` (unconditional half first) and SDXL's added kwargs."""
        P = self.embeds.shape[0] // 2
        index = torch.arange(B) % P  # (B,)
        embeds = torch.cat([self.embeds[:P][index], self.embeds[P:][index]])  # (2B, L, D)
        if self.text_embeds is None:
            return embeds, {}
        pooled = torch.cat([self.text_embeds[:P][index], self.text_embeds[P:][index]])  # (2B, D)
        return embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids.repeat(2 * B, 1)}}

    def __call__(self, x: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:  # x: (B, C, H, W)
        B, kwargs = x.shape[0], dict(self.unet_kwargs)
        if cond is None:
            cond, added = self._fixed_conditioning(B)
            kwargs.update(added)
        if self.guidance_scale is None:
            return self.unet(x.to(self.unet.dtype), t, encoder_hidden_states=cond, **kwargs).sample.to(x.dtype)
        if cond.shape[0] != 2 * B:
            raise ValueError(
                f"with guidance_scale the conditioning must stack [unconditional; conditional] embeddings: expected "
                f"{2 * B} rows for {B} samples, got {cond.shape[0]}."
            )
        t = torch.as_tensor(t, device=x.device)
        t_in = torch.cat([t, t]) if t.ndim == 1 and len(t) == B > 1 else t  # per-sample times: both halves
        out = self.unet(torch.cat([x, x]).to(self.unet.dtype), t_in, encoder_hidden_states=cond, **kwargs).sample
        eps_uncond, eps_cond = out.to(x.dtype).chunk(2)  # (B, C, H, W) each
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
