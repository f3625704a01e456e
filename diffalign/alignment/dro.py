"""Diffusion-DRO (Diffusion Distributionally Robust Optimization, basiclab/DiffusionDRO): expert images against the
online samples of a lagged policy copy, with a hinge on the reference-relative denoising errors.

One micro-step, as ``train.py`` of the official code with its defaults (buffer of one batch, a new batch of
trajectories every micro-step):

1. the expert image x_0 of each record (candidate 0 of the batch: a ``{"prompt", "image"}`` record with K = 1, or
   the preferred image of pair / ranked data) and its prompt c, replaced by the empty prompt with probability
   ``dro_drop_prompt_probability`` (official ``--random_drop_prompt_probability 0.2`` in ``encode_prompt``; the
   buffer stores that embedding, so the online sample and both sides of the loss use it);
2. the lagged copy p_theta samples a trajectory for c with DPM-Solver++ (20 steps, guidance 1) from x_T; one step i
   of it is drawn uniformly per record; the latent x_{t_i} *before* that step, its timestep t_i and the lagged
   copy's model output at (x_{t_i}, t_i) are kept. That is the official buffer's sample: ``train.py`` pushes x_T to
   ``xt`` before calling the pipeline, the ``callback_on_step_end`` then pushes the latent after each step, so
   ``xt`` holds [x_T, after_0, ..., after_{T-1}] (T + 1 entries), and ``commit`` keeps ``stack(...)[:, :T]`` =
   [x_T, after_0, ..., after_{T-2}]: entry i is the latent step i started from, beside that step's ``t`` and
   ``noise_pred``. With ``dro_perturb_timesteps`` (official ``--buffer_perturb_timesteps``, default on) each
   sample has its own grid ``(arange(T) * r).flip(0) + u``, r = 1000 // T, u uniform in [0, r), drawn per sample
   (``perturbed_grids``). Sampling stops at the last step drawn in the batch;
3. the expert image is noised at the same t with fresh noise; the policy and the frozen reference denoise both, the
   expert against its noise and the online latent against the lagged copy's output; ``losses.dro_loss`` takes the
   four per-sample errors.

After each optimizer step the EMA of the trainable weights is updated (diffusers ``EMAModel`` with the official
defaults: decay 0.9999 reached through the warm-up min(decay, (1 + s) / (10 + s))). Every ``dro_refresh_steps``
micro-steps the lagged copy is set to the policy, before the next micro-step samples (official:
``unet_policy.load_state_dict(unet)`` when ``step % buffer_update_steps == 0``, steps counted in micro-steps).
Right after a refresh the policy is the lagged copy, whose own output at x_{t_i} is the online target: the online
error is then 0 and only the expert side has a gradient. The lagged copy and the EMA are tensors of the trainable
parameters (the LoRA weights, or every UNet weight for full fine-tuning); the lagged copy samples by swapping its
tensors into the UNet.

Determinism and resume: x_T, the step i, the expert noise, the grid offset u and the prompt drop come from the
record's generator (``noise.record_generator(seed, epoch, index)``), so a run is the same on 1 or N processes and
after a resume. A checkpoint holds ``dro_state.safetensors`` (lagged copy and EMA shadow weights) and
``dro_state.json`` (micro-step count, EMA step); the buffer is one batch that the next micro-step samples anew, so it
needs no storage.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import option
from ..samplers import DPMSolverPPScheduler
from .losses import denoising_errors, dro_loss
from .noise import record_generator

STATE_NAME = "dro_state.safetensors"
META_NAME = "dro_state.json"
EMA_FOLDER = "ema"


@dataclass
class DROOptions:
    """Options of Diffusion-DRO (defaults: the official ``train.py``)."""

    dro_margin: float = option(1e-3, "hinge margin of Diffusion-DRO", "method dro (Diffusion-DRO)")
    dro_sample_steps: int = option(
        20, "DPM-Solver++ steps of the lagged copy's online samples", "method dro (Diffusion-DRO)"
    )
    dro_refresh_steps: int = option(
        16,
        "copy the policy into the lagged sampling copy every N micro-steps (forward/backward passes, the official "
        "unit: 16 = every optimizer step at its 16 accumulation steps)",
        "method dro (Diffusion-DRO)",
    )
    dro_ema_decay: float = option(
        0.9999,
        "EMA decay of the policy weights (0 = no EMA); the EMA weights are saved in <output_dir>/ema",
        "method dro (Diffusion-DRO)",
    )

    dro_perturb_timesteps: bool = option(
        True,
        "give each online sample its own DPM-Solver++ grid (arange(T) * r).flip(0) + u, r = 1000 // T, u uniform in "
        "[0, r) per sample (official --buffer_perturb_timesteps), so the online timesteps cover every training "
        "timestep; false: the scheduler's grid of dro_sample_steps for every sample",
        "method dro (Diffusion-DRO)",
    )
    dro_drop_prompt_probability: float = option(
        0.2,
        "probability that a record's prompt is replaced by the empty prompt for its online sample and both sides of "
        "the hinge (official --random_drop_prompt_probability)",
        "method dro (Diffusion-DRO)",
    )
    dro_swap_roles: bool = option(
        False,
        "control run: swap the roles of the expert images and the online samples in the hinge (the policy is pulled "
        "to its own samples and pushed away from the experts); the reward should fall",
        "method dro (Diffusion-DRO)",
    )

    def __post_init__(self):
        if self.dro_margin < 0:
            raise ValueError(f"dro_margin must be >= 0, got {self.dro_margin}.")
        if self.dro_sample_steps < 1 or self.dro_refresh_steps < 1:
            raise ValueError("dro_sample_steps and dro_refresh_steps must be >= 1.")
        if not 0 <= self.dro_ema_decay < 1:
            raise ValueError(f"dro_ema_decay must be in [0, 1), got {self.dro_ema_decay}.")
        if not 0 <= self.dro_drop_prompt_probability <= 1:
            raise ValueError(f"dro_drop_prompt_probability must be in [0, 1], got {self.dro_drop_prompt_probability}.")


@dataclass
class RecordDraws:
    """The random draws of one micro-step, each record's from its own generator (in this order)."""

    x_T: torch.Tensor  # (B, c, h, w) initial noise of the online sample
    steps: torch.Tensor  # (B,) the solver step i in [0, num_steps) whose latent is kept
    noise: torch.Tensor  # (B, c, h, w) the expert's noise
    offsets: torch.Tensor  # (B,) grid offset u in [0, step_ratio) of the perturbed grid
    drop: torch.Tensor  # (B,) uniform in [0, 1): the prompt is dropped when below the drop probability


