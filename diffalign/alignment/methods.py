"""Preference methods as small objects: what batch each needs and which loss it applies.

Every method runs in the same trainer loop (``trainer.py``) and differs in four choices (DESIGN.md, alignment): the
candidates and target, the reference, the weighting and the link function. A method object names the batch layout
it consumes and maps the per-sample denoising errors of the policy and the reference to a loss and metrics with a
pure function from ``losses.py``. Adding D3PO, SmPO or RankDPO means adding one object here and one loss there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import diffusion_dpo_loss


@dataclass(frozen=True)
class DiffusionDPO:
    """Diffusion-DPO (Wallace et al. 2023): offline pairs, frozen reference, uniform weights, -log sigmoid link.

    Batch layout ``"pairs"``: the trainer stacks the preferred samples first and the rejected ones second,
    (2B, C, H, W), with one timestep and one noise per pair shared by both halves.
    """

    name: str = "dpo"
    batch: str = "pairs"
    needs_reference: bool = True

    def loss(
        self, policy_errors: torch.Tensor, reference_errors: torch.Tensor, config
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(2B,) policy and reference errors, winners first -> (loss, metrics)."""
        policy_w, policy_l = policy_errors.chunk(2)  # (B,), (B,)
        reference_w, reference_l = reference_errors.chunk(2)  # (B,), (B,)
        return diffusion_dpo_loss(policy_w, policy_l, reference_w, reference_l, beta=config.beta)


METHODS = {"dpo": DiffusionDPO()}
"""Registered preference methods by their ``--method`` name."""


def get_method(name: str):
    """The method registered as ``name``; a ValueError lists the registered ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown preference method {name!r}; registered methods: {sorted(METHODS)}.")
    return METHODS[name]
