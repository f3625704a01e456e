"""The method interface: what a preference method declares and what the trainer hands its loss.

Every method runs in the same trainer loop (``trainer.py``) and differs in four choices (DESIGN.md, alignment): the
candidates and target, the reference, the weighting and the link function. A method is a ``PreferenceMethod``
subclass that declares

- ``name``: its ``--method`` name; ``Options``: a dataclass of its options, declared with ``diffalign.options.option``
  under the method's own ``--help`` group (``TrainConfig`` inherits every registered method's options);
- ``noise``: its noise and timestep provider, ``"shared"`` by the candidates of a prompt, ``"independent"`` per
  candidate, or ``"inversion"`` of the clean candidate by the policy (``noise.py``; ``noise_provider`` binds
  provider options such as the inversion steps);
- ``needs_reference``: whether the trainer runs the reference model (no reference forward otherwise);
- ``online``: whether the trainer calls ``rollout`` before the loss (``rollout.py``);
- ``needs_errors``: whether the trainer noises the candidates and computes the denoising errors (D3PO trains on
  step log-probabilities instead and sets it False);
- ``display``: the metric names the progress bar shows beside the loss;

and implements ``loss(inputs: MethodInputs) -> (loss, metrics)``: the batch (K >= 2 candidates per prompt, stacked
(B, K, ...), with the optional scores, weight maps and labels of ``layout_contract.md``), the timesteps and noise
used and the *unreduced* per-element squared errors of the policy and the reference. The method reduces them (per
candidate, per segment, per patch) with a pure function of ``losses.py``. The metrics dict (scalar tensors) is
logged as it is. Adding a method = a loss in ``losses.py``, a class here, its name in ``METHODS``.

A method whose step does not fit that flow (Diffusion-DRO: online latents taken mid-trajectory of a lagged copy)
sets ``owns_forward`` and implements ``forward(step, batch, epoch)`` on the ``PreferenceStep``'s encoders and UNet
calls; ``prepare_backbone`` lets a method change the loaded model before the LoRA adapters (PatchDPO: an
IP-Adapter); ``attach``, ``after_optimizer_step`` and ``save_final`` let a method keep its own state (a lagged copy,
an EMA) beside the trainer's; ``min_candidates`` is the K it needs (Diffusion-DRO: 1 expert image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ..options import option
from .d3po import D3POOptions, preference_pairs, trajectory_log_probs
from .dro import DROOptions, DROState, dro_forward
from .losses import candidate_errors, d3po_loss, diffusion_dpo_loss
from .noise import PROVIDERS, NoiseRequest
from .rollout import Rollout, RolloutRequest, guided, sample_rollout, sampling_scheduler

NoiseKind = Literal["shared", "independent", "inversion"]


@dataclass
class MethodInputs:
    """What the trainer hands ``PreferenceMethod.loss`` for one micro-batch of B prompts with K candidates each."""

    batch: dict  # the preference batch (layout_contract.md), after --flip_labels and a rollout's scores
    latents: torch.Tensor  # (B, K, c, h, w) clean candidates x_0 in the UNet's input space
    timesteps: torch.Tensor | None  # (B, K); None unless needs_errors
    noise: torch.Tensor | None  # (B, K, c, h, w); None unless needs_errors
    policy_errors: torch.Tensor | None  # (B, K, c, h, w) (model output - target)^2 of the policy, float32, with
    # gradient; None unless needs_errors
    reference_errors: torch.Tensor | None  # (B, K, c, h, w) of the reference; None unless needs_reference
    rollout: Rollout | None = None  # what rollout() returned, for online methods
    policy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # the policy with gradient, as
    # NoiseRequest.unet: (x (K B, c, h, w), t (K B,)) -> output, for losses that need more forwards (log-probs)
    policy_uncond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # online methods: the policy
    # with gradient on the empty prompt (guidance), and the reference (no gradient: LoRA adapters disabled or the
    # frozen copy) on the prompts and on the empty prompt
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    reference_uncond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


class PreferenceMethod:
    """Base class of preference methods (see the module docstring for what a subclass declares)."""

    name: ClassVar[str]
    Options: ClassVar[type]
    noise: ClassVar[NoiseKind] = "shared"
    needs_reference: ClassVar[bool] = True
    online: ClassVar[bool] = False
    needs_errors: ClassVar[bool] = True
    display: ClassVar[tuple[str, ...]] = ()
    min_candidates: ClassVar[int] = 2
    owns_forward: ClassVar[bool] = False

    def __init__(self, options):
        self.options = options

    def noise_provider(self) -> Callable[[NoiseRequest], tuple[torch.Tensor, torch.Tensor]]:
        """The provider ``noise`` names; a method overrides this to set provider options (e.g. inversion steps)."""
        return PROVIDERS[self.noise]

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def rollout(self, request: RolloutRequest) -> Rollout:
        """Online methods: sample the policy (contract in ``rollout.py``)."""
        raise NotImplementedError(f"method {self.name!r} is not online; it has no rollout.")

    def forward(self, step, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``owns_forward`` methods: the whole micro-step on a ``PreferenceStep`` -> (loss, metrics)."""
        raise NotImplementedError(f"method {self.name!r} uses the shared forward (loss), not forward().")

    def prepare_backbone(self, backbone, config) -> None:
        """Called once with the loaded backbone and the run's config, before the trainer adds LoRA adapters or copies
        the reference (load what conditions the UNet here, e.g. an IP-Adapter)."""

    def attach(self, accelerator, unet: torch.nn.Module) -> None:
        """Called once with the unwrapped trainable UNet before a resume (register checkpoint hooks here)."""

    def after_optimizer_step(self, global_step: int) -> None:
        """Called after each optimizer step, before the checkpoint of that step."""

    def save_final(self, output_dir: Path, save) -> None:
        """Called on the main process after the trained weights are saved; ``save(folder)`` saves the UNet."""


