"""One accelerate training loop shared by every preference method (Diffusion-DPO first).

Per optimizer step: draw records (a prompt with K candidates), turn them into the method's loss (``step.py``: the
noise provider, the reference and policy forwards, the method), and step AdamW with gradient accumulation, clipping
and an LR schedule. LoRA trains adapters on the UNet and uses the same UNet with its adapters disabled as the
reference (one UNet in memory); full fine-tuning trains the UNet against a frozen copy.

Reproducibility: the data order is a permutation seeded by (seed, epoch) (``feed.py``; with ``--streaming`` each
process's share of the stream, shuffled through a buffer seeded by (seed, epoch)), and each record's timestep and
noise come from a generator seeded by (seed, epoch, record index). So a run gives the same numbers on 1 or N
processes at the same global batch (a stream: at the same process count), and a resumed run continues the same loss
curve.

Checkpoints (``checkpoint-<step>``, ``checkpoints.py``) are accelerate states written to a temporary folder and
renamed into place, with the run's config; the history is appended to ``history.jsonl`` step by step. A non-finite
loss stops the run before the optimizer step, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from .checkpoints import RESUME_KEYS, RunHistory, find_checkpoint, lora_hooks, read_checkpoint, save_checkpoint
from .config import EMBEDDED_MODEL, TrainConfig
from .data import load_preferences
from .eval_hook import TrainingEvaluator
from .feed import MapFeed, StreamFeed, make_feed
from .methods import PreferenceMethod, build_method, method_options
from .models import DTYPES, Backbone, load_backbone
from .replay import ReplayBuffer, register_process_state
from .step import PreferenceStep
from .video import without_adapters


@dataclass
class TrainResult:
    """What ``train`` returns: the output folder, one metrics dict per optimizer step of this run (a resumed run:
    the steps after its checkpoint), records skipped as unreadable, the UNet."""

    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_pairs: int = 0
    global_step: int = 0
    unet: torch.nn.Module | None = None


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


def build_dataset(config: TrainConfig, backbone: Backbone, accelerator: Accelerator):
    """The decoded records of ``--dataset`` (digits-cond without one: pairs of its own samples; ``--streaming``:
    this process's share of the stream), or their latent cache in ``--cache_dir`` (built first if needed; the cache
    of a stream is read as a dataset of known length)."""
    if backbone.is_video:  # video: clip pairs (dense_pairs.py)
        if config.streaming:
            raise ValueError("--streaming reads image tables; clip pairs are read whole. Drop it.")
        from .dense_pairs import build_clip_dataset

        return build_clip_dataset(config, backbone, accelerator)
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
    records = load_preferences(
        dataset_path,
        resolution,
        backbone.image_channels,
        split=config.dataset_split,
        jsonl_name=config.jsonl_name,
        image_root=config.image_root,
        max_samples=config.max_train_samples,
        streaming=config.streaming,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        seed=config.seed if config.cache_dir is None else None,  # a streamed cache is built unshuffled
        buffer_size=config.shuffle_buffer,
    )
    if config.cache_dir is None:
        return records
    from .cache import CachedPreferences, build_cache, build_streaming_cache

    meta = dict(
        model=config.pretrained_model_name_or_path,
        revision=config.revision,
        variant=config.variant,
        resolution=resolution,
        vae_dtype=config.vae_dtype,
        dataset=dataset_path,
        max_samples=config.max_train_samples,
    )
    build = build_streaming_cache if config.streaming else build_cache
    build(records, backbone, config.cache_dir, meta, accelerator)
    return CachedPreferences(config.cache_dir)


def save_final(config: TrainConfig, backbone: Backbone, unet, output_dir: Path) -> None:
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
        backbone.pipeline.unet = without_adapters(unet) if backbone.kind == "video" else unet
        backbone.pipeline.save_pretrained(str(output_dir), safe_serialization=True)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's accelerator (accumulation, mixed precision, trackers); the main process creates the output folder."""
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
    return accelerator


def prepare_models(config: TrainConfig, backbone: Backbone, accelerator: Accelerator, weight_dtype: torch.dtype):
    """Freeze the encoders, set up the trainable UNet (LoRA adapters or all weights) -> (unet, reference or None)."""
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
        try:
            unet.enable_gradient_checkpointing()
        except ValueError as error:  # e.g. diffusers' UNet3DConditionModel (TextToVideoSDPipeline) has none
            raise ValueError(f"--gradient_checkpointing: {error} Drop --gradient_checkpointing.") from error
    unet.train()
    return unet, reference


