"""One accelerate training loop shared by every preference method (Diffusion-DPO first).

Per optimizer step: draw pairs, encode them (or read the latent cache), give each pair one timestep and one noise
shared by its preferred and rejected sample, run the reference and the policy on the stacked batch (2B, winners
first), turn their per-sample denoising errors into the method's loss, and step AdamW with gradient accumulation,
clipping and an LR schedule. LoRA trains adapters on the UNet and uses the same UNet with its adapters disabled as
the reference (one UNet in memory); full fine-tuning trains the UNet against a frozen copy.

Reproducibility: the data order is a seeded permutation per epoch, and each pair's timestep and noise are drawn
from a generator seeded by (seed, epoch, pair index). So a run gives the same numbers on 1 or N processes at the
same global batch, and a resumed run continues the same loss curve.

Checkpoints (``checkpoint-<step>``) are accelerate states written to a temporary folder and renamed into place; a
non-finite loss stops the run before the optimizer step, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from .checkpoints import RESUME_KEYS, RunHistory, find_checkpoint, lora_hooks, read_checkpoint, save_checkpoint
from .config import EMBEDDED_MODEL, TrainConfig
from .data import ImageTransform, PreferencePairs, collate_pairs, load_source
from .losses import denoising_errors
from .methods import get_method
from .models import DTYPES, Backbone, load_backbone


@dataclass
class TrainResult:
    """What ``train`` returns: the output folder, one metrics dict per optimizer step, skipped pairs, the UNet."""

    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_pairs: int = 0
    global_step: int = 0
    unet: torch.nn.Module | None = None


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` seeded by (seed, epoch): the same on every process and after a resume.

    The trainer sets ``epoch`` before each pass. There is deliberately no ``set_epoch`` method: accelerate's prepared
    loader calls ``set_epoch(its own iteration count)`` on the sampler each time it is iterated, and that count lags
    behind the trainer's epoch after a ``skip_first_batches`` copy has served the first (or resumed) epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def epoch_batches(accelerator: Accelerator, loader, sampler: EpochShuffleSampler, epoch: int, skip: int):
    """The prepared ``loader``'s batches of ``epoch`` in the order of (seed, epoch), the first ``skip`` left out."""
    sampler.epoch = epoch
    return accelerator.skip_first_batches(loader, skip) if skip else loader