def record_draws(
    index: torch.Tensor, epoch: int, seed: int, shape: tuple[int, ...], num_steps: int, step_ratio: int
) -> RecordDraws:
    """Per record: x_T, the trajectory step, the expert noise, the grid offset and the prompt-drop uniform."""
    draws = []
    for i in index.tolist():
        generator = record_generator(seed + 7_919, epoch, i)  # a stream of its own beside the noise providers'
        draws.append(
            (
                torch.randn(shape, generator=generator),
                torch.randint(0, num_steps, (1,), generator=generator)[0],
                torch.randn(shape, generator=generator),
                torch.randint(0, step_ratio, (1,), generator=generator)[0],
                torch.rand((), generator=generator),
            )
        )
    return RecordDraws(*(torch.stack(column) for column in zip(*draws, strict=True)))


def step_ratio(num_train_timesteps: int, num_steps: int) -> int:
    """The official grid spacing r = num_train_timesteps // num_steps of the perturbed grids."""
    if num_steps > num_train_timesteps:
        raise ValueError(
            f"dro_sample_steps={num_steps} exceeds the {num_train_timesteps} training timesteps; lower it."
        )
    return num_train_timesteps // num_steps


def perturbed_grids(offsets: torch.Tensor, num_steps: int, ratio: int) -> torch.Tensor:
    """(B,) offsets u -> (B, num_steps) decreasing model timesteps (arange(T) * r).flip(0) + u (official
    ``--buffer_perturb_timesteps``: ``timesteps[:, None] + randint(0, step_ratio, (1, B))``)."""
    return (torch.arange(num_steps) * ratio).flip(0)[None] + offsets[:, None].long()


