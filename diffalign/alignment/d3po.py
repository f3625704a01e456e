"""D3PO (Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model", CVPR 2024):
the pieces of the method that are not the loss (``losses.d3po_loss``) or the trainer's rollout hook.

D3PO treats denoising as a multi-step MDP: K >= 2 trajectories are sampled per prompt from one x_T with stochastic
DDIM (eta 1, 20 steps, guidance 5 in the official ``config/base.py``), the final images are compared (by a reward
model or by a person), and every step (x_t -> x_{t-1}) of the preferred trajectory is pushed up against the same
step of the rejected one with a DPO loss on the per-step probability ratios. The ratio's reference is the FROZEN
INITIAL model, as in the official ``scripts/train_d3po.py`` (``ref = copy.deepcopy(pipeline.unet)``), not the
sampling policy: with LoRA the UNet with its adapters disabled, with full fine-tuning the frozen copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..options import option
from .logprob import ddim_step_with_logprob
from .rollout import Rollout

GROUP = "method d3po (D3PO)"


@dataclass
class D3POOptions:
    """Options of D3PO (defaults: the official config/base.py)."""

    d3po_beta: float = option(0.1, "KL strength beta of the per-step DPO loss (official 0.1)", GROUP)
    d3po_clip_range: float = option(
        0.1, "ratios pi_theta / pi_ref clipped to [1 - c, 1 + c] before the log (official train.eps 0.1)", GROUP
    )
    d3po_eta: float = option(1.0, "DDIM eta of the rollouts (> 0: every step has a density; official 1)", GROUP)
    d3po_num_steps: int = option(20, "DDIM steps of a rollout (official 20)", GROUP)
    d3po_guidance_scale: float = option(5.0, "classifier-free guidance of the rollouts (official 5)", GROUP)
    d3po_reward: str = option(
        "digits",
        "reward model that ranks the trajectories of a prompt (evaluation.rewards.load_reward name or "
        "'name:path'; 'digits' is the embedded classifier of digits-cond, e.g. 'pickscore' for SD)",
        GROUP,
    )
    d3po_labels: str | None = option(
        None,
        "human labels (labels.jsonl of an export_for_labelling folder): train on those stored trajectories and "
        "choices instead of sampling (with --dataset FOLDER --jsonl_name trajectories.jsonl)",
        GROUP,
    )
    d3po_tie_margin: float = option(
        0.0,
        "reward differences <= this are ties and the prompt is dropped (official: 0, exact equality only; a "
        "saturated reward such as digits' log p ~ 0 needs > 0, or float rounding decides the preference)",
        GROUP,
    )

    def __post_init__(self):
        if self.d3po_tie_margin < 0:
            raise ValueError(f"d3po_tie_margin must be >= 0, got {self.d3po_tie_margin}.")
        if self.d3po_beta <= 0:
            raise ValueError(f"d3po_beta must be > 0, got {self.d3po_beta}.")
        if not 0 < self.d3po_clip_range < 1:
            raise ValueError(f"d3po_clip_range must lie in (0, 1), got {self.d3po_clip_range}.")
        if not self.d3po_eta > 0:
            raise ValueError(f"d3po_eta must be > 0 (eta = 0 is deterministic: no step density), got {self.d3po_eta}.")
        if self.d3po_num_steps < 1:
            raise ValueError(f"d3po_num_steps must be >= 1, got {self.d3po_num_steps}.")


def trajectory_log_probs(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, rollout: Rollout, eta: float
) -> torch.Tensor:
    """log p(x_{t-1} | x_t) under ``model`` of every stored step of every trajectory -> (B, K, T) float32.

    ``model(x (K B, c, h, w), t (K B,))`` is the (guided) policy or reference with the candidates' conditioning
    bound in, candidate-major; ``scheduler`` the rollout's DDIM scheduler (``rollout.sampling_scheduler``). Each
    stored x_{t-1} is scored with ``prev_sample=`` (mean reduction, as the official code); gradients flow through
    the model's mean when ``model`` has them.
    """
    size, num_candidates, num_latents = rollout.latents.shape[:3]
    latents = rollout.latents.transpose(0, 1).flatten(0, 1)  # (K B, T + 1, c, h, w)
    timesteps = rollout.timesteps.transpose(0, 1).flatten(0, 1)  # (K B, T)
    log_probs = []
    for step in range(num_latents - 1):
        x, t = latents[:, step].float(), timesteps[:, step]  # (K B, c, h, w), (K B,)
        output = model(scheduler.scale_model_input(x, t), t)
        _, log_prob = ddim_step_with_logprob(scheduler, output, t, x, eta=eta, prev_sample=latents[:, step + 1])
        log_probs.append(log_prob)  # (K B,)
    return torch.stack(log_probs, 1).unflatten(0, (num_candidates, size)).transpose(0, 1)  # (B, K, T)


def preference_pairs(scores: torch.Tensor, tie_margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) scores -> ((B, 2) candidate indices (best, worst), (B,) True where they are not tied).

    For K = 2 this is the preferred and the rejected trajectory, as ``compare`` of the official
    ``scripts/rm/train_d3po.py`` (the higher reward preferred). Ties give no preference and are dropped by the
    caller: equal scores (the official rule, e.g. a labeller's 'same') and, with ``tie_margin`` > 0, scores at most
    ``tie_margin`` apart. On digits-cond the digits reward log p(digit) of two correct samples differs by ~1e-7
    (float32 rounding of log p ~ 0), so without a margin those pairs are ranked by rounding noise."""
    best, worst = scores.argmax(1), scores.argmin(1)  # (B,), (B,)
    pairs = torch.stack([best, worst], 1)  # (B, 2)
    chosen = scores.gather(1, pairs)  # (B, 2)
    return pairs, chosen[:, 0] - chosen[:, 1] > tie_margin