def pair_timesteps_and_noise(
    indices: torch.Tensor, epoch: int, seed: int, shape: tuple[int, ...], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep (B,) and one noise (B, *shape) per pair, from a generator seeded by (seed, epoch, index)."""
    timesteps, noise = [], []
    for index in indices.tolist():
        state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)
        generator = torch.Generator().manual_seed(int(state[0]) >> 1)
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
        noise.append(torch.randn(shape, generator=generator))
    return torch.cat(timesteps), torch.stack(noise)


def _set_attention(unet, name: str) -> None:
    if name == "default":
        return
    try:
        from ..kernels import set_attention_backend
    except ImportError as error:
        raise ValueError(
            f"--attention {name!r} needs diffalign.kernels.set_attention_backend, which could not be imported "
            f"({error}); use --attention default."
        ) from error
    set_attention_backend(unet, name)


def _build_dataset(config: TrainConfig, backbone: Backbone, accelerator: Accelerator):
    dataset_path = config.dataset
    if dataset_path is None:
        if config.pretrained_model_name_or_path != EMBEDDED_MODEL:
            raise ValueError(
                "--dataset is required for diffusers pipelines (a Pick-a-Pic parquet/datasets folder, "
                "a hub id, or a folder with pairs.jsonl)."
            )
        from .digits_pairs import make_digits_pairs

        dataset_path = str(Path(config.output_dir) / "digits_pairs")
        if accelerator.is_main_process and not (Path(dataset_path) / config.jsonl_name).is_file():
            make_digits_pairs(dataset_path, backbone.pipeline, seed=config.seed)
        accelerator.wait_for_everyone()
    resolution = config.resolution or backbone.resolution
    source = load_source(dataset_path, config.dataset_split, config.jsonl_name)
    pairs = PreferencePairs(source, ImageTransform(resolution, backbone.image_channels), config.max_train_samples)
    if config.cache_dir is None:
        return pairs
    from .cache import CachedPairs, build_cache

    meta = dict(model=config.pretrained_model_name_or_path, dataset=dataset_path, resolution=resolution)
    build_cache(pairs, backbone, config.cache_dir, meta, accelerator)
    return CachedPairs(config.cache_dir)


@contextlib.contextmanager
def adapters_disabled(unet):
    """The LoRA UNet as its frozen base model inside the block; adapters enabled again however the block exits."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class _Step:
    """The forward half of a training step: batch -> (loss, metrics) for a method, on one accelerator."""

    def __init__(self, config, method, backbone, unet, reference, accelerator, weight_dtype):
        self.config, self.method, self.backbone, self.unet = config, method, backbone, unet
        self.reference, self.accelerator, self.weight_dtype = reference, accelerator, weight_dtype

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        device, backbone = self.accelerator.device, self.backbone
        if "latents_w" in batch:  # from the cache
            latents_w, latents_l, cond = batch["latents_w"], batch["latents_l"], batch["cond"]
        else:
            latents_w = backbone.encode_images(batch["pixels_w"].to(device))
            latents_l = backbone.encode_images(batch["pixels_l"].to(device))
            cond = backbone.encode_prompts(batch["prompt"], device)
        time_ids_w, time_ids_l = batch["time_ids_w"], batch["time_ids_l"]
        if self.config.flip_labels:
            latents_w, latents_l, time_ids_w, time_ids_l = latents_l, latents_w, time_ids_l, time_ids_w
        cond = {k: v.to(device) for k, v in cond.items()}
        return latents_w.to(device).float(), latents_l.to(device).float(), cond, time_ids_w, time_ids_l

    def __call__(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device, backbone = self.accelerator.device, self.backbone
        latents_w, latents_l, cond, time_ids_w, time_ids_l = self.inputs(batch)  # (B, c, h, w) each
        num_train_timesteps = backbone.noise_scheduler.config.num_train_timesteps
        timesteps, noise = pair_timesteps_and_noise(
            batch["index"], epoch, self.config.seed, tuple(latents_w.shape[1:]), num_train_timesteps
        )
        timesteps, noise = timesteps.to(device).repeat(2), noise.to(device).repeat(2, 1, 1, 1)  # shared by w and l
        latents = torch.cat([latents_w, latents_l])  # (2B, c, h, w) winners first
        noisy = backbone.noise_scheduler.add_noise(latents, noise, timesteps)
        target = backbone.target(latents, noise, timesteps)
        cond = {k: torch.cat([v, v]) for k, v in cond.items()}
        time_ids = torch.cat([time_ids_w, time_ids_l]).to(device)  # (2B, 6)
        kwargs = backbone.unet_kwargs(cond, time_ids, self.weight_dtype)
        with torch.no_grad(), self.accelerator.autocast():
            if self.reference is None:  # LoRA: the reference is the same UNet with its adapters disabled
                with adapters_disabled(self.accelerator.unwrap_model(self.unet)) as base:
                    reference_pred = base(noisy.to(self.weight_dtype), timesteps, **kwargs).sample
            else:
                reference_pred = self.reference(noisy.to(self.weight_dtype), timesteps, **kwargs).sample
        with self.accelerator.autocast():
            policy_pred = self.unet(noisy, timesteps, **kwargs).sample  # (2B, c, h, w)
        policy_errors = denoising_errors(policy_pred, target)  # (2B,)
        reference_errors = denoising_errors(reference_pred, target)  # (2B,)
        return self.method.loss(policy_errors, reference_errors, self.config)


def _save_final(config: TrainConfig, backbone: Backbone, unet, output_dir: Path) -> None:
    """LoRA: ``pytorch_lora_weights.safetensors`` (peft keys + adapter config, read by ``pipe.load_lora_weights``
    and ``unet.load_lora_adapter``); full fine-tuning: the whole pipeline with the trained UNet."""
    if config.finetune == "lora":
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from peft.utils import get_peft_model_state_dict

        saver = type(backbone.pipeline)
        saver = saver if hasattr(saver, "save_lora_weights") else StableDiffusionLoraLoaderMixin
        saver.save_lora_weights(
            save_directory=str(output_dir),
            unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
    else:
        backbone.pipeline.unet = unet
        backbone.pipeline.save_pretrained(str(output_dir), safe_serialization=True)


def train(config: TrainConfig) -> TrainResult:
    """Run preference training as ``config`` says; return the per-step metrics. Collective on every process."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # torchrun on a machine without CUDA: two CPU processes with gloo need cpu=True to join one process group
        cpu=config.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    method = get_method(config.method)
    set_seed(config.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    backbone = load_backbone(config.pretrained_model_name_or_path, config.revision, config.variant)
    for name, module in backbone.frozen_modules().items():
        dtype = weight_dtype
        if name == "vae" and config.vae_dtype != "auto":
            dtype = DTYPES[config.vae_dtype]
        elif name == "vae" and backbone.kind == "sdxl":
            dtype = torch.float32  # the stock SDXL VAE overflows in fp16
        module.requires_grad_(False).to(accelerator.device, dtype)
    unet = backbone.unet
    unet.requires_grad_(False)
    _set_attention(unet, config.attention)
    reference = None
    if config.finetune == "lora":
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        unet.to(accelerator.device, weight_dtype)
        targets = [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or config.lora_rank,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
        unet.add_adapter(lora)
        cast_training_params(unet, dtype=torch.float32)
    else:
        reference = copy.deepcopy(unet).eval().to(accelerator.device, weight_dtype)
        unet.requires_grad_(True).to(accelerator.device, torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    dataset = _build_dataset(config, backbone, accelerator)
    sampler = EpochShuffleSampler(len(dataset), config.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=config.dataloader_num_workers,
        drop_last=True,
    )
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} pairs is fewer than --train_batch_size {config.train_batch_size}.")
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if config.finetune == "lora":
        lora_hooks(accelerator)

    global_step = 0
    checkpoint = None
    run_config = dict(dataclasses.asdict(config), num_processes=accelerator.num_processes)
    if config.resume_from_checkpoint is not None:
        checkpoint = find_checkpoint(output_dir, config.resume_from_checkpoint)
        if checkpoint is None:
            accelerator.print(f"no checkpoint in {output_dir}; starting a new run")
        else:
            global_step = read_checkpoint(checkpoint, run_config, RESUME_KEYS)
            accelerator.load_state(str(checkpoint))
            accelerator.print(f"resumed from {checkpoint} at step {global_step}")
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name, config=dataclasses.asdict(config))

    history = RunHistory(output_dir)
    if accelerator.is_main_process:
        history.start(global_step)
    step = _Step(config, method, backbone, unet, reference, accelerator, weight_dtype)
    result = TrainResult(output_dir, global_step=global_step)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)  # accelerate syncs at epoch end
    first_epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    skip_batches = steps_into_epoch * config.gradient_accumulation_steps
    num_epochs = math.ceil(config.max_train_steps / steps_per_epoch)
    bar = tqdm(
        total=config.max_train_steps,
        initial=global_step,
        desc=f"{method.name} steps",
        disable=not (config.progress_bar and accelerator.is_local_main_process),
    )
    sums: dict[str, torch.Tensor] = {}
    for epoch in range(first_epoch, num_epochs):
        if global_step >= config.max_train_steps:
            break
        batches = epoch_batches(accelerator, loader, sampler, epoch, skip_batches if epoch == first_epoch else 0)
        for batch in batches:
            with accelerator.accumulate(unet):
                loss, metrics = step(batch, epoch)
                if accelerator.gather(torch.isfinite(loss.detach()).logical_not().float().reshape(1)).sum() > 0:
                    accelerator.end_training()
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item()}) at step {global_step + 1}; stopped before the optimizer "
                        f"step. Last good checkpoint: {find_checkpoint(output_dir, 'latest') or 'none'}. Try a "
                        "smaller --learning_rate or --beta, or --mixed_precision bf16 / no."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.float() / config.gradient_accumulation_steps
            result.skipped_pairs += int(accelerator.gather(torch.tensor([batch["skipped"]], device=loss.device)).sum())
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {key: accelerator.reduce(value.reshape(1), "mean").item() for key, value in sums.items()}
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            sums = {}
            result.history.append({"step": global_step, **logs})
            if accelerator.is_main_process:
                history.append(result.history[-1])
            accelerator.log(logs, step=global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_accuracy']:.2f}")
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, config.checkpoints_total_limit, run_config)
            if global_step >= config.max_train_steps:
                break
    bar.close()
    result.global_step, result.unet = global_step, accelerator.unwrap_model(unet)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_final(config, backbone, accelerator.unwrap_model(unet), output_dir)
        summary = dict(config=run_config, history=history.read(), skipped_pairs=result.skipped_pairs)
        (output_dir / "diffalign_train.json").write_text(json.dumps(summary, indent=2))
        if result.skipped_pairs:
            print(f"skipped {result.skipped_pairs} pair reads with missing or corrupt images")
    accelerator.end_training()
    return result
