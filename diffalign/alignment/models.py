"""The model side of preference training: one ``Backbone`` over SD 1.x/2.x, SDXL, the embedded ``digits-cond`` and
the video models of ``video.py`` (``digits-clips``; ``TextToVideoSDPipeline`` and ``AnimateDiffPipeline``).

A backbone loads a pipeline and exposes what the trainer needs and nothing else: the UNet to train, the DDPM
training schedule, how to turn images into the UNet's input space (VAE latents, or the images themselves for
pixel-space models with no VAE), how to turn prompts into conditioning tensors, and how to call the UNet with them.
Text conditioning is a dict of per-sample tensors (batch first) so that it can be cached on disk and batched:
SD has ``encoder_hidden_states``; SDXL adds the second encoder's pooled ``text_embeds`` and, per image, the
``time_ids`` (original size, crop top-left, target size). With an IP-Adapter loaded (``ip_adapter.py``) the
conditioning also holds each record's reference-image embedding ``image_embeds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ..models.digits import load_digits_pipeline
from .config import EMBEDDED_MODEL
from .video import (
    check_clips,
    encode_frames,
    is_digits_clips,
    load_digits_clips,
    load_video_pipeline,
    repeat_prompt_per_frame,
    video_pipeline_class,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Backbone:
    """A loaded pipeline seen as (UNet, training schedule, image encoder, prompt encoder)."""

    kind: str  # "digits" (pixel space, no VAE), "sd", "sdxl", "digits-clips" (video, pixel space) or "video" (VAE)
    pipeline: object
    noise_scheduler: DDPMScheduler
    image_channels: int
    resolution: int

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return getattr(self.pipeline, "vae", None)

    @property
    def is_video(self) -> bool:
        """Whether the UNet takes clips (B, c, F, h, w) and the data are clip pairs (``dense_pairs.py``)."""
        return self.kind in ("digits-clips", "video")

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The encoders that never train (VAE, text encoders, an IP-Adapter's image encoder) by component name."""
        names = ("vae", "text_encoder", "text_encoder_2", "image_encoder")
        return {n: getattr(self.pipeline, n) for n in names if getattr(self.pipeline, n, None) is not None}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, c, h, w) UNet inputs: scaled VAE latents (mode), or the images;
        a video backbone's clips (B, C, F, H, W) -> (B, c, F, h, w), each frame encoded as an image
        (``video.encode_frames``)."""
        if self.vae is None:
            return pixels
        if self.kind == "video":
            check_clips(pixels, self.vae, self.unet)
            return encode_frames(self.vae_latents, pixels)
        return self.vae_latents(pixels)

    def vae_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, C, H, W) images in [-1, 1] -> (M, c, h, w) VAE latents (mode), shifted and scaled for the UNet."""
        vae = self.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents.float() - shift) * vae.config.scaling_factor

    @property
    def image_conditioned(self) -> bool:
        """Whether the UNet has an IP-Adapter (``pipeline.load_ip_adapter``) and so needs ``image_embeds``."""
        return self.kind in ("sd", "sdxl") and self.unet.config.encoder_hid_dim_type == "ip_image_proj"

    @torch.no_grad()
    def encode_reference_images(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, C, H, W) reference images in [-1, 1] -> (B, 1, D) CLIP image embeddings of the IP-Adapter (IP-Adapter
        Plus: (B, 1, N, D) penultimate hidden states), as ``pipeline.prepare_ip_adapter_image_embeds`` computes them
        for one image per prompt: the pipeline's CLIP preprocessing, then ``pipeline.encode_image``."""
        from diffusers.models.embeddings import ImageProjection

        images = list(((pixels.float() + 1) / 2).clamp(0, 1).cpu())  # B x (C, H, W) in [0, 1]
        clip_pixels = self.pipeline.feature_extractor(
            images=images, do_rescale=False, return_tensors="pt"
        ).pixel_values
        projection = self.unet.encoder_hid_proj.image_projection_layers[0]
        hidden_states = not isinstance(projection, ImageProjection)
        embeds, _ = self.pipeline.encode_image(clip_pixels, device, 1, hidden_states)  # (B, D) or (B, N, D)
        return embeds.unsqueeze(1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Prompts -> per-sample conditioning tensors, batch first (see the module docstring)."""
        if self.kind in ("digits", "digits-clips"):
            encoder = self.pipeline.text_encoder
            return {"encoder_hidden_states": encoder(encoder.tokenize(prompts).to(device))}  # (B, 1, D)
        if self.kind == "sdxl":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}  # (B, 77, D1 + D2), (B, D2)
        embeds, _ = self.pipeline.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}  # (B, 77, D)

    def unet_kwargs(self, cond: dict[str, torch.Tensor], time_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        """Keyword arguments of ``unet(sample, t, **kwargs)`` for ``cond`` and the SDXL ``time_ids`` (B, 6)."""
        kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype)}
        added = {}
        if self.kind == "sdxl":
            added.update(text_embeds=cond["text_embeds"].to(dtype), time_ids=time_ids.to(dtype))
        if "image_embeds" in cond:  # one IP-Adapter: a list of one (B, 1, ...) tensor
            added["image_embeds"] = [cond["image_embeds"].to(dtype)]
        if added:
            kwargs["added_cond_kwargs"] = added
        return kwargs

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's regression target for its ``prediction_type``: eps, v, or x_0."""
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if prediction_type == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample.")


def load_backbone(name_or_path: str, revision: str | None = None, variant: str | None = None) -> Backbone:
    """Load ``digits-cond`` (embedded), ``digits-clips``, or a diffusers SD / SDXL / video pipeline (hub id or local
    folder) in float32."""
    if name_or_path == EMBEDDED_MODEL:
        pipeline = load_digits_pipeline(conditional=True)
        size = pipeline.unet.config.sample_size
        return Backbone("digits", pipeline, pipeline.scheduler, pipeline.unet.config.in_channels, size)
    if is_digits_clips(name_or_path):  # video: latents (B, C, F, H, W), alignment/video.py
        pipeline = load_digits_clips(name_or_path)
        size = pipeline.unet.config.sample_size
        return Backbone("digits-clips", pipeline, pipeline.scheduler, pipeline.unet.config.in_channels, size)

    from diffusers import DiffusionPipeline

    if Path(name_or_path).exists() and not (Path(name_or_path) / "model_index.json").is_file():
        raise ValueError(f"{name_or_path} has no model_index.json; pass a pipeline folder saved with save_pretrained.")
    if video_pipeline_class(name_or_path, revision) is not None:  # video: latents (B, c, F, h, w), video.py
        pipeline = load_video_pipeline(name_or_path, revision, variant)
        if type(pipeline.unet).__name__ == "UNetMotionModel":  # AnimateDiff: prompt states per frame
            pipeline.unet.register_forward_pre_hook(repeat_prompt_per_frame, with_kwargs=True)
        noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        return Backbone("video", pipeline, noise_scheduler, pipeline.vae.config.in_channels, resolution)
    pipeline = DiffusionPipeline.from_pretrained(name_or_path, revision=revision, variant=variant)
    if getattr(pipeline, "unet", None) is None or getattr(pipeline, "vae", None) is None:
        raise ValueError(
            f"{name_or_path} loaded as {type(pipeline).__name__}, which has no UNet + VAE; diffalign train supports "
            "Stable Diffusion 1.x/2.x, SDXL, TextToVideoSDPipeline and AnimateDiffPipeline pipelines, and the "
            "embedded 'digits-cond' and 'digits-clips'."
        )
    kind = "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd"
    pipeline.set_progress_bar_config(disable=True)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    size = pipeline.unet.config.sample_size
    resolution = (size if isinstance(size, int) else size[0]) * pipeline.vae_scale_factor
    return Backbone(kind, pipeline, noise_scheduler, pipeline.vae.config.in_channels, resolution)
