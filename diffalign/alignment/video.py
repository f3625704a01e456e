"""Video backbones for preference training: a diffusers ``UNet3DConditionModel`` over (B, C, F, H, W) latents.

The trainer stacks K candidates of a prompt on axis 1 and flattens them with the batch (``step.py``), so a video
batch is ``pixels`` (B, K, C, F, H, W) and every per-candidate tensor simply carries the extra frame axis; the
noise providers, ``add_noise`` and the squared errors are shape-agnostic. What a video UNet needs besides is:

- LoRA: ``UNet3DConditionModel`` lacks diffusers' ``PeftAdapterMixin`` (``add_adapter``, ``disable_adapters``,
  ``load_lora_adapter``, which the trainer and the eval harness use), so ``with_adapters`` rebuilds it as
  ``AdapterUNet3DConditionModel``, the same class with the mixin, with the same config and weights;
- the embedded ``digits-clips`` model (``diffalign.models.clips``): pixel-space clips (no VAE), prompts encoded by
  the digits prompt encoder; a local folder saved from a ``DigitsClipPipeline`` loads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import (
    ModelMixin,  # noqa: F401  (a saved pipeline names this module for its UNet; diffusers looks the base class up here)
    UNet3DConditionModel,
)
from diffusers.loaders.peft import PeftAdapterMixin

from ..models.clips import DigitsClipPipeline, load_digits_clip_pipeline

EMBEDDED_CLIPS_MODEL = "digits-clips"


class AdapterUNet3DConditionModel(UNet3DConditionModel, PeftAdapterMixin):
    """``UNet3DConditionModel`` with diffusers' PEFT adapter methods (LoRA training, loading and disabling)."""


def with_adapters(unet: UNet3DConditionModel) -> AdapterUNet3DConditionModel:
    """The same UNet (config and weights, in float32) as an ``AdapterUNet3DConditionModel``; returned as is if it
    already is one."""
    if isinstance(unet, PeftAdapterMixin):
        return unet
    adapted = AdapterUNet3DConditionModel.from_config(unet.config)
    adapted.load_state_dict(unet.state_dict())
    return adapted.to(unet.device)


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
