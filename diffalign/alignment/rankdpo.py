"""RankDPO (Karthik et al. 2024, "Scalable Ranked Preference Optimization for Text-to-Image Generation", arXiv
2410.18013) as a method.

K >= 2 candidates per prompt with a reward score each share one timestep and one noise; every ordered pair (i above
j) contributes a Diffusion-DPO term on the implicit rewards -(L_theta - L_ref), weighted by the change in DCG when i
and j swap places (``losses.rankdpo_loss`` / ``rankdpo_weights``: gains 2^phi - 1, discounts log2(1 + position)).
The gains take phi in [0, 1]: by default the Syn-Pic preference scores of the paper (Alg. 1, ``losses.synpic_scores``:
the fraction of the other K - 1 candidates each one beats under the reward), so any reward scale works and flipping
the preference (negated scores) reverses the ranking; ``--rankdpo_gain scores`` uses the stored scores as phi (they
should then lie in [0, 1]). Records without scores (pairs, Pick-a-Pic) are ranked by their stored order, best
first (``layout_contract.md``); on pairs the loss is then Diffusion-DPO's (normalised weights, one pair weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..options import option, validate_choices
from .losses import rankdpo_loss, synpic_scores
from .methods import MethodInputs, PreferenceMethod, register

GROUP = "method rankdpo (RankDPO)"


@dataclass
class RankDPOOptions:
    """Options of RankDPO."""

    rankdpo_beta: float = option(
        5000.0, "KL strength beta of each pairwise term (the same meaning as Diffusion-DPO's --beta)", GROUP
    )
    rankdpo_gain: Literal["synpic", "scores"] = option(
        "synpic",
        "phi of the DCG gains 2^phi - 1: 'synpic' = fraction of the other candidates each one beats under the reward "
        "(the paper's Syn-Pic scores, any reward scale); 'scores' = the stored scores themselves (in [0, 1])",
        GROUP,
    )
    rankdpo_ranking: Literal["predicted", "labels"] = option(
        "predicted",
        "positions of the DCG discounts: 'predicted' = ranking by the current implicit rewards (Fig. 2, LambdaRank); "
        "'labels' = ranking by phi (Alg. 2)",
        GROUP,
    )
    rankdpo_normalize: bool = option(
        True,
        "divide each prompt's pair weights by their sum (every prompt counts once; K = 2 is Diffusion-DPO); false: "
        "the paper's raw weighted sum",
        GROUP,
    )
    rankdpo_tie_margin: float = option(
        0.0,
        "'synpic' gains: a candidate beats another only when its reward is higher by more than this (0: any strict "
        "difference, Alg. 1); > 0 for a saturated reward (digits' log p ~ 0), whose near-ties differ by rounding",
        GROUP,
    )

    def __post_init__(self):
        validate_choices(self)
        if self.rankdpo_beta <= 0:
            raise ValueError(f"rankdpo_beta must be > 0, got {self.rankdpo_beta}.")
        if self.rankdpo_tie_margin < 0:
            raise ValueError(f"rankdpo_tie_margin must be >= 0, got {self.rankdpo_tie_margin}.")


def stored_order_scores(batch_size: int, num_candidates: int) -> torch.Tensor:
    """Scores (B, K) of records without scores: the stored order is the preference order, best first."""
    return -torch.arange(float(num_candidates)).expand(batch_size, num_candidates)


@register
class RankDPO(PreferenceMethod):
    """RankDPO: K ranked candidates sharing t and eps, a frozen reference, DCG-weighted pairwise -log sigmoid terms."""

    name = "rankdpo"
    Options = RankDPOOptions
    noise = "shared"
    needs_reference = True
    display = ("implicit_accuracy", "pair_weight")

    def gains(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K) reward scores -> (B, K) phi of the DCG gains (``--rankdpo_gain``)."""
        if self.options.rankdpo_gain == "synpic":
            return synpic_scores(scores, self.options.rankdpo_tie_margin)
        return scores.float()

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        size, num_candidates = inputs.policy_errors.shape[:2]
        scores = inputs.batch.get("scores")
        scores = stored_order_scores(size, num_candidates) if scores is None else scores
        phi = self.gains(scores.to(inputs.policy_errors.device))  # (B, K)
        options = self.options
        return rankdpo_loss(
            inputs.policy_errors,
            inputs.reference_errors,
            phi,
            beta=options.rankdpo_beta,
            ranking=options.rankdpo_ranking,
            normalize=options.rankdpo_normalize,
        )
