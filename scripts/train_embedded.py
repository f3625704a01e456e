"""Retrain the embedded digits models with fixed seeds and write them to ``diffalign/assets/digits/``.

Trains, in order (see ``diffalign/models/digits.py`` for the models and the data):

1. ``classifier/``: the digits CNN on the 80% training split (random +-1 pixel shifts), checked on the 20% held out.
2. ``digits/``: the unconditional ``UNet2DModel`` on all 1,797 digits, epsilon loss, EMA weights saved.
3. ``digits-cond/``: the ``UNet2DConditionModel`` + ``DigitsPromptEncoder``, prompt dropped to the null token
   with probability 0.15 for classifier-free guidance, EMA weights saved.

Each diffusion model is saved as a ``DigitsPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``
with ``scheduler_config.json``, and ``text_encoder/`` for ``digits-cond``), all safetensors + JSON. Weights are
stored in float16 to keep the package small (about 4.6 MB in all); the loaders cast them back to float32.

Time (torch 2.13 CPU), measured: 19 min 50 s on 2 idle cores (``--threads 2``: classifier 20 s, digits 604 s,
digits-cond 561 s); 34 minutes on 1 core of a shared machine (``--threads 1``: 18 s, 1,026 s, 979 s). On a busy
machine use ``--threads 1``: two threads competing with another process can be many times slower. Seeds are fixed,
so a rerun with the same thread count reproduces the shipped weights bit for bit (they were trained with
``--threads 1``); another thread count changes float summation order, so its weights differ slightly (same
classifier accuracy, 0.9972).

    python scripts/train_embedded.py                 # retrain everything into diffalign/assets/digits
    python scripts/train_embedded.py --quick --out /tmp/digits   # one step each (a smoke test)
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffalign.models.digits import (
    ASSETS_DIR,
    NULL_LABEL,
    DigitsClassifier,
    DigitsPipeline,
    DigitsPromptEncoder,
    build_digits_unet,
    build_scheduler,
    load_digits_data,
)


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each (B, 1, 8, 8) image by -1..1 pixels in x and y, filling with background (-1)."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)  # (B, 1, 10, 10)
    offsets = torch.randint(0, 3, (len(images), 2), generator=generator)
    return torch.stack([p[:, dy : dy + 8, dx : dx + 8] for p, (dy, dx) in zip(padded, offsets.tolist(), strict=True)])


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_classifier(steps: int, seed: int) -> tuple[DigitsClassifier, float]:
    """Train the classifier on the training split; return it (eval mode) and its held-out accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_data("train")  # (N, 1, 8, 8), (N,)
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, steps, warmup=50))
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (128,), generator=generator)
        loss = F.cross_entropy(model(random_shift(images[index], generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    test_images, test_labels = load_digits_data("test")
    with torch.no_grad():
        accuracy = (model(test_images).argmax(dim=1) == test_labels).float().mean().item()
    return model, accuracy


def train_diffusion(conditional: bool, steps: int, seed: int, batch_size: int = 128) -> DigitsPipeline:
    """Train a digits diffusion model with the epsilon loss; return a pipeline of its EMA weights in float16."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_data("all")  # (N, 1, 8, 8), (N,)
    noise_scheduler = build_scheduler()
    unet = build_digits_unet(conditional)
    text_encoder = DigitsPromptEncoder() if conditional else None
    modules = torch.nn.ModuleList([m for m in (unet, text_encoder) if m is not None])
    ema = copy.deepcopy(modules).requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, steps, warmup=200))
    modules.train()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0 = images[index]  # (B, 1, 8, 8)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        xt = noise_scheduler.add_noise(x0, noise, t)  # (B, 1, 8, 8)
        if conditional:
            drop = torch.rand(batch_size, generator=generator) < 0.15
            label_ids = torch.where(drop, NULL_LABEL, labels[index])  # (B,)
            pred = unet(xt, t, encoder_hidden_states=text_encoder(label_ids)).sample
        else:
            pred = unet(xt, t).sample  # (B, 1, 8, 8)
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), modules.parameters(), strict=True):
                ema_param.lerp_(param, 1.0 - decay)
        if step % 500 == 0 or step == steps - 1:
            print(f"  step {step:5d}/{steps}  loss {loss.item():.4f}", flush=True)
    ema_unet, ema_text_encoder = (list(ema.half()) + [None])[:2]
    return DigitsPipeline(unet=ema_unet.eval(), scheduler=noise_scheduler, text_encoder=ema_text_encoder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output folder (default: the package assets)")
    parser.add_argument("--steps", type=int, default=None, help="diffusion training steps for both models")
    parser.add_argument("--classifier-steps", type=int, default=1000, help="classifier training steps")
    parser.add_argument("--uncond-steps", type=int, default=6000, help="steps for digits (unless --steps)")
    parser.add_argument("--cond-steps", type=int, default=6000, help="steps for digits-cond (unless --steps)")
    parser.add_argument("--quick", action="store_true", help="one step per model: a smoke test, not a model")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each model adds a fixed offset")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = args.classifier_steps = 1
    uncond_steps = args.steps if args.steps is not None else args.uncond_steps
    cond_steps = args.steps if args.steps is not None else args.cond_steps
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    classifier, accuracy = train_classifier(args.classifier_steps, args.seed)
    classifier.half().save_pretrained(args.out / "classifier")
    print(f"classifier: held-out accuracy {accuracy:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    for name, conditional, steps, offset in (("digits", False, uncond_steps, 1), ("digits-cond", True, cond_steps, 2)):
        start = time.perf_counter()
        print(f"{name}: {steps} steps", flush=True)
        train_diffusion(conditional, steps, args.seed + offset).save_pretrained(args.out / name)
        print(f"{name}: done ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
