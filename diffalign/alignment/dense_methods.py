"""The dense preference methods: DenseDPO (per temporal segment of video pairs) and PatchDPO (per image patch).

Registered in ``methods.METHODS`` on import (``config.py`` imports this module for the options). Both reduce the
trainer's unreduced per-element squared errors below the candidate level (``losses.py``):

- ``DenseDPO`` (Wu et al. 2025, arXiv 2506.03517): video pairs (K = 2) made from one clean clip corrupted and
  denoised twice (``dense_pairs.py``), labels (B, S) in {+1, -1, 0} per temporal segment, one Diffusion-DPO term per
  labelled segment over the latent frames the segment covers (``losses.densedpo_loss``), ties skipped, frozen
  reference, one timestep and noise per pair (as Diffusion-DPO, so the segment errors are comparable).
- ``PatchDPO`` (Huang et al. 2025, arXiv 2412.03177): candidate 0 the reference image, candidates k >= 1 generated
  images, per-patch quality maps q_k in [0, 1] (``patch_quality.py``) as the batch's ``weight_maps``, loss the
  patch-weighted denoising MSE of ``losses.patchdpo_loss`` (no reference model, no sigmoid, as the official code).
  The official code draws one noise and timestep per image; here the candidates of a record share them (a choice:
  the loss is a sum of per-image terms, so the sharing changes only the variance). On SD / SDXL with
  ``--patchdpo_ip_adapter`` every candidate is conditioned on the record's reference image (``ip_adapter.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from .ip_adapter import check_config, load_ip_adapter
from .losses import densedpo_loss, patchdpo_loss
from .methods import METHODS, MethodInputs, PreferenceMethod


@dataclass
class DenseDPOOptions:
    """Options of DenseDPO."""

    densedpo_beta: float = option(
        5000.0, "KL strength beta of each segment's DPO term (Diffusion-DPO's scale)", "method densedpo (DenseDPO)"
    )

    def __post_init__(self):
        if self.densedpo_beta <= 0:
            raise ValueError(f"densedpo_beta must be > 0, got {self.densedpo_beta}.")


class DenseDPO(PreferenceMethod):
    """DenseDPO: per-segment Diffusion-DPO terms over motion-aligned video pairs (module docstring)."""

    name = "densedpo"
    Options = DenseDPOOptions
    noise = "shared"
    needs_reference = True
    display = ("implicit_accuracy", "labelled_fraction")

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "labels" not in inputs.batch:
            raise ValueError(
                "DenseDPO needs per-segment labels (a 'labels' list per record, +1 / -1 / 0); make pairs with "
                "diffalign.alignment.dense_pairs.make_clip_pairs or add labels to the JSONL."
            )
        if inputs.policy_errors.ndim != 6:
            raise ValueError(
                "DenseDPO trains a video UNet on clips (B, K, c, F, h, w); got errors "
                f"{tuple(inputs.policy_errors.shape)} (images?). Use --pretrained_model_name_or_path digits-clips "
                "or a UNet3DConditionModel pipeline."
            )
        labels = inputs.batch["labels"].to(inputs.policy_errors.device)  # (B, S)
        return densedpo_loss(inputs.policy_errors, inputs.reference_errors, labels, beta=self.options.densedpo_beta)


PATCHDPO_GROUP = "method patchdpo (PatchDPO)"


@dataclass
class PatchDPOOptions:
    """Options of PatchDPO: the IP-Adapter that conditions SD / SDXL on the reference image (its loss has no free
    parameter: the weights are the data's quality maps)."""

    patchdpo_ip_adapter: str | None = option(
        None,
        "IP-Adapter (hub id or folder, e.g. h94/IP-Adapter) loaded with pipe.load_ip_adapter before LoRA: every "
        "candidate is denoised conditioned on its record's reference image (candidate 0); SD / SDXL only",
        PATCHDPO_GROUP,
    )
    patchdpo_ip_adapter_subfolder: str = option(
        "models",
        "subfolder of the IP-Adapter weights (h94/IP-Adapter: models for SD 1.5, sdxl_models)",
        PATCHDPO_GROUP,
    )
    patchdpo_ip_adapter_weight_name: str = option(
        "ip-adapter_sd15.safetensors", "IP-Adapter weight file, e.g. ip-adapter_sdxl.safetensors", PATCHDPO_GROUP
    )
    patchdpo_image_encoder: str = option(
        "image_encoder",
        "CLIP image encoder folder: a name inside the subfolder, or a path inside the IP-Adapter repo / folder "
        "(e.g. models/image_encoder for the ViT-H SDXL adapters)",
        PATCHDPO_GROUP,
    )
    patchdpo_ip_adapter_scale: float = option(1.0, "IP-Adapter scale (pipe.set_ip_adapter_scale)", PATCHDPO_GROUP)

    def __post_init__(self):
        if self.patchdpo_ip_adapter_scale < 0:
            raise ValueError(f"patchdpo_ip_adapter_scale must be >= 0, got {self.patchdpo_ip_adapter_scale}.")


class PatchDPO(PreferenceMethod):
    """PatchDPO: patch-quality-weighted denoising loss on a reference image and generated images (module docstring)."""

    name = "patchdpo"
    Options = PatchDPOOptions
    noise = "shared"
    needs_reference = False
    display = ("generated_weight",)

    def prepare_backbone(self, backbone, config) -> None:
        if self.options.patchdpo_ip_adapter is not None:  # before LoRA: policy and reference share the adapter
            check_config(config)
            load_ip_adapter(backbone, self.options)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "weight_maps" not in inputs.batch:
            raise ValueError(
                "PatchDPO needs per-candidate patch quality maps ('weight_maps' per record, the reference image "
                "first); compute them with diffalign.alignment.patch_quality.write_quality_maps."
            )
        weight_maps = inputs.batch["weight_maps"].to(inputs.policy_errors.device)  # (B, K, 1, H, W)
        return patchdpo_loss(inputs.policy_errors, weight_maps)


METHODS.update({DenseDPO.name: DenseDPO, PatchDPO.name: PatchDPO})
