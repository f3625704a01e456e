"""``load_model(name_or_path)``: an embedded model by name or a diffusers pipeline, as one ``ModelSpec`` record.

The record is what ``diffalign bench``, ``ems`` and ``calibrate`` need from a model: the bare ``model(x, t)`` (with
classifier-free guidance inside it for conditional models, exactly as the pipeline's own loop calls the UNet), the
noise schedule, the shape it denoises (pixels for ``UNet2DModel`` pipelines, latents for SD / SDXL), the decoder to
images, data in its input space, and the folder of its scheduler's learned side information.

Embedded names: ``gmm`` (the analytic Gaussian mixture of the digits; exact eps), ``digits`` (small UNet) and
``digits-cond`` (class-conditional UNet; prompts name digits, by default the batch cycles through 0..9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..samplers import MODEL_KEYS
from ..samplers.side_info import model_fingerprint
from .adapters import GuidedUNet, plain_unet

EMBEDDED = ("gmm", "digits", "digits-cond")
DEFAULT_GUIDANCE = 7.5
"""Classifier-free guidance scale of text pipelines unless one is given (SD's usual value)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ModelSpec:
    """A loaded model as every job sees it.

    ``model(x, t)``: (B, *sample_shape) -> the network's raw output, guided at ``guidance_scale`` for conditional
    models; ``with_guidance(s)`` gives the same model at another scale. ``data()``: (K, *sample_shape) data samples
    in the model's input space (VAE latents for latent pipelines), or None when there are none.
    """

    name: str
    network: torch.nn.Module  # what ``model`` calls: the GaussianMixture or the UNet (fingerprinted)
    model: Callable
    scheduler_config: dict  # the model keys of its scheduler config: noise schedule and prediction type
    sample_shape: tuple[int, ...]  # (C, H, W)
    dtype: torch.dtype  # the network's dtype
    guided: Callable[[float], Callable] | None = None  # guidance scale -> model(x, t); None: unconditional
    guidance_scale: float | None = None
    prompts: list[str] | None = None
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None  # the VAE's decode; None: samples are images
    data: Callable[[], torch.Tensor] | None = None
    period: int = 1  # the fixed conditioning repeats every ``period`` batch rows; data row k matches row k % period
    scheduler_dir: Path | None = None  # scheduler config + learned side information (EMS, DC ratios), if local

    @property
    def fingerprint(self) -> str:
        """Identity of the weights that side information computed on this model records."""
        return model_fingerprint(self.network)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples (B, *sample_shape) -> float images in [-1, 1] (through the VAE of latent pipelines)."""
        return samples.float() if self.decoder is None else self.decoder(samples)

    def with_guidance(self, guidance_scale: float) -> Callable:
        """``model(x, t)`` at classifier-free guidance ``guidance_scale`` (1.0 only for unconditional models)."""
        if self.guided is not None:
            return self.guided(guidance_scale)
        if guidance_scale != 1.0:
            raise ValueError(f"{self.name} is unconditional: use guidance_scale 1.0, got {guidance_scale}.")
        return self.model


def schedule_config(config) -> dict:
    """The model keys (noise schedule, prediction type) of a scheduler config, shared by every sampler of a model."""
    return {k: v for k, v in dict(config).items() if k in MODEL_KEYS}


def load_model(
    name_or_path: str,
    prompts: list[str] | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    device: str | torch.device = "cpu",
    attention: str | None = None,
    data: str | Path | None = None,
) -> ModelSpec:
    """An embedded model by name (``EMBEDDED``), else a diffusers pipeline folder or hub id; weights frozen.

    ``prompts`` and ``guidance_scale`` condition text pipelines (required there) and ``digits-cond``; ``attention``
    names a ``diffalign.kernels`` backend set on the UNet (not for ``gmm``); ``data``: a folder of images from a
    pipeline's domain, read and VAE-encoded when ``spec.data()`` is called.
    """
    if name_or_path == "gmm":
        if attention is not None:
            raise ValueError(f"--attention {attention} needs a UNet; the analytic 'gmm' model has no attention.")
        return _gmm_spec(device)
    if name_or_path in ("digits", "digits-cond"):
        return _digits_spec(name_or_path, prompts, guidance_scale, device, attention)
    return _pipeline_spec(name_or_path, prompts, guidance_scale, device, attention, data)


def _gmm_spec(device) -> ModelSpec:
    from .gmm import GMM_SCHEDULER_DIR, GaussianMixture

    gmm = GaussianMixture.from_digits().to(device)
    return ModelSpec(
        name="gmm",
        network=gmm,
        model=lambda x, t: gmm(x.double(), t).sample,  # exact eps in float64
        scheduler_config=schedule_config(gmm.config) | {"prediction_type": "epsilon"},
        sample_shape=(1, 8, 8),
        dtype=torch.float64,
        data=lambda: (
            GaussianMixture.from_digits().sample_data(8192, torch.Generator().manual_seed(0)).reshape(-1, 1, 8, 8)
        ),
        scheduler_dir=GMM_SCHEDULER_DIR,
    )


def _digits_spec(name: str, prompts, guidance_scale: float, device, attention: str | None) -> ModelSpec:
    from .digits import (
        ASSETS_DIR,
        NUM_CLASSES,
        build_scheduler,
        load_digits_data,
        load_digits_pipeline,
        load_digits_unet,
    )

    guided, data = None, lambda: load_digits_data("train")[0]
    if name == "digits":
        unet = load_digits_unet().to(device).requires_grad_(False)
    else:
        pipe = load_digits_pipeline(conditional=True).to(device)
        unet, encoder = pipe.unet.requires_grad_(False), pipe.text_encoder.requires_grad_(False)
        guided = lambda g: GuidedUNet.for_digits(unet, encoder, g, prompts)  # noqa: E731
        classes = encoder.tokenize(prompts).cpu() if prompts else torch.arange(NUM_CLASSES)  # (P,)
        data = lambda: _class_cycled(*load_digits_data("train"), classes)  # noqa: E731
    _set_attention(unet, attention)
    return ModelSpec(
        name=name,
        network=unet,
        model=plain_unet(unet) if guided is None else guided(guidance_scale),
        scheduler_config=schedule_config(build_scheduler().config),
        sample_shape=_sample_shape(unet),
        dtype=unet.dtype,
        guided=guided,
        guidance_scale=None if guided is None else guidance_scale,
        prompts=None if guided is None else prompts,
        data=data,
        period=1 if guided is None else len(classes),
        scheduler_dir=ASSETS_DIR / name / "scheduler",
    )


def _class_cycled(images: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(n P, C, H, W) images whose row k is of class ``classes[k % P]``, as many per class as the rarest has: the
    data that digits-cond's fixed conditioning (prompt ``k % P`` on batch row k) describes."""
    members = [images[labels == c] for c in classes.tolist()]  # P x (N_c, C, H, W)
    if any(len(m) == 0 for m in members):
        raise ValueError(f"no training image of class {classes.tolist()}: prompts must name digits 0-9.")
    n = min(len(m) for m in members)
    return torch.stack([m[:n] for m in members], dim=1).flatten(0, 1)  # (n P, C, H, W)


def _pipeline_spec(name_or_path: str, prompts, guidance_scale: float, device, attention, data) -> ModelSpec:
    """UNet2DModel pipelines, SD 1.x / 2.x and SDXL from a folder saved with ``save_pretrained`` or a hub id."""
    from diffusers import DiffusionPipeline

    folder = Path(name_or_path)
    if folder.exists() and not (folder / "model_index.json").exists():
        raise ValueError(f"{name_or_path} has no model_index.json; pass a folder saved with save_pretrained.")
    pipe = DiffusionPipeline.from_pretrained(name_or_path).to(device)
    _set_attention(pipe, attention)
    unet = pipe.unet.requires_grad_(False)
    guided = None
    if hasattr(pipe, "encode_prompt"):
        if not prompts:
            raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass --prompts with one or more prompts.")
        guided = lambda g: GuidedUNet.for_prompts(pipe, prompts, g)  # noqa: E731
    return ModelSpec(
        name=folder.name or str(name_or_path),
        network=unet,
        model=plain_unet(unet) if guided is None else guided(guidance_scale),
        scheduler_config=schedule_config(pipe.scheduler.config),
        sample_shape=_sample_shape(unet),
        dtype=unet.dtype,
        guided=guided,
        guidance_scale=None if guided is None else guidance_scale,
        prompts=None if guided is None else prompts,
        decoder=_vae_decoder(getattr(pipe, "vae", None)),
        data=None if data is None else lambda: _encoded_images(pipe, data),
        scheduler_dir=folder / "scheduler" if (folder / "scheduler").is_dir() else None,
    )


def _set_attention(model, attention: str | None) -> None:
    if attention is not None:
        from .. import kernels

        kernels.set_attention_backend(model, attention)


def _sample_shape(unet) -> tuple[int, ...]:
    size = unet.config.sample_size
    return (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))