def make_optimizer(config: TrainConfig, unet, num_processes: int):
    """AdamW over the trainable parameters and the LR schedule -> (optimizer, lr_scheduler)."""
    from diffusers.optimization import get_scheduler

    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.train_batch_size * config.gradient_accumulation_steps * num_processes
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad],
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_train_steps * num_processes,
    )
    return optimizer, lr_scheduler


@dataclass
class Run:
    """What the loop functions share: set up once by ``train``."""

    config: TrainConfig
    accelerator: Accelerator
    method: PreferenceMethod
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    feed: MapFeed | StreamFeed
    step: PreferenceStep
    result: TrainResult
    history: RunHistory
    run_config: dict = field(default_factory=dict)  # what checkpoints record and a resume must match
    resume_keys: tuple[str, ...] = ()
    evaluator: TrainingEvaluator | None = None  # --eval_steps, main process only

    @property
    def output_dir(self) -> Path:
        return self.result.output_dir


def resume(run: Run) -> int:
    """Load the checkpoint ``--resume_from_checkpoint`` names (after checking its config) -> its global step."""
    config, accelerator = run.config, run.accelerator
    if config.resume_from_checkpoint is None:
        return 0
    checkpoint = find_checkpoint(run.output_dir, config.resume_from_checkpoint)
    if checkpoint is None:
        accelerator.print(f"no checkpoint in {run.output_dir}; starting a new run")
        return 0
    global_step, note = read_checkpoint(checkpoint, run.run_config, run.resume_keys)
    accelerator.load_state(str(checkpoint))
    accelerator.print(f"resumed from {checkpoint} at step {global_step}" + (f"; {note}" if note else ""))
    return global_step


def optimizer_micro_step(run: Run, batch: dict, epoch: int) -> tuple[torch.Tensor, dict]:
    """Forward, stop on a non-finite loss (any process), backward, clip, and step (accelerate applies the optimizer
    step only at the end of an accumulation cycle) -> (detached loss, metrics)."""
    config, accelerator = run.config, run.accelerator
    with accelerator.accumulate(run.unet):
        loss, metrics = run.step(batch, epoch)
        if accelerator.gather(torch.isfinite(loss.detach()).logical_not().float().reshape(1)).sum() > 0:
            accelerator.end_training()
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {run.result.global_step + 1}; stopped before the optimizer "
                f"step. Last good checkpoint: {find_checkpoint(run.output_dir, 'latest') or 'none'}. Try a "
                "smaller --learning_rate or --beta, or --mixed_precision bf16 / no."
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.unet.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), metrics


def end_step(run: Run, sums: dict[str, torch.Tensor], bar) -> None:
    """After an optimizer step: average the metrics over processes, log and append them, checkpoint when due."""
    accelerator, config, result = run.accelerator, run.config, run.result
    result.global_step += 1
    run.method.after_optimizer_step(result.global_step)
    logs = {key: accelerator.reduce(value.reshape(1), "mean").item() for key, value in sums.items()}
    logs["skipped"] = int(logs["skipped"] * accelerator.num_processes * config.gradient_accumulation_steps + 0.5)
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    if config.eval_steps and result.global_step % config.eval_steps == 0:
        logs.update(evaluation(run))
    result.history.append({"step": result.global_step, **logs})
    result.skipped_pairs += logs["skipped"]
    if accelerator.is_main_process:
        run.history.append(result.history[-1])
    accelerator.log(logs, step=result.global_step)
    bar.update(1)
    bar.set_postfix({key: f"{logs[key]:.4g}" for key in ("loss", *run.method.display) if key in logs})
    if config.checkpointing_steps and result.global_step % config.checkpointing_steps == 0:
        save_checkpoint(
            accelerator, run.output_dir, result.global_step, config.checkpoints_total_limit, run.run_config
        )


def evaluation(run: Run) -> dict[str, float]:
    """``--eval_steps``: the policy scored against its base on the main process (the others wait) -> metrics."""
    accelerator = run.accelerator
    metrics = run.evaluator(accelerator.unwrap_model(run.unet)) if run.evaluator is not None else {}
    accelerator.wait_for_everyone()
    return metrics


