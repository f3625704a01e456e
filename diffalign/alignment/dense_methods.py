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
  the loss is a sum of per-image terms, so the sharing changes only the variance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
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


@dataclass
class PatchDPOOptions:
    """Options of PatchDPO (its loss has no free parameter: the weights are the data's quality maps)."""


class PatchDPO(PreferenceMethod):
    """PatchDPO: patch-quality-weighted denoising loss on a reference image and generated images (module docstring)."""

    name = "patchdpo"
    Options = PatchDPOOptions
    noise = "shared"
    needs_reference = False
    display = ("generated_weight",)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "weight_maps" not in inputs.batch:
            raise ValueError(
                "PatchDPO needs per-candidate patch quality maps ('weight_maps' per record, the reference image "
                "first); compute them with diffalign.alignment.patch_quality.write_quality_maps."
            )
        weight_maps = inputs.batch["weight_maps"].to(inputs.policy_errors.device)  # (B, K, 1, H, W)
        return patchdpo_loss(inputs.policy_errors, weight_maps)


METHODS.update({DenseDPO.name: DenseDPO, PatchDPO.name: PatchDPO})
