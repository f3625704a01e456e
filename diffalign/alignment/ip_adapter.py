"""IP-Adapter conditioning for PatchDPO on SD / SDXL: the reference image conditions the UNet.

PatchDPO (Huang et al. 2025, arXiv 2412.03177) trains a personalised generator: IP-Adapter (Ye et al. 2023, arXiv
2308.06721) adds an image projection of the reference image's CLIP embedding as extra tokens of decoupled
cross-attention. Here the adapter is loaded with diffusers' own ``pipeline.load_ip_adapter`` (and its CLIP image
encoder) before the trainer adds LoRA adapters, so the LoRA policy and its reference (adapters disabled, or the
frozen copy) see the same adapter; each record's reference image (candidate 0) is encoded once and conditions all
its K candidates (``Backbone.encode_reference_images``, ``Backbone.unet_kwargs``).
"""

from __future__ import annotations

REFUSED = {
    "cache_dir": "the latent cache holds no reference-image embeddings (and does not record the adapter); drop "
    "--cache_dir",
    "eval_steps": "--eval_steps samples from prompts alone, but the IP-Adapter UNet needs a reference image; drop "
    "--eval_steps and evaluate with pipe(prompt, ip_adapter_image=...)",
}


def check_config(config) -> None:
    """Refuse what the IP-Adapter conditioning does not support (``REFUSED``, and full fine-tuning)."""
    for name, reason in REFUSED.items():
        if getattr(config, name):
            raise ValueError(f"--patchdpo_ip_adapter with --{name}: {reason}.")
    if config.finetune != "lora":
        raise ValueError(
            "--patchdpo_ip_adapter trains LoRA adapters (--finetune lora); add to_k_ip.0,to_v_ip.0 to "
            "--lora_target_modules to adapt the IP-Adapter's own key / value projections too."
        )


def load_ip_adapter(backbone, options) -> None:
    """``pipeline.load_ip_adapter`` with its CLIP image encoder, then ``set_ip_adapter_scale`` (PatchDPO options)."""
    if backbone.kind not in ("sd", "sdxl"):
        raise ValueError(
            f"--patchdpo_ip_adapter needs a Stable Diffusion 1.x/2.x or SDXL pipeline; {backbone.kind!r} has no "
            "image-conditioned attention. Drop the option for this model."
        )
    pipeline = backbone.pipeline
    pipeline.load_ip_adapter(
        options.patchdpo_ip_adapter,
        subfolder=options.patchdpo_ip_adapter_subfolder,
        weight_name=options.patchdpo_ip_adapter_weight_name,
        image_encoder_folder=options.patchdpo_image_encoder,
    )
    if pipeline.image_encoder is None or pipeline.feature_extractor is None:
        raise ValueError(
            f"no CLIP image encoder was loaded with {options.patchdpo_ip_adapter}; set --patchdpo_image_encoder to "
            "its folder (a name inside --patchdpo_ip_adapter_subfolder, or a path such as models/image_encoder)."
        )
    pipeline.set_ip_adapter_scale(options.patchdpo_ip_adapter_scale)