@torch.no_grad()
def sample_online(
    unet, scheduler_config, x_T: torch.Tensor, steps: torch.Tensor, num_steps: int, grids: torch.Tensor | None = None
):
    """DPM-Solver++(2M) from x_T (B, c, h, w) with ``unet(x, t (B,)) -> output``; for each sample b, at its step
    i = ``steps[b]`` -> (x_{t_i} (B, c, h, w), the latent the step starts from; t_i (B,); the model output at
    (x_{t_i}, t_i) (B, c, h, w)), as the official buffer (module docstring). Stops at the last step needed.

    ``grids`` (B, num_steps): each sample's own model timesteps (``perturbed_grids``), solved on its own noise
    levels by a scheduler of its own; None: the scheduler's grid for ``num_steps``. (The official sample-wise
    DPM-Solver, ``misc/patch.py``, conditions the model on each sample's timesteps but keeps the sigmas that
    ``set_timesteps(timesteps[:, 0])`` built, so every sample steps between the noise levels of sample 0's grid;
    here each latent is at the noise level of its own t, and a record's trajectory does not depend on the others
    in its batch.)"""
    schedulers = []
    for b in range(len(x_T)):
        scheduler = DPMSolverPPScheduler.from_config(scheduler_config)
        if grids is None:
            scheduler.set_timesteps(num_steps)
        else:
            scheduler.set_timesteps(timesteps=grids[b].tolist())
        schedulers.append(scheduler)
    timesteps = torch.stack([scheduler.timesteps for scheduler in schedulers], 1).long()  # (num_steps, B)
    x, kept_x, kept_out = x_T, torch.empty_like(x_T), torch.empty_like(x_T)
    kept_t = torch.zeros(len(x_T), dtype=torch.long, device=x_T.device)
    last = int(steps.max())
    for i in range(last + 1):
        t = timesteps[i].to(x.device)  # (B,)
        output = unet(x, t).float()  # (B, c, h, w)
        here = steps.to(x.device) == i
        kept_x[here], kept_out[here], kept_t[here] = x[here], output[here], t[here]
        if i < last:  # each sample steps on its own scheduler -> (B, c, h, w)
            x = torch.cat([s.step(output[b, None], t[b], x[b, None]).prev_sample for b, s in enumerate(schedulers)])
    return kept_x, kept_t, kept_out


def drop_prompts(cond: dict, empty: dict, drop: torch.Tensor) -> dict:
    """The conditioning (B, ...) with the rows where ``drop`` (B,) is True replaced by the empty prompt's."""
    dropped = dict(cond)
    for key, value in empty.items():
        mask = drop.to(value.device).view(-1, *[1] * (value.ndim - 1))
        dropped[key] = torch.where(mask, value.to(cond[key]), cond[key])
    return dropped


