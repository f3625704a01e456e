"""``diffalign ems``: DPM-Solver-v3's empirical model statistics for an embedded model or a diffusers pipeline.

The statistics are saved (safetensors + JSON) into the model's scheduler folder, where
``DPMSolverV3Scheduler.from_pretrained(folder)`` and ``diffalign bench`` find them. Data: the embedded models use
their own (the digits training split; exact draws from the mixture); a pipeline needs a folder of images, encoded
by its VAE when it has one, and for text pipelines the prompts and guidance scale it will be sampled with (the
statistics of a guided model depend on both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..samplers.dpm_solver_v3 import DPMSolverV3Scheduler
from ..samplers.ems import DEFAULT_GRID, DEFAULT_SAMPLES, EMS_FILE, compute_ems
from ..samplers.side_info import model_fingerprint, save_side_info
from .bench_targets import GMM_SCHEDULER_DIR, pipeline_model, schedule_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def ems_inputs(model: str, data: str | None = None, prompts=None, guidance_scale: float = 7.5, device: str = "cpu"):
    """``(model_fn, samples, scheduler_config, out_folder, name, fingerprint, dtype)`` for ``diffalign ems``."""
    if model == "gmm":
        from .gmm import GaussianMixture

        gmm = GaussianMixture.from_digits()
        samples = gmm.sample_data(8192, torch.Generator().manual_seed(0)).reshape(-1, 1, 8, 8)
        gmm.to(device)
        config = schedule_config(gmm.config) | {"prediction_type": "epsilon"}
        fingerprint = model_fingerprint(gmm)
        return (lambda x, t: gmm(x, t).sample), samples, config, GMM_SCHEDULER_DIR, "gmm", fingerprint, torch.float64
    if model == "digits":
        from .digits import ASSETS_DIR, build_scheduler, load_digits_data, load_digits_unet

        unet = load_digits_unet().to(device)
        samples, _ = load_digits_data("train")
        fn = lambda x, t: unet(x, t).sample  # noqa: E731
        folder, config = ASSETS_DIR / "digits" / "scheduler", schedule_config(build_scheduler().config)
        return fn, samples, config, folder, "digits", model_fingerprint(unet), torch.float32
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model).to(device)
    if data is None:
        raise ValueError("a pipeline needs --data FOLDER of images (its training domain) to compute EMS on.")
    unet, vae = pipe.unet, getattr(pipe, "vae", None)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    pixel = tuple(s * (pipe.vae_scale_factor if vae is not None else 1) for s in size)
    images = load_image_folder(data, pixel, 3 if vae is not None else unet.config.in_channels)
    if vae is not None:
        with torch.no_grad():
            chunks = [vae.encode(c.to(device, vae.dtype)).latent_dist.mean for c in images.split(8)]
        samples = torch.cat(chunks).float() * vae.config.scaling_factor
    else:
        samples = images
    fn = pipeline_model(pipe, prompts, guidance_scale)
    folder = Path(model) / "scheduler"
    name = f"{Path(model).name} (guidance {guidance_scale})" if prompts else Path(model).name
    return fn, samples, schedule_config(pipe.scheduler.config), folder, name, model_fingerprint(unet), torch.float32


def run_ems(
    model: str,
    out: str | Path | None = None,
    num_grid: int = DEFAULT_GRID,
    num_samples: int = DEFAULT_SAMPLES,
    batch_size: int = 256,
    seed: int = 0,
    t_start: float | None = None,
    t_end: float = 0.0,
    fd_step: float = 1e-3,
    data: str | None = None,
    prompts=None,
    guidance_scale: float = 7.5,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Compute and save EMS for ``model``; returns the folder written (default: the model's scheduler folder)."""
    fn, samples, config, folder, name, fingerprint, dtype = ems_inputs(model, data, prompts, guidance_scale, device)
    ems = compute_ems(
        fn,
        samples,
        config,
        num_grid=num_grid,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        t_start=t_start,
        t_end=t_end,
        fd_step=fd_step,
        model_name=name,
        fingerprint=fingerprint,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    folder = Path(out) if out is not None else folder
    if not (folder / "scheduler_config.json").is_file():  # a fresh folder: make it loadable by from_pretrained
        DPMSolverV3Scheduler(**config).save_pretrained(folder)
    save_side_info(folder, EMS_FILE, *ems.state())
    return folder
