"""Video backbones for preference training: a diffusers video UNet over (B, C, F, H, W) latents.

The trainer stacks K candidates of a prompt on axis 1 and flattens them with the batch (``step.py``), so a video
batch is ``pixels`` (B, K, C, F, H, W) and every per-candidate tensor simply carries the extra frame axis; the
noise providers, ``add_noise`` and the squared errors are shape-agnostic. What a video UNet needs besides is:

- LoRA: ``UNet3DConditionModel`` lacks diffusers' ``PeftAdapterMixin`` (``add_adapter``, ``disable_adapters``,
  ``load_lora_adapter``, which the trainer and the eval harness use), so ``with_adapters`` rebuilds it as
  ``AdapterUNet3DConditionModel``, the same class with the mixin, with the same config and weights;
- the embedded ``digits-clips`` model (``diffalign.models.clips``): pixel-space clips (no VAE), prompts encoded by
  the digits prompt encoder; a local folder saved from a ``DigitsClipPipeline`` loads the same way;
- latent video pipelines (``VIDEO_PIPELINES``, recognised by the ``_class_name`` of their ``model_index.json``, never
  remote code): ``TextToVideoSDPipeline`` (e.g. ali-vilab/text-to-video-ms-1.7b: image VAE + CLIP text encoder +
  ``UNet3DConditionModel``, loaded straight into ``AdapterUNet3DConditionModel``) and ``AnimateDiffPipeline``
  (``UNetMotionModel``, which has the mixin already). Clips are encoded frame by frame through the image VAE
  (``encode_frames``); prompts through the CLIP text encoder as in Stable Diffusion (``UNetMotionModel`` wants one
  prompt state per frame: ``repeat_prompt_per_frame``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    ModelMixin,  # noqa: F401  (a saved pipeline names this module for its UNet; diffusers looks the base class up here)
    UNet3DConditionModel,
)
from diffusers.loaders.peft import PeftAdapterMixin

from ..models.clips import DigitsClipPipeline, load_digits_clip_pipeline

EMBEDDED_CLIPS_MODEL = "digits-clips"
VIDEO_PIPELINES = ("TextToVideoSDPipeline", "AnimateDiffPipeline")
"""diffusers latent video pipelines the trainer takes (``model_index.json`` ``_class_name``)."""
VAE_CHUNK = 16
"""Frames encoded by the VAE per call (bounds the encoder's activation memory on long clips)."""


class AdapterUNet3DConditionModel(UNet3DConditionModel, PeftAdapterMixin):
    """``UNet3DConditionModel`` with diffusers' PEFT adapter methods (LoRA training, loading and disabling)."""


def with_adapters(unet: UNet3DConditionModel) -> AdapterUNet3DConditionModel:
    """The same UNet (config, weights in float32, train / eval mode) as an ``AdapterUNet3DConditionModel``; returned
    as is if it already is one. The mode matters: ``UNet3DConditionModel``'s temporal convolutions have dropout 0.1,
    so a UNet left in training mode samples differently from the same noise every time."""
    if isinstance(unet, PeftAdapterMixin):
        return unet
    adapted = AdapterUNet3DConditionModel.from_config(unet.config)
    adapted.load_state_dict(unet.state_dict())
    return adapted.to(unet.device).train(unet.training)


def is_digits_clips(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is the embedded ``digits-clips`` or a folder saved from a ``DigitsClipPipeline``."""
    if name_or_path == EMBEDDED_CLIPS_MODEL:
        return True
    index = Path(name_or_path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == DigitsClipPipeline.__name__


def load_digits_clips(name_or_path: str) -> DigitsClipPipeline:
    """The ``digits-clips`` pipeline (embedded, or saved at ``name_or_path``) with an adapter-capable UNet."""
    pipeline = load_digits_clip_pipeline(None if name_or_path == EMBEDDED_CLIPS_MODEL else name_or_path)
    pipeline.unet = with_adapters(pipeline.unet)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def without_adapters(unet: torch.nn.Module) -> torch.nn.Module:
    """An ``AdapterUNet3DConditionModel`` as a plain ``UNet3DConditionModel`` (same config and weights), so that a
    saved pipeline names only diffusers classes; any other UNet is returned as is."""
    if type(unet) is not AdapterUNet3DConditionModel:
        return unet
    plain = UNet3DConditionModel.from_config(unet.config)
    plain.load_state_dict(unet.state_dict())
    return plain


def video_pipeline_class(name_or_path: str, revision: str | None = None) -> str | None:
    """The pipeline class named by the ``model_index.json`` of ``name_or_path`` if it is one of ``VIDEO_PIPELINES``."""
    name = DiffusionPipeline.load_config(name_or_path, revision=revision).get("_class_name")
    return name if name in VIDEO_PIPELINES else None


def load_video_pipeline(name_or_path: str, revision: str | None = None, variant: str | None = None):
    """A ``TextToVideoSDPipeline`` or ``AnimateDiffPipeline`` (hub id or folder) in float32 whose UNet takes PEFT
    adapters: ``pipe.load_lora_weights(folder)`` then loads a LoRA saved by ``diffalign train``.

    A stock ``TextToVideoSDPipeline`` cannot: its ``UNet3DConditionModel`` has no ``load_lora_adapter`` in diffusers
    0.42, so the UNet is loaded as ``AdapterUNet3DConditionModel`` (same weights) and handed to ``from_pretrained``.
    """
    kwargs = dict(revision=revision, variant=variant)
    if video_pipeline_class(name_or_path, revision) == "TextToVideoSDPipeline":
        kwargs["unet"] = AdapterUNet3DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kwargs)
    pipeline = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def repeat_prompt_per_frame(unet, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a ``UNetMotionModel``: prompt states (N, L, D) of N clips (N, c, F, h, w) -> (N F, L, D),
    the layout ``AnimateDiffPipeline`` passes (``prompt_embeds.repeat_interleave(num_frames)``), so that the trainer
    gives every video UNet one state per clip. States already per frame (N F != N) pass unchanged."""
    sample = args[0] if args else kwargs["sample"]  # (N, c, F, h, w)
    states = kwargs.get("encoder_hidden_states")
    if states is not None and states.shape[0] == sample.shape[0]:
        kwargs["encoder_hidden_states"] = states.repeat_interleave(sample.shape[2], dim=0)  # (N F, L, D)
    return args, kwargs


def check_clips(pixels: torch.Tensor, vae, unet) -> None:
    """Raise a ValueError naming the fix if clips (N, C, F, H, W) do not fit the image VAE and the video UNet."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if pixels.ndim != 5 or pixels.shape[1] != vae.config.in_channels:
        raise ValueError(
            f"clips must be (C, F, H, W) arrays with C = {vae.config.in_channels} (the VAE's input channels) in "
            f"[-1, 1]; got a batch of shape {tuple(pixels.shape)}. Save each clip channels first."
        )
    frames, height, width = pixels.shape[2:]
    if height % scale or width % scale:
        raise ValueError(
            f"clip frames of {height}x{width} do not fit the VAE: height and width must be multiples of its "
            f"downsampling factor {scale}. Resize or crop the clips (e.g. to {(height // scale or 1) * scale}x"
            f"{(width // scale or 1) * scale})."
        )
    max_frames = getattr(unet.config, "motion_max_seq_length", None)  # AnimateDiff: positional table length
    if max_frames is not None and frames > max_frames:
        raise ValueError(
            f"clips have {frames} frames; this UNet's motion modules take at most motion_max_seq_length = "
            f"{max_frames}. Use clips of at most {max_frames} frames."
        )


def encode_frames(encode_images, pixels: torch.Tensor) -> torch.Tensor:
    """Clips (N, C, F, H, W) -> (N, c, F, h, w): ``encode_images`` ((M, C, H, W) -> (M, c, h, w), the backbone's
    image encoder: scaled VAE latents, as ``TextToVideoSDPipeline.decode_latents`` expects) on the frames as images,
    ``VAE_CHUNK`` at a time."""
    num_clips, frames = pixels.shape[0], pixels.shape[2]
    images = pixels.transpose(1, 2).flatten(0, 1)  # (N F, C, H, W)
    latents = torch.cat([encode_images(chunk) for chunk in images.split(VAE_CHUNK)])  # (N F, c, h, w)
    return latents.unflatten(0, (num_clips, frames)).transpose(1, 2)  # (N, c, F, h, w)
