"""Retrain the embedded ``digits-clips`` video model with fixed seeds into ``diffalign/assets/digits/digits-clips/``.

The model and the data are in ``diffalign/models/clips.py``. The ``UNet3DConditionModel`` is inflated from the shipped
``digits-cond`` image UNet (spatial weights copied, temporal layers starting as the identity; Make-A-Video, Singer et
al. 2022) and its prompt encoder, then trained on clips of drifting digits with the epsilon loss: the prompt is
dropped to the null token with probability 0.15 for classifier-free guidance, and all weights (the new temporal
layers, the inherited spatial layers, the prompt table) train at one learning rate; spatial layers held at a tenth
of it gave 0.85 per-frame accuracy instead of 0.92, as the image layers have to learn shifted digits too. The EMA
weights are saved in float16 as a ``DigitsClipPipeline`` folder (``model_index.json``, ``unet/``, ``text_encoder/``,
``scheduler/``), written to a temporary folder first and renamed into place.

Afterwards ``--eval_clips`` clips (the ten digits in turn) are sampled with 20 DDIM steps and three numbers printed:
the per-frame accuracy of the digits classifier for the prompted digit, the mean per-frame log p(prompted digit),
and ``drift_residual`` (how far the clips are from a rigid one-pixel drift: 0.017 for the training clips, 0.29
for independent dataset digits of the class in each frame, 0.18 for the inflated image model before training, whose
frames are independent digits-cond samples).

Threads: train with ``--threads 1`` (the default) on a shared machine. On 2 cores loaded by other jobs, two threads
ran more than ten times slower than one (under 100 steps in 19 minutes against 100 steps in 131 s). Seeds are
fixed, so a rerun with the same thread count reproduces the shipped weights.

    python scripts/train_embedded_clips.py                          # retrain the shipped model
    python scripts/train_embedded_clips.py --steps 1 --eval_clips 0 --out /tmp/clips   # smoke test
"""

from __future__ import annotations

import copy
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from diffalign.models.clips import (
    CLIPS_DIR,
    DIRECTIONS,
    DigitsClipPipeline,
    build_digits_clip_unet,
    clip_segment_rewards,
    drift_residual,
    make_digit_clips,
)
from diffalign.options import option, parse_args
from diffalign.pipelines.digits import (
    NULL_LABEL,
    build_scheduler,
    load_digits_classifier,
    load_digits_data,
    load_digits_pipeline,
)


@dataclass
class ClipTrainConfig:
    """Retrain the embedded digits-clips video model (inflated from digits-cond) on clips of drifting digits."""

    out: Path = option(CLIPS_DIR, "output folder (default: the package assets)")
    image_model: Path | None = option(None, "digits-cond folder to inflate (default: the shipped one)")
    steps: int = option(250, "training steps")
    batch_size: int = option(32, "clips per step")
    num_frames: int = option(6, "frames per training clip")
    lr: float = option(1e-3, "learning rate (AdamW, 20-step warmup, cosine decay)")
    ema_decay: float = option(0.98, "EMA decay of the saved weights (warmed up as (1 + step) / (10 + step))")
    seed: int = option(0, "seed of the data order, the noise and the timesteps")
    threads: int = option(1, "torch.set_num_threads (the shipped model was trained with 1)")
    eval_clips: int = option(100, "clips sampled after training to print per-frame accuracy (0: skip)")


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_clips(config: ClipTrainConfig) -> DigitsClipPipeline:
    """Inflate digits-cond and train it on drifting-digit clips; return a pipeline of its EMA weights in float16."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = load_digits_data("all")  # (N, 1, 8, 8), (N,)
    image_pipe = load_digits_pipeline(conditional=True, path=config.image_model)
    unet = build_digits_clip_unet(image_pipe.unet)
    text_encoder = image_pipe.text_encoder
    noise_scheduler = build_scheduler()
    modules = torch.nn.ModuleList([unet, text_encoder])
    ema = copy.deepcopy(modules).requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, config.steps, warmup=20))
    modules.train()
    for step in range(config.steps):
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        directions = DIRECTIONS[torch.randint(0, len(DIRECTIONS), (config.batch_size,), generator=generator)]
        x0 = make_digit_clips(images[index], directions, config.num_frames)  # (B, 1, F, 8, 8)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        xt = noise_scheduler.add_noise(x0, noise, t)  # (B, 1, F, 8, 8)
        drop = torch.rand(config.batch_size, generator=generator) < 0.15
        label_ids = torch.where(drop, NULL_LABEL, labels[index])  # (B,)
        pred = unet(xt, t, encoder_hidden_states=text_encoder(label_ids)).sample  # (B, 1, F, 8, 8)
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), modules.parameters(), strict=True):
                ema_param.lerp_(param, 1.0 - decay)
        if step % 50 == 0 or step == config.steps - 1:
            print(f"  step {step:4d}/{config.steps}  loss {loss.item():.4f}", flush=True)
    ema_unet, ema_text_encoder = ema.half()
    return DigitsClipPipeline(unet=ema_unet.eval(), scheduler=noise_scheduler, text_encoder=ema_text_encoder)


def save_atomically(pipeline: DigitsClipPipeline, out: Path) -> None:
    """Save the pipeline folder to a temporary sibling, then replace ``out`` with it."""
    temporary = out.parent / f".{out.name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    pipeline.save_pretrained(temporary)
    shutil.rmtree(out, ignore_errors=True)
    temporary.rename(out)


@torch.no_grad()
def evaluate(pipeline: DigitsClipPipeline, num_clips: int, num_frames: int) -> dict[str, float]:
    """Per-frame classifier accuracy for the prompted digit, mean per-frame log p and drift residual of samples."""
    pipeline = DigitsClipPipeline(
        unet=copy.deepcopy(pipeline.unet).float(),
        scheduler=DDIMScheduler.from_config(pipeline.scheduler.config),
        text_encoder=copy.deepcopy(pipeline.text_encoder).float(),
    )
    pipeline.set_progress_bar_config(disable=True)
    prompts = [f"a handwritten {i % 10}" for i in range(num_clips)]
    generator = torch.Generator().manual_seed(1234)
    clips = pipeline(prompts, num_frames=num_frames, num_inference_steps=20, generator=generator, output_type="latent")
    clips = clips.frames  # (B, 1, F, 8, 8)
    classifier = load_digits_classifier()
    frames = clips.transpose(1, 2).reshape(-1, 1, 8, 8)  # (B F, 1, 8, 8)
    predicted = classifier(frames).argmax(dim=1).reshape(num_clips, num_frames)  # (B, F)
    target = torch.arange(num_clips)[:, None] % 10  # (B, 1)
    return {
        "per_frame_accuracy": (predicted == target).float().mean().item(),
        "mean_log_p": clip_segment_rewards(clips, prompts, 1, classifier).mean().item(),
        "drift_residual": drift_residual(clips).mean().item(),
    }


def main(argv: list[str] | None = None) -> int:
    config = parse_args(ClipTrainConfig, argv, prog="train_embedded_clips.py")
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    print(f"digits-clips: {config.steps} steps of {config.batch_size} clips x {config.num_frames} frames", flush=True)
    pipeline = train_clips(config)
    save_atomically(pipeline, config.out)
    print(f"digits-clips: saved to {config.out} ({time.perf_counter() - start:.0f} s)", flush=True)
    if config.eval_clips > 0:
        metrics = evaluate(pipeline, config.eval_clips, config.num_frames)
        print("digits-clips samples: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