class DROState:
    """The lagged copy and the EMA of the trainable parameters of one UNet, saved with the accelerate state."""

    def __init__(self, options: DROOptions, unet: torch.nn.Module):
        from diffusers.training_utils import EMAModel

        self.options = options
        self.parameters = [p for p in unet.parameters() if p.requires_grad]
        self.lagged = [p.detach().clone() for p in self.parameters]
        self.micro_steps = 0  # forward/backward passes done, the unit of dro_refresh_steps
        self.ema = None
        if options.dro_ema_decay > 0:
            self.ema = EMAModel(self.parameters, decay=options.dro_ema_decay, foreach=True)

    @contextlib.contextmanager
    def lagged_weights(self):
        """The UNet with the lagged copy's weights inside the block (tensors swapped, no copy); restored after."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def swap(self) -> None:
        for parameter, lagged in zip(self.parameters, self.lagged, strict=True):
            parameter.data, lagged.data = lagged.data, parameter.data

    @torch.no_grad()
    def start_micro_step(self) -> None:
        """Refresh the lagged copy when ``dro_refresh_steps`` micro-steps have passed since the last refresh."""
        if self.micro_steps > 0 and self.micro_steps % self.options.dro_refresh_steps == 0:
            for parameter, lagged in zip(self.parameters, self.lagged, strict=True):
                lagged.copy_(parameter.detach())
        self.micro_steps += 1

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.parameters)

    @contextlib.contextmanager
    def ema_weights(self):
        """The UNet with the EMA weights inside the block (the policy's restored after); unchanged without EMA."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        tensors = {f"lagged.{i}": t.detach().contiguous() for i, t in enumerate(self.lagged)}
        meta = {"num_parameters": len(self.parameters), "micro_steps": self.micro_steps, "ema_step": None}
        if self.ema is not None:
            tensors |= {f"ema.{i}": t.detach().contiguous() for i, t in enumerate(self.ema.shadow_params)}
            meta["ema_step"] = self.ema.optimization_step
        save_file(tensors, os.path.join(folder, STATE_NAME))
        Path(folder, META_NAME).write_text(json.dumps(meta))

    @torch.no_grad()
    def load(self, folder: str) -> None:
        from safetensors.torch import load_file

        path = Path(folder, STATE_NAME)
        if not path.is_file():
            raise ValueError(f"checkpoint {folder} has no {STATE_NAME}; it was not written by a Diffusion-DRO run.")
        meta, tensors = json.loads(Path(folder, META_NAME).read_text()), load_file(str(path))
        if meta["num_parameters"] != len(self.parameters) or (meta["ema_step"] is None) != (self.ema is None):
            raise ValueError(
                f"checkpoint {folder} holds a DRO state of {meta['num_parameters']} tensors (EMA: "
                f"{meta['ema_step'] is not None}); this run trains {len(self.parameters)} (EMA: "
                f"{self.ema is not None}). Resume with the same --finetune, LoRA options and --dro_ema_decay."
            )
        for i, lagged in enumerate(self.lagged):
            lagged.copy_(tensors[f"lagged.{i}"])
        self.micro_steps = meta["micro_steps"]
        if self.ema is not None:
            for i, shadow in enumerate(self.ema.shadow_params):
                shadow.copy_(tensors[f"ema.{i}"])
            self.ema.optimization_step = meta["ema_step"]


def expert_only(batch: dict, keys: tuple[str, ...]) -> dict:
    """The batch with candidate 0 (the expert image) of every per-candidate tensor."""
    return {key: value[:, :1] if key in keys else value for key, value in batch.items()}


def dro_forward(step, state: DROState, options: DROOptions, batch: dict, epoch: int):
    """One Diffusion-DRO micro-step on a ``PreferenceStep`` (module docstring) -> (loss, metrics)."""
    from .step import CANDIDATE_KEYS, stack_candidates

    state.start_micro_step()
    batch = expert_only(batch, CANDIDATE_KEYS)
    latents, cond = step.encode(batch)  # (B, 1, c, h, w), (B, ...)
    expert = latents[:, 0]  # (B, c, h, w)
    device, num_steps = expert.device, options.dro_sample_steps
    scheduler = step.backbone.noise_scheduler
    ratio = step_ratio(scheduler.config.num_train_timesteps, num_steps)
    draws = record_draws(batch["index"], epoch, step.config.seed, tuple(expert.shape[1:]), num_steps, ratio)
    drop = draws.drop < options.dro_drop_prompt_probability  # (B,)
    if drop.any():
        cond = drop_prompts(cond, step.backbone.encode_prompts([""] * len(drop), device), drop)
    grids = perturbed_grids(draws.offsets, num_steps, ratio) if options.dro_perturb_timesteps else None
    kwargs = step.unet_kwargs(cond, batch["time_ids"])
    with state.lagged_weights():
        online, t, online_target = sample_online(
            step.policy(kwargs, grad=False), scheduler.config, draws.x_T.to(device), draws.steps, num_steps, grids
        )  # (B, c, h, w), (B,), (B, c, h, w)
    expert_noise = draws.noise.to(device)
    noisy_expert = scheduler.add_noise(expert, expert_noise, t)
    expert_target = step.backbone.target(expert, expert_noise, t)
    # expert and online samples stacked (2 B, ...), expert first, as the official code
    noisy = stack_candidates(torch.stack([noisy_expert, online], 1))
    target = stack_candidates(torch.stack([expert_target, online_target], 1))
    t2 = torch.cat([t, t])
    kwargs2 = step.unet_kwargs(cond, batch["time_ids"].repeat(1, 2, 1))
    reference = denoising_errors(step.reference_output(noisy, t2, kwargs2).float(), target)  # (2 B,)
    policy = denoising_errors(step.policy(kwargs2, grad=True)(noisy, t2).float(), target)  # (2 B,)
    expert_policy, online_policy = policy.chunk(2)
    expert_reference, online_reference = reference.chunk(2)
    if options.dro_swap_roles:  # the control: online samples as the experts, expert images as the online side
        expert_policy, expert_reference, online_policy, online_reference = (
            online_policy,
            online_reference,
            expert_policy,
            expert_reference,
        )
    return dro_loss(expert_policy, expert_reference, online_policy, online_reference, margin=options.dro_margin)
