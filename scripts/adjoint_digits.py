"""AdjointDPM uses on the embedded ``digits-cond`` model (Pan et al., ICLR 2024, Sec. 4): optimise the starting
noise, and fine-tune LoRA weights, so that samples score higher under the digits classifier for the prompted digit.

Both differentiate ``log p_classifier(digit | x_0)`` through the whole DPM-Solver++ chain with ``adjoint_sample``.
The scripts ``adjoint_optimize_noise.py`` and ``adjoint_lora_finetune.py`` beside this file call these; the tests
import this file by path (``tests/scripts/test_adjoint_digits.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.models.adapters import GuidedUNet
from diffalign.models.digits import NULL_LABEL, DigitsPromptEncoder, load_digits_classifier, load_digits_pipeline
from diffalign.samplers import AdjointDPMScheduler, adjoint_sample

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
"""LoRA targets in the digits-cond UNet: the mid block's cross-attention projections and every ResNet conv."""


@dataclass
class DigitsSetup:
    """The pieces both demos need: model callable, prompt embeddings, scheduler and classifier."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    classifier: torch.nn.Module
    scheduler: AdjointDPMScheduler
    guidance_scale: float | None

    def model(self):
        return GuidedUNet(self.unet, guidance_scale=self.guidance_scale)

    def cond(self, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return digits_prompt_embeddings(self.text_encoder, labels, guidance=self.guidance_scale is not None)

    @torch.no_grad()
    def score(self, x_T: torch.Tensor, labels: torch.Tensor, nfe: int) -> dict[str, float]:
        """Of the samples from x_T: mean log-probability (the reward) and probability of the prompted digit under the
        classifier, and the fraction classified as it."""
        x_0 = adjoint_sample(self.model(), x_T, self.scheduler, nfe, cond=self.cond(labels), params=[])
        log_p = classifier_log_prob(self.classifier, x_0, labels)
        hits = self.classifier(x_0.clamp(-1, 1)).argmax(-1) == labels
        return {
            "log_prob": float(log_p.mean()),
            "prob": float(log_p.exp().mean()),
            "accuracy": float(hits.float().mean()),
        }


def digits_setup(guidance_scale: float | None = 0.3) -> DigitsSetup:
    """Shipped digits-cond UNet and prompt encoder (frozen), classifier, and the ``adjoint_dpm`` scheduler (2M).

    The default weak guidance (0.3, below 1: between the unconditional and the conditional model) draws the prompted
    digit about 30-45% of the time (NFE 10), which leaves the demos room to improve; at the usual 2.0 it is ~100%.
    """
    pipe = load_digits_pipeline(conditional=True)
    for module in (pipe.unet, pipe.text_encoder):
        module.requires_grad_(False).eval()
    scheduler = AdjointDPMScheduler.from_config(pipe.scheduler.config)
    classifier = load_digits_classifier().requires_grad_(False)
    return DigitsSetup(pipe.unet, pipe.text_encoder, classifier, scheduler, guidance_scale)


def draw(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` starting noises (n, 1, 8, 8) and prompted digits (n,) from one seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def optimize_noise(
    setup: DigitsSetup, x_T: torch.Tensor, labels: torch.Tensor, steps: int = 20, nfe: int = 10, lr: float = 0.1
) -> torch.Tensor:
    """Gradient ascent on ``log p(label | x_0(x_T))`` over x_T (B, 1, 8, 8), AdjointDPM's noise optimisation.

    Adam steps; after each, every x_T is rescaled to its starting norm so that it stays a typical Gaussian draw
    (the norm constraint of the paper's guided-generation example). Returns the optimised x_T.
    """
    model, cond = setup.model(), setup.cond(labels)
    radius = x_T.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x_T = x_T.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_T], lr=lr)
    for _ in range(steps):
        x_0 = adjoint_sample(model, x_T, setup.scheduler, nfe, cond=cond, params=[])
        loss = -classifier_log_prob(setup.classifier, x_0, labels).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x_T.mul_(radius / x_T.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1))
    return x_T.detach()


def add_lora(unet: torch.nn.Module, rank: int = 4, alpha: float = 4.0) -> list[torch.nn.Parameter]:
    """Attach a peft LoRA adapter (``LORA_TARGETS``) to the frozen ``unet``; returns its trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    )
    return [p for p in unet.parameters() if p.requires_grad]


def finetune_lora(
    setup: DigitsSetup,
    params: list[torch.nn.Parameter],
    iterations: int = 30,
    batch: int = 16,
    nfe: int = 10,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Reward fine-tuning through the adjoint: maximise ``log p(label | x_0)`` over LoRA ``params``.

    Each iteration draws a fresh batch of noises and prompts (seeds ``seed``, ``seed + 1``, ...), samples with
    ``nfe`` DPM-Solver++ steps, and takes one Adam step on the adjoint gradient. Returns the mean reward per
    iteration.
    """
    model = setup.model()
    optimizer = torch.optim.Adam(params, lr=lr)
    rewards = []
    for it in range(iterations):
        x_T, labels = draw(batch, seed + it)
        x_0 = adjoint_sample(model, x_T, setup.scheduler, nfe, cond=setup.cond(labels), params=params)
        reward = classifier_log_prob(setup.classifier, x_0, labels)
        optimizer.zero_grad()
        (-reward.mean()).backward()
        optimizer.step()
        rewards.append(float(reward.detach().mean()))
    return rewards


def digits_prompt_embeddings(
    text_encoder: DigitsPromptEncoder, labels: torch.Tensor, guidance: bool = True
) -> torch.Tensor:
    """digits-cond ``encoder_hidden_states`` for digit ``labels`` (B,): (B, 1, D), or (2B, 1, D) with the empty prompt
    first when ``guidance`` (the layout ``GuidedUNet(..., guidance_scale=...)`` expects per call)."""
    labels = labels.to(text_encoder.device)
    if guidance:
        labels = torch.cat([torch.full_like(labels, NULL_LABEL), labels])
    return text_encoder(labels)


def classifier_log_prob(classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability (B,) that ``classifier`` gives ``labels`` for digits ``images`` (B, 1, 8, 8) in [-1, 1]."""
    log_probs = torch.log_softmax(classifier(images.clamp(-1.0, 1.0)), dim=-1)  # (B, 10)
    return log_probs.gather(1, labels.to(log_probs.device)[:, None])[:, 0]