@dataclass
class DPOOptions:
    """Options of Diffusion-DPO."""

    beta: float = option(
        5000.0, "KL strength beta of Diffusion-DPO (the paper's 5000 for SD 1.5 / SDXL)", "method dpo (Diffusion-DPO)"
    )

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")


class DiffusionDPO(PreferenceMethod):
    """Diffusion-DPO (Wallace et al. 2023): offline pairs (K = 2, candidate 0 preferred), frozen reference, one
    timestep and noise shared by the pair, uniform weights, -log sigmoid link (``losses.diffusion_dpo_loss``)."""

    name = "dpo"
    Options = DPOOptions
    noise = "shared"
    needs_reference = True
    display = ("implicit_accuracy",)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if inputs.policy_errors.shape[1] != 2:
            raise ValueError(
                f"Diffusion-DPO trains on pairs (K = 2 candidates, the preferred first); this batch has K = "
                f"{inputs.policy_errors.shape[1]}. Use a ranking method for K > 2."
            )
        policy_w, policy_l = candidate_errors(inputs.policy_errors).unbind(1)  # (B,), (B,)
        reference_w, reference_l = candidate_errors(inputs.reference_errors).unbind(1)  # (B,), (B,)
        return diffusion_dpo_loss(policy_w, policy_l, reference_w, reference_l, beta=self.options.beta)


