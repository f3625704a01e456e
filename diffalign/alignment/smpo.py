"""SmPO (Lu et al. 2025, "Smoothed Preference Optimization via ReNoise Inversion", arXiv 2506.02698) as a method.

Pairs (K = 2) with a reward score per candidate. The hard label of Diffusion-DPO becomes a smoothed preference
p = p(x_0 > x_1) computed from the two scores (``losses.smpo_preference``: min-max normalised with a fixed score
range, then a softmax over the pair, as the official ``train.py`` of JaydenLyh/SmPO), and each pair's beta is
scaled by (2p - 1) (``losses.smpo_loss``): a pair the reward cannot tell apart (p = 1/2) teaches nothing, a pair
the reward orders against the stored order trains the other way. The noised latents x_t are not drawn by forward
noising but are the ReNoise/DDIM inversion of each clean candidate by the current policy, so the loss is evaluated
on the policy's own trajectory: ``--smpo_inversion official`` (default) as the official ``train.py`` does it
(``noise.official_inversion_noise``: a fixed grid, stopping at its last point below t), ``uniform`` a DDIM inversion
from 0 to exactly t (``noise.inversion_noise``, ``--smpo_renoise`` fixed-point refinements per step);
``--smpo_noise forward`` uses Diffusion-DPO's shared forward noising instead.

The score range fixes the temperature of p, p = sigmoid((s_0 - s_1) / (max - min)), so it must match the reward's
scale (``SCORE_RANGES``). The official range is PickScore's raw cosine similarity on Pick-a-Pic; diffalign's
``pickscore`` reward multiplies the cosine by CLIP's logit scale 100 (the official PickScore inference), hence the
preset of that name is the official range times 100. For the ``digits`` reward (log p(prompted digit)) the preset
(-1, 0) gives p = sigmoid(log p_0 - log p_1) = p_0 / (p_0 + p_1): the Bradley-Terry probability with the classifier's
probabilities as strengths.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from ..options import option, validate_choices
from .losses import SMPO_PICKSCORE_RANGE, smpo_loss, smpo_preference
from .methods import MethodInputs, PreferenceMethod, register
from .noise import OFFICIAL_INVERSION_STEPS, PROVIDERS, inversion_noise, official_inversion_noise

GROUP = "method smpo (SmPO)"
SCORE_RANGES = {
    "pickscore": (100 * SMPO_PICKSCORE_RANGE[0], 100 * SMPO_PICKSCORE_RANGE[1]),
    "pickscore_cosine": SMPO_PICKSCORE_RANGE,
    "digits": (-1.0, 0.0),
}
"""Named score ranges (min, max) of ``--smpo_score_range``, by the reward that scored the data."""


def parse_score_range(text: str) -> tuple[float, float]:
    """A ``SCORE_RANGES`` name or 'MIN,MAX' -> (min, max) with max > min; a ValueError names the fix otherwise."""
    if text in SCORE_RANGES:
        return SCORE_RANGES[text]
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"smpo_score_range must be one of {sorted(SCORE_RANGES)} or 'MIN,MAX' (two numbers), got {text!r}."
        ) from None
    if not high > low:
        raise ValueError(f"smpo_score_range 'MIN,MAX' needs MAX > MIN, got {text!r}.")
    return low, high


@dataclass
class SmPOOptions:
    """Options of SmPO."""

    smpo_beta: float = option(
        2000.0, "KL strength beta of SmPO before the official x10 scale (official: 2000 SD 1.5, 5000 SDXL)", GROUP
    )
    smpo_beta_scale: float = option(10.0, "constant factor on beta (the official code's 10)", GROUP)
    smpo_score_range: str = option(
        "pickscore",
        f"(min, max) that normalises the reward scores, p = sigmoid((s_0 - s_1) / (max - min)): one of "
        f"{sorted(SCORE_RANGES)} (the reward that scored the data; 'pickscore': diffalign's pickscore reward = "
        "100 x the official cosine range; 'digits': p = p_0 / (p_0 + p_1)) or 'MIN,MAX' (negative: "
        "--smpo_score_range=-2,0)",
        GROUP,
    )
    smpo_noise: Literal["inversion", "forward"] = option(
        "inversion",
        "'inversion': x_t = DDIM inversion of the clean candidate by the current policy (the paper); 'forward': "
        "shared forward noising as Diffusion-DPO",
        GROUP,
    )
    smpo_inversion: Literal["official", "uniform"] = option(
        "official",
        "'official': the official train.py's ReNoise inversion on a fixed grid of --smpo_inversion_steps points "
        "over the schedule, stopping at the last one below t; 'uniform': DDIM inversion in --smpo_inversion_steps "
        "uniform steps from 0 to exactly t, with --smpo_renoise refinements per step",
        GROUP,
    )
    smpo_inversion_steps: int = option(
        OFFICIAL_INVERSION_STEPS,
        "inversion steps: 'official' grid points over the whole schedule (official: 5 SD 1.5, 10 SDXL; "
        "digits-cond with its 2-step sampler: 2); 'uniform' steps from 0 to t",
        GROUP,
    )
    smpo_renoise: int = option(0, "'uniform' only: ReNoise refinements per inversion step (0: plain DDIM)", GROUP)

    def __post_init__(self):
        validate_choices(self)
        if self.smpo_beta <= 0 or self.smpo_beta_scale <= 0:
            raise ValueError(
                f"smpo_beta and smpo_beta_scale must be > 0, got {self.smpo_beta} and {self.smpo_beta_scale}."
            )
        if self.smpo_inversion_steps < 1 or self.smpo_renoise < 0:
            raise ValueError("smpo_inversion_steps must be >= 1 and smpo_renoise >= 0.")
        if self.smpo_renoise and self.smpo_inversion == "official":
            raise ValueError(
                "smpo_renoise applies to --smpo_inversion uniform; the official inversion's ReNoise is fixed (one "
                "averaged refinement per step). Drop --smpo_renoise or pass --smpo_inversion uniform."
            )
        parse_score_range(self.smpo_score_range)


@register
class SmPO(PreferenceMethod):
    """SmPO: pairs with reward scores, a frozen reference, x_t from the policy's DDIM inversion (or forward noise),
    the per-pair beta scaled by (2p - 1) of the smoothed preference p, -log sigmoid link."""

    name = "smpo"
    Options = SmPOOptions
    noise = "inversion"
    needs_reference = True
    display = ("implicit_accuracy", "preference")

    def noise_provider(self):
        options = self.options
        if options.smpo_noise == "forward":
            return PROVIDERS["shared"]
        if options.smpo_inversion == "official":
            return functools.partial(official_inversion_noise, steps=options.smpo_inversion_steps)
        return functools.partial(inversion_noise, steps=options.smpo_inversion_steps, renoise=options.smpo_renoise)

    def preference(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, 2) scores -> (B,) smoothed preference p of candidate 0 over candidate 1."""
        return smpo_preference(scores[:, 0], scores[:, 1], parse_score_range(self.options.smpo_score_range))

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        num_candidates = inputs.policy_errors.shape[1]
        if num_candidates != 2:
            raise ValueError(
                f"SmPO trains on pairs (K = 2) with scores; this batch has K = {num_candidates}. Split K candidates "
                "into pairs (diffalign.alignment.candidate_pairs) or use --method rankdpo."
            )
        if "scores" not in inputs.batch:
            raise ValueError(
                "SmPO needs a reward score per candidate ('scores' in the data); make scored data with "
                "`diffalign pairs`, or add a 'scores' list to each record."
            )
        p = self.preference(inputs.batch["scores"].to(inputs.policy_errors.device))  # (B,)
        beta, scale = self.options.smpo_beta, self.options.smpo_beta_scale
        return smpo_loss(inputs.policy_errors, inputs.reference_errors, p, beta=beta, scale=scale)
