"""The models ``diffalign bench`` runs on: the embedded ``gmm`` and ``digits``, or a diffusers folder / hub id.

A diffusers pipeline is benchmarked in its UNet's input space (pixels for ``UNet2DModel`` pipelines, latents for
SD / SDXL) with classifier-free guidance inside the model function, exactly as its own loop would call it; the
reference is an adaptive dopri5 solve of the same guided probability-flow ODE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..samplers import MODEL_KEYS
from ..samplers.schedule import NoiseScheduleVP
from .benchmark import BenchTarget
from .gmm import GaussianMixture
from .reference import probability_flow_solution, timestep_eps_fn

EMBEDDED = ("gmm", "digits")
GMM_SCHEDULER_DIR = Path(__file__).resolve().parent.parent / "assets" / "gmm" / "scheduler"
"""The embedded mixture's scheduler folder: its schedule config and learned side information (EMS, DC ratios)."""
LEARNED_MODEL_RTOL = 1e-5  # dopri5 tolerance of the reference solution for learned models


def schedule_config(config) -> dict:
    """The model keys (noise schedule, prediction type) of a scheduler config, shared by every benchmarked sampler."""
    return {k: v for k, v in dict(config).items() if k in MODEL_KEYS}


def gmm_target() -> BenchTarget:
    """The analytic digits mixture: exact eps, reference solution to 1e-10, no FD (it has no learned features)."""
    gmm = GaussianMixture.from_digits()
    return BenchTarget(
        name="gmm",
        model=lambda x, t: gmm(x.double(), t).sample,
        scheduler_config=schedule_config(gmm.config) | {"prediction_type": "epsilon"},
        sample_shape=(1, 8, 8),
        reference=lambda x_T, rho_T: gmm.reference_solution(x_T, rho_T, 0.0),
        side_info=GMM_SCHEDULER_DIR,
    )


def reference_for(model, scheduler_config: dict, rtol: float):
    schedule = NoiseScheduleVP.from_config(scheduler_config)
    eps_fn = timestep_eps_fn(model, schedule, scheduler_config.get("prediction_type", "epsilon"))
    return lambda x_T, rho_T: probability_flow_solution(eps_fn, x_T, rho_T, 0.0, rtol, rtol)


def pipeline_target(
    name_or_path: str,
    prompts: list[str] | None = None,
    guidance_scale: float = 7.5,
    device: str = "cpu",
    reference_rtol: float = LEARNED_MODEL_RTOL,
    inception_weights: str | None = None,
    fid_stats: str | None = None,
    attention: str | None = None,
) -> BenchTarget:
    """A diffusers pipeline from a local folder or hub id: UNet2DModel pipelines, SD 1.x / 2.x, SDXL.

    With ``inception_weights`` and ``fid_stats`` the samples (decoded by the VAE for latent pipelines) are scored by
    real FID (``inception.py``). ``attention`` names a ``diffalign.kernels`` backend to set on the pipeline.
    """
    from diffusers import DiffusionPipeline

    if Path(name_or_path).exists() and not (Path(name_or_path) / "model_index.json").exists():
        raise ValueError(f"{name_or_path} has no model_index.json; pass a folder saved with save_pretrained.")
    pipe = DiffusionPipeline.from_pretrained(name_or_path).to(device)
    if attention is not None:
        from ..kernels import set_attention_backend

        set_attention_backend(pipe, attention)
    unet, config = pipe.unet, schedule_config(pipe.scheduler.config)
    size = unet.config.sample_size
    shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    name = Path(name_or_path).name or str(name_or_path)
    model = pipeline_model(pipe, prompts, guidance_scale)
    target = BenchTarget(name, model, config, shape, reference_for(model, config, reference_rtol), dtype=unet.dtype)
    if inception_weights is not None or fid_stats is not None:
        if inception_weights is None or fid_stats is None:
            raise ValueError("--fid inception needs both --inception-weights PATH and --fid-stats PATH.npz.")
        from .inception import inception_fid_fn

        target.fd = inception_fid_fn(inception_weights, fid_stats, _decoder(pipe))
        target.fd_name = "FID (Inception)"
    return target


def pipeline_model(pipe, prompts: list[str] | None, guidance_scale: float):
    """``model(x, t)`` of a pipeline's UNet: guided by ``prompts`` for text pipelines (``GuidedUNet``), plain else."""
    if hasattr(pipe, "encode_prompt"):
        if not prompts:
            raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass --prompts with one or more prompts.")
        return GuidedUNet(pipe, prompts, guidance_scale)
    unet = pipe.unet
    return lambda x, t: unet(x.to(unet.dtype), t).sample.to(x.dtype)


def _decoder(pipe):
    """Samples -> images in [-1, 1]: the VAE for latent pipelines, identity for pixel-space ones."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return lambda x: x.float()
    return lambda z: torch.cat(
        [vae.decode(c.to(vae.dtype) / vae.config.scaling_factor).sample for c in z.split(8)]
    ).float()


class GuidedUNet:
    """``model(x, t)`` with classifier-free guidance for SD / SDXL; prompts repeat cyclically over the batch."""

    def __init__(self, pipe, prompts: list[str], guidance_scale: float):
        self.unet, self.guidance_scale = pipe.unet, guidance_scale
        device = pipe.unet.device
        encoded = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        self.added = None
        if len(encoded) == 4:  # SDXL: (embeds, negative embeds, pooled, negative pooled)
            cond, uncond, pooled, uncond_pooled = encoded
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            proj_dim = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), cond.dtype, proj_dim).to(device)
            self.added = (torch.cat([uncond_pooled, pooled]), time_ids)
        else:  # SD 1.x / 2.x: (embeds, negative embeds)
            cond, uncond = encoded
        self.embeds = torch.cat([uncond, cond])  # (2P, L, D): unconditional half first

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        B, P = x.shape[0], self.embeds.shape[0] // 2
        index = torch.arange(B) % P
        embeds = torch.cat([self.embeds[:P][index], self.embeds[P:][index]])  # (2B, L, D)
        kwargs = {}
        if self.added is not None:
            pooled, time_ids = self.added
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat([pooled[:P][index], pooled[P:][index]]),
                "time_ids": time_ids.repeat(2 * B, 1),
            }
        x_in = torch.cat([x, x]).to(self.unet.dtype)
        t = torch.as_tensor(t, device=x.device)
        t_in = torch.cat([t, t]) if t.ndim == 1 and len(t) == B > 1 else t  # per-sample times: both halves
        out = self.unet(x_in, t_in, encoder_hidden_states=embeds, **kwargs).sample
        uncond, cond = out.chunk(2)
        return (uncond + self.guidance_scale * (cond - uncond)).to(x.dtype)


def load_target(name_or_path: str, attention: str | None = None, **pipeline_kwargs) -> BenchTarget:
    """An embedded model by name, else a diffusers pipeline folder or hub id (``pipeline_target``'s keywords).

    ``attention``: a ``diffalign.kernels`` backend name set on the model's attention layers (not for ``gmm``).
    """
    if name_or_path == "gmm":
        if attention is not None:
            raise ValueError(f"--attention {attention} needs a UNet; the analytic 'gmm' model has no attention.")
        return gmm_target()
    if name_or_path == "digits":
        from .digits_bench import digits_target

        return digits_target(attention=attention)
    return pipeline_target(name_or_path, attention=attention, **pipeline_kwargs)
