"""The forward half of a training step: a preference batch -> the method's (loss, metrics).

For B prompts with K candidates: encode the candidates (or read them from the latent cache), optionally replace
them by the policy's own samples (online methods' ``rollout``), draw the timesteps and noise from the method's
provider, noise the candidates, run the reference (only if the method needs it) and the policy on the K B stacked
candidates, and hand the unreduced squared errors to ``method.loss``. Candidates are stacked candidate-major
(all candidates 0, then all candidates 1, ...), so that for pairs the UNet sees the (2B) batch "winners first" of
the original Diffusion-DPO code and its numbers reproduce bit for bit.

LoRA uses the same UNet with its adapters disabled as the reference (one UNet in memory); full fine-tuning a
frozen copy.
"""

from __future__ import annotations

import contextlib

import torch

from .losses import squared_errors
from .methods import MethodInputs, PreferenceMethod
from .noise import NoiseRequest
from .rollout import RolloutRequest

CANDIDATE_KEYS = ("pixels", "latents", "time_ids", "weight_maps")
"""Per-candidate tensors (B, K, ...) of the preference batch."""


def stack_candidates(x: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) -> (K B, ...), candidate-major."""
    return x.transpose(0, 1).flatten(0, 1)


def unstack_candidates(x: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """(K B, ...) -> (B, K, ...), the inverse of ``stack_candidates``."""
    return x.unflatten(0, (num_candidates, -1)).transpose(0, 1)


def flip_preferences(batch: dict) -> dict:
    """``--flip_labels``: the preference inverted. The candidate order is reversed (pairs: the rejected one first;
    segment labels, which refer to candidate 0, then point the other way) and scores are negated."""
    flipped = {key: value.flip(1) if key in CANDIDATE_KEYS else value for key, value in batch.items()}
    if "scores" in batch:
        flipped["scores"] = -batch["scores"].flip(1)
    return flipped


@contextlib.contextmanager
def adapters_disabled(unet):
    """The LoRA UNet as its frozen base model inside the block; adapters enabled again however the block exits."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def decode_latents(backbone, latents: torch.Tensor) -> torch.Tensor:
    """(N, c, h, w) UNet inputs -> (N, C, H, W) images in [0, 1] (VAE decode, or the pixels themselves)."""
    vae = backbone.vae
    if vae is not None:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents / vae.config.scaling_factor + shift
        latents = vae.decode(latents.to(vae.device, vae.dtype)).sample.float()
    return ((latents + 1) / 2).clamp(0, 1)