def _vae_decoder(vae) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents -> images in [-1, 1] through the VAE (chunks of 8); None for pixel-space pipelines."""
    if vae is None:
        return None
    return lambda z: torch.cat(
        [vae.decode(c.to(vae.dtype) / vae.config.scaling_factor).sample for c in z.split(8)]
    ).float()


def _encoded_images(pipe, folder: str | Path) -> torch.Tensor:
    """The images of ``folder`` at the pipeline's resolution, VAE-encoded (latent mean x scaling) when it has one."""
    unet, vae = pipe.unet, getattr(pipe, "vae", None)
    size = _sample_shape(unet)[1:]
    pixel = tuple(s * (pipe.vae_scale_factor if vae is not None else 1) for s in size)
    images = load_image_folder(folder, pixel, 3 if vae is not None else unet.config.in_channels)
    if vae is None:
        return images
    with torch.no_grad():
        chunks = [vae.encode(c.to(unet.device, vae.dtype)).latent_dist.mean for c in images.split(8)]
    return torch.cat(chunks).float() * vae.config.scaling_factor


def load_image_folder(folder: str | Path, size: tuple[int, int], channels: int, limit: int | None = None):
    """Images of ``folder`` as (K, C, H, W) in [-1, 1], resized to ``size``; unreadable files are skipped, counted."""
    from PIL import Image, UnidentifiedImageError

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    images, bad = [], 0
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize(size[::-1], Image.BICUBIC)
                images.append(torch.from_numpy(np.asarray(im, dtype=np.float32)))
        except (OSError, UnidentifiedImageError):
            bad += 1
    if not images:
        raise ValueError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) in {folder} ({bad} unreadable).")
    if bad:
        print(f"skipped {bad} unreadable image(s) in {folder}")
    x = torch.stack(images) / 127.5 - 1.0  # (K, H, W) or (K, H, W, 3)
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