def train_loop(run: Run) -> None:
    """Epochs of micro-steps from ``run.result.global_step`` (skipping what a resumed epoch already saw)."""
    config, accelerator, result = run.config, run.accelerator, run.result
    first_epoch, skip = run.feed.resume_point(result.global_step)
    bar = tqdm(
        total=config.max_train_steps,
        initial=result.global_step,
        desc=f"{run.method.name} steps",
        disable=not (config.progress_bar and accelerator.is_local_main_process),
    )
    sums: dict[str, torch.Tensor] = {}
    for epoch in itertools.count(first_epoch):
        micro_steps = 0
        for batch in run.feed.batches(epoch, skip if epoch == first_epoch else 0):
            micro_steps += 1
            loss, metrics = optimizer_micro_step(run, batch, epoch)
            for key, value in {"loss": loss, **metrics, "skipped": batch["skipped"]}.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=loss.device)
                sums[key] = sums.get(key, 0.0) + value / config.gradient_accumulation_steps
            if accelerator.sync_gradients:
                end_step(run, sums, bar)
                sums = {}
                if result.global_step >= config.max_train_steps:
                    break
        if result.global_step >= config.max_train_steps:
            break
        if micro_steps == 0 and not (epoch == first_epoch and skip):
            raise ValueError(
                f"epoch {epoch} gave no full optimizer step: some process has fewer than --train_batch_size x "
                "--gradient_accumulation_steps readable records in its share. Use fewer processes or a smaller batch."
            )
    bar.close()


def finish(run: Run, backbone: Backbone) -> None:
    """Save the trained weights and the summary (config, whole history, skipped records) on the main process."""
    accelerator, result = run.accelerator, run.result
    result.unet = accelerator.unwrap_model(run.unet)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(run.config, backbone, result.unet, run.output_dir)
        run.method.save_final(run.output_dir, lambda folder: save_final(run.config, backbone, result.unet, folder))
        history = run.history.read()
        skipped = sum(line.get("skipped", 0) for line in history)
        summary = dict(config=run.run_config, history=history, skipped_records=skipped)
        (run.output_dir / "diffalign_train.json").write_text(json.dumps(summary, indent=2))
        if skipped:
            print(f"skipped {skipped} record reads with missing or corrupt images")
    accelerator.end_training()


def train(config: TrainConfig) -> TrainResult:
    """Run preference training as ``config`` says; return the per-step metrics. Collective on every process."""
    accelerator = make_accelerator(config)
    method = build_method(config)
    set_seed(config.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    backbone = load_backbone(config.pretrained_model_name_or_path, config.revision, config.variant)
    method.prepare_backbone(backbone, config)
    unet, reference = prepare_models(config, backbone, accelerator, weight_dtype)
    optimizer, lr_scheduler = make_optimizer(config, unet, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    feed = make_feed(build_dataset(config, backbone, accelerator), config, accelerator)
    if config.finetune == "lora":
        lora_hooks(accelerator)
    step = PreferenceStep(config, method, backbone, unet, reference, accelerator, weight_dtype)
    if method.online:  # each process's rollouts: bounded, and in every checkpoint
        step.replay = ReplayBuffer(config.rollout_buffer_size)
        register_process_state(accelerator, "replay", step.replay.state_dict, step.replay.load_state_dict)
    result = TrainResult(Path(config.output_dir))
    history = RunHistory(result.output_dir)
    run = Run(config, accelerator, method, unet, optimizer, lr_scheduler, feed, step, result, history)
    run.run_config = dict(dataclasses.asdict(config), num_processes=accelerator.num_processes)
    run.resume_keys = RESUME_KEYS + tuple(dataclasses.asdict(method_options(type(method), config)))
    method.attach(accelerator, accelerator.unwrap_model(unet))
    if config.eval_steps and accelerator.is_main_process:
        run.evaluator = TrainingEvaluator(config, backbone, reference, accelerator.device)
    result.global_step = resume(run)
    if accelerator.is_main_process:
        run.history.start(result.global_step)
        if config.report_to != "none":
            accelerator.init_trackers(config.tracker_project_name, config=dataclasses.asdict(config))
    train_loop(run)
    finish(run, backbone)
    return result