class PreferenceStep:
    """batch -> (loss, metrics) for one method on one accelerator (``reference`` None: LoRA adapters disabled)."""

    def __init__(self, config, method: PreferenceMethod, backbone, unet, reference, accelerator, weight_dtype):
        self.config, self.method, self.backbone, self.unet = config, method, backbone, unet
        self.reference, self.accelerator, self.weight_dtype = reference, accelerator, weight_dtype
        self.replay = None  # online methods: the trainer's ReplayBuffer of this process

    def encode(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clean candidates (B, K, c, h, w) in the UNet's input space and the prompts' conditioning (B, ...)."""
        device, backbone = self.accelerator.device, self.backbone
        if "latents" in batch:  # from the cache
            latents, cond = batch["latents"], batch["cond"]
        else:
            pixels = batch["pixels"]  # (B, K, C, H, W)
            latents = unstack_candidates(backbone.encode_images(stack_candidates(pixels).to(device)), pixels.shape[1])
            cond = backbone.encode_prompts(batch["prompt"], device)
            if backbone.image_conditioned:  # IP-Adapter: candidate 0 is the record's reference image
                cond["image_embeds"] = backbone.encode_reference_images(pixels[:, 0], device)  # (B, 1, ...)
        return latents.to(device).float(), {k: v.to(device) for k, v in cond.items()}

    def unet_kwargs(self, cond: dict, time_ids: torch.Tensor) -> dict:
        """UNet keyword arguments for the K B stacked candidates: the prompt's conditioning repeated K times."""
        num_candidates = time_ids.shape[1]
        cond = {k: v.repeat(num_candidates, *[1] * (v.ndim - 1)) for k, v in cond.items()}
        time_ids = stack_candidates(time_ids).to(self.accelerator.device)  # (K B, 6)
        return self.backbone.unet_kwargs(cond, time_ids, self.weight_dtype)

    def policy(self, kwargs: dict, grad: bool):
        """The policy as ``(x (K B, c, h, w), t (K B,)) -> output``: the prepared UNet, or unwrapped without grad."""
        unet = self.unet if grad else self.accelerator.unwrap_model(self.unet)

        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.set_grad_enabled(grad), self.accelerator.autocast():
                return unet(x, t, **kwargs).sample

        return call

    def reference_output(self, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict) -> torch.Tensor:
        with torch.no_grad(), self.accelerator.autocast():
            if self.reference is not None:
                return self.reference(noisy.to(self.weight_dtype), timesteps, **kwargs).sample
            with adapters_disabled(self.accelerator.unwrap_model(self.unet)) as base:
                return base(noisy.to(self.weight_dtype), timesteps, **kwargs).sample

    def reference_call(self, kwargs: dict):
        """The reference as ``(x, t) -> output`` without gradient: the frozen copy, or the UNet without adapters."""

        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.reference_output(x, t, kwargs)

        return call

    def unconditional_kwargs(self, batch: dict, num_candidates: int) -> dict:
        """UNet keyword arguments of the empty prompt for the K B candidates (classifier-free guidance)."""
        empty = self.backbone.encode_prompts([""] * len(batch["prompt"]), self.accelerator.device)
        return self.unet_kwargs(empty, batch["time_ids"][:, :num_candidates])

    def rollout(self, batch: dict, latents: torch.Tensor, kwargs: dict, uncond_kwargs: dict, epoch: int):
        request = RolloutRequest(
            batch=batch,
            latent_shape=tuple(latents.shape),
            unet=self.policy(kwargs, grad=False),
            scheduler=self.backbone.noise_scheduler,
            decode=lambda x: decode_latents(self.backbone, x),
            epoch=epoch,
            seed=self.config.seed,
            unconditional=self.policy(uncond_kwargs, grad=False),
            device=self.accelerator.device,
        )
        rollout = self.method.rollout(request)
        if self.replay is not None:
            self.replay.add(rollout, list(batch["prompt"]), batch["index"], epoch)
        scores = -rollout.rewards if self.config.flip_labels else rollout.rewards  # (B, K) --flip_labels: reversed
        return rollout, dict(batch, scores=scores), rollout.latents[:, :, -1].to(latents)

    def __call__(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = flip_preferences(batch) if self.config.flip_labels else batch
        num_candidates = batch["time_ids"].shape[1]
        if num_candidates < self.method.min_candidates:
            raise ValueError(
                f"method {self.method.name!r} needs K >= {self.method.min_candidates} candidates per record; this "
                f"dataset has K = {num_candidates}. Use pair or ranked data for it."
            )
        if self.method.owns_forward:
            return self.method.forward(self, batch, epoch)
        latents, cond = self.encode(batch)  # (B, K, c, h, w), (B, ...)
        kwargs, rollout, online = self.unet_kwargs(cond, batch["time_ids"]), None, {}
        if self.method.online:
            uncond_kwargs = self.unconditional_kwargs(batch, latents.shape[1])
            rollout, batch, latents = self.rollout(batch, latents, kwargs, uncond_kwargs, epoch)
            online = dict(
                policy_uncond=self.policy(uncond_kwargs, grad=True),
                reference=self.reference_call(kwargs),
                reference_uncond=self.reference_call(uncond_kwargs),
            )
        policy = self.policy(kwargs, grad=True)
        inputs = MethodInputs(batch, latents, None, None, None, None, rollout, policy, **online)
        if self.method.needs_errors:
            self.denoising_errors(inputs, kwargs, epoch)
        return self.method.loss(inputs)

    def denoising_errors(self, inputs: MethodInputs, kwargs: dict, epoch: int) -> None:
        """Fill ``inputs`` with the method's timesteps and noise and the (B, K, c, h, w) squared errors of the
        policy (with gradient) and of the reference (if the method needs it)."""
        batch, latents, scheduler = inputs.batch, inputs.latents, self.backbone.noise_scheduler
        request = NoiseRequest(latents, batch["index"], epoch, self.config.seed, scheduler, self.policy(kwargs, False))
        timesteps, noise = self.method.noise_provider()(request)  # (B, K), (B, K, c, h, w)
        x0, eps, t = stack_candidates(latents), stack_candidates(noise), stack_candidates(timesteps)  # (K B, ...)
        noisy, target = scheduler.add_noise(x0, eps, t), self.backbone.target(x0, eps, t)
        num_candidates = latents.shape[1]
        if self.method.needs_reference:
            reference_errors = squared_errors(self.reference_output(noisy, t, kwargs), target)
            inputs.reference_errors = unstack_candidates(reference_errors, num_candidates)  # (B, K, c, h, w)
        policy_output = inputs.policy(noisy, t)  # (K B, c, h, w)
        inputs.timesteps, inputs.noise = timesteps, noise
        inputs.policy_errors = unstack_candidates(squared_errors(policy_output, target), num_candidates)
