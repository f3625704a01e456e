"""Step time and peak memory of diffalign's Diffusion-DPO step against the two-UNet, no-cache recipe.

Baseline (the recipe of the official DiffusionDPO code / diffusers example, reimplemented here): every step encodes
both images with the VAE and the prompts with the text encoder, and runs a separate frozen reference UNet next to
the trained one. Ours: ``diffalign.alignment.step.PreferenceStep`` with LoRA, the reference = the same UNet with
adapters disabled (one UNet in memory), and latents / text embeddings read from the cache. Both train the same LoRA
on a random-weight SD-like UNet at the same batch and resolution. Each variant runs in its own process, so peak
memory (CUDA: ``max_memory_allocated``; CPU: peak RSS growth after the imports) is its own.

    python scripts/bench_trainer.py                      # CPU, small SD-like models
    python scripts/bench_trainer.py --device cuda        # GPU, SD 1.5-sized models at 512 px, fp16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

SIZES = {
    # UNet block widths, VAE block widths, text hidden size / layers, image side
    "small": dict(unet=(64, 128, 256, 256), vae=(32, 64, 128, 128), text=(256, 4), resolution=128),
    "sd15": dict(unet=(320, 640, 1280, 1280), vae=(128, 256, 512, 512), text=(768, 12), resolution=512),
}


def build(size: dict, device: str, dtype):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    width, layers = size["text"]
    unet = UNet2DConditionModel(block_out_channels=size["unet"], cross_attention_dim=width, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=size["vae"],
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
    )
    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=8, intermediate_size=4 * width)
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    vae.requires_grad_(False).to(device, dtype)
    text.requires_grad_(False).to(device, dtype)
    return unet, vae, text, scheduler


def add_lora(unet):
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return [p for p in unet.parameters() if p.requires_grad]


def run_variant(variant: str, args, queue) -> None:
    import torch

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    device, size = args.device, SIZES[args.size]
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet, vae, text, scheduler = build(size, device, dtype)
    unet.to(device, dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    B, res = args.batch_size, size["resolution"]
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2 * B, 3, res, res, generator=generator).to(device, dtype) * 2 - 1  # (2B, 3, H, W)
    ids = torch.randint(0, 1000, (B, 77), generator=generator).to(device)
    if variant == "baseline":
        reference = build(size, device, dtype)[0].to(device, dtype).requires_grad_(False)  # second UNet
        params = add_lora(unet)
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step():
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor  # (2B, 4, h, w)
                embeds = text(ids)[0].repeat(2, 1, 1)  # (2B, 77, D)
            noise = torch.randn_like(latents[:B]).repeat(2, 1, 1, 1)
            t = torch.randint(0, 1000, (B,), device=device).repeat(2)
            noisy = scheduler.add_noise(latents, noise, t)
            with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                pred = unet(noisy, t, embeds).sample
                with torch.no_grad():
                    ref = reference(noisy, t, embeds).sample
            err = (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
            ref_err = (ref.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
            mw, ml = err.chunk(2)
            rw, rl = ref_err.chunk(2)
            loss = -torch.nn.functional.logsigmoid(-0.5 * 5000 * ((mw - ml) - (rw - rl))).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from accelerate import Accelerator

        from diffalign.alignment.config import TrainConfig
        from diffalign.alignment.methods import build_method
        from diffalign.alignment.models import Backbone
        from diffalign.alignment.step import PreferenceStep

        with torch.no_grad():  # the cache: computed once, before training
            latents = (vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor).float()  # (2B, ...)
            cached = {
                "latents": latents.unflatten(0, (2, B)).transpose(0, 1),  # (B, K = 2, c, h, w), preferred first
                "cond": {"encoder_hidden_states": text(ids)[0]},
                "time_ids": torch.zeros(B, 2, 6),
                "index": torch.arange(B),
            }
        del vae, text
        params = add_lora(unet)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        accelerator = Accelerator(mixed_precision="fp16" if device == "cuda" else "no", cpu=device == "cpu")

        class _Pipe:
            pass

        pipe = _Pipe()
        pipe.unet = unet
        backbone = Backbone("sd", pipe, scheduler, 3, res)
        config = TrainConfig(beta=5000.0)
        forward = PreferenceStep(config, build_method(config), backbone, unet, None, accelerator, dtype)
        counter = iter(range(10**9))

        def step():
            loss, _ = forward(cached, next(counter))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # KiB -> MiB (Linux)
    queue.put(dict(variant=variant, seconds=seconds, memory_mib=memory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (default: small on CPU, sd15 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    args.size = args.size or ("sd15" if args.device == "cuda" else "small")
    context = mp.get_context("spawn")
    rows = {}
    for variant in ("baseline", "diffalign"):
        queue = context.Queue()
        process = context.Process(target=run_variant, args=(variant, args, queue))
        process.start()
        rows[variant] = queue.get()
        process.join()
    base, ours = rows["baseline"], rows["diffalign"]
    print(
        f"Diffusion-DPO LoRA step, {args.size} models, {SIZES[args.size]['resolution']} px, batch "
        f"{args.batch_size} pairs, device {args.device}\n"
    )
    print("| recipe | step time (s) | peak memory (MiB) |")
    print("|---|---|---|")
    print(f"| two UNets, no cache (diffusers example / official) | {base['seconds']:.3f} | {base['memory_mib']:.0f} |")
    print(
        f"| diffalign: one UNet (adapters off = reference), cached | {ours['seconds']:.3f} | "
        f"{ours['memory_mib']:.0f} |"
    )
    throughput = base["seconds"] / ours["seconds"]
    memory = ours["memory_mib"] / base["memory_mib"]
    print(f"\nthroughput ratio (ours / baseline): {throughput:.2f}x  (goal >= 1.3x)")
    print(f"peak memory ratio (ours / baseline): {memory:.2f}x  (goal <= 0.6x)")
    print(json.dumps(dict(rows=rows, throughput_ratio=throughput, memory_ratio=memory)))


if __name__ == "__main__":
    main()