class DiffusionDRO(PreferenceMethod):
    """Diffusion-DRO (basiclab/DiffusionDRO): expert images (candidate 0 of each record, K >= 1) against online
    samples of a lagged policy copy (DPM-Solver++), frozen reference, hinge ``losses.dro_loss``, EMA of the policy
    (``dro.py``)."""

    name = "dro"
    Options = DROOptions
    needs_reference = True
    min_candidates = 1
    owns_forward = True
    display = ("diff", "active_fraction")

    def attach(self, accelerator, unet: torch.nn.Module) -> None:
        self.state = DROState(self.options, unet)

        def save_hook(models, weights, output_dir):
            if accelerator.is_main_process:
                self.state.save(output_dir)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(lambda models, input_dir: self.state.load(input_dir))

    def forward(self, step, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dro_forward(step, self.state, self.options, batch, epoch)

    def after_optimizer_step(self, global_step: int) -> None:
        self.state.after_optimizer_step()

    def save_final(self, output_dir: Path, save) -> None:
        if self.state.ema is not None:
            with self.state.ema_weights():
                save(output_dir / "ema")


class D3PO(PreferenceMethod):
    """D3PO (Yang et al., CVPR 2024, ``d3po.py``): online; K trajectories per prompt from one x_T by the current
    policy, ranked by ``--d3po_reward`` or by human choices (``--d3po_labels``, ``labels.py``): best vs worst, ties
    dropped, ``--flip_labels`` reverses them. The per-step loss ``losses.d3po_loss`` on the log-ratios of policy to
    the frozen initial model (LoRA: adapters disabled), both recomputed on the stored steps with the rollout's
    guidance, averaged over the steps and the B prompts (a tied prompt adds 0, so 1 and N processes agree)."""

    name = "d3po"
    Options = D3POOptions
    needs_reference = False  # the reference enters through the step log-probabilities, not denoising errors
    needs_errors = False
    online = True
    display = ("reward", "implicit_accuracy")

    def __init__(self, options):
        super().__init__(options)
        self.reward, self.sampler, self.labelled = None, None, None

    def rollout(self, request: RolloutRequest) -> Rollout:
        options = self.options
        if options.d3po_labels is not None:  # human labels: the stored trajectories, scored by the choices
            from .labels import LabelledTrajectories

            self.labelled = self.labelled or LabelledTrajectories(options.d3po_labels)
            self.sampler = sampling_scheduler(request.scheduler, self.labelled.entries[0]["timesteps"].shape[-1])
            return self.labelled.rollout(request.batch)
        if self.reward is None:
            from ..evaluation.rewards import load_reward

            self.reward = load_reward(options.d3po_reward, device=request.device)
        self.sampler = sampling_scheduler(request.scheduler, options.d3po_num_steps)
        request.reward = self.reward.score
        return sample_rollout(request, options.d3po_num_steps, options.d3po_eta, options.d3po_guidance_scale)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        options, rollout = self.options, inputs.rollout
        scores = inputs.batch["scores"].to(rollout.log_probs.device)  # (B, K)
        pairs, keep = preference_pairs(scores, options.d3po_tie_margin)  # (B, 2), (B,)
        scale = options.d3po_guidance_scale
        policy = guided(inputs.policy, inputs.policy_uncond, scale)
        logp_policy = trajectory_log_probs(policy, self.sampler, rollout, options.d3po_eta)  # (B, K, T)
        with torch.no_grad():
            reference = guided(inputs.reference, inputs.reference_uncond, scale)
            logp_reference = trajectory_log_probs(reference, self.sampler, rollout, options.d3po_eta)  # (B, K, T)
        index = pairs[..., None].expand(-1, -1, logp_policy.shape[2])  # (B, 2, T)
        logp_policy, logp_reference = logp_policy.gather(1, index), logp_reference.gather(1, index)  # (B, 2, T)
        kept = keep if keep.any() else torch.ones_like(keep)  # all tied: a zero loss that still reaches every weight
        loss, metrics = d3po_loss(logp_policy[kept], logp_reference[kept], options.d3po_beta, options.d3po_clip_range)
        loss = loss * keep.float().mean()  # ties add 0 to the mean over the B prompts: the same on any process count
        metrics.update(reward=rollout.rewards.float().mean(), pairs_kept=keep.float().mean())
        return loss, metrics


METHODS: dict[str, type[PreferenceMethod]] = {"dpo": DiffusionDPO, "d3po": D3PO, "dro": DiffusionDRO}
"""Registered preference methods by their ``--method`` name."""


def register(method: type[PreferenceMethod]) -> type[PreferenceMethod]:
    """Class decorator: add ``method`` to ``METHODS`` under its ``name`` (methods in their own modules)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> type[PreferenceMethod]:
    """The method class registered as ``name``; a ValueError lists the registered ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown preference method {name!r}; registered methods: {sorted(METHODS)}.")
    return METHODS[name]


def method_options(method: type[PreferenceMethod], config) -> object:
    """The method's ``Options`` read from the same-named fields of ``config`` (validated by its constructor)."""
    return method.Options(**{f.name: getattr(config, f.name) for f in dataclasses.fields(method.Options)})


def build_method(config) -> PreferenceMethod:
    """The method object ``config.method`` names, with its options from ``config``."""
    method = get_method(config.method)
    return method(method_options(method, config))
