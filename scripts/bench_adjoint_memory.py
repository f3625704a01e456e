"""Peak memory of one gradient through the sampler: AdjointDPM against plain backprop, at NFE 5, 10, 20, 50.

The model is the tiny SD 1.5 UNet of diffusers' fast tests (block widths 32 / 64, cross-attention 32, random weights)
at ``--latent-size`` latents with classifier-free guidance, so that UNet activations dominate. One gradient is
``d loss / d (x_T, prompt embeddings, UNet weights)`` for ``loss = mean(x_0^2)``.

Memory measure:
- ``--device cuda``: ``torch.cuda.max_memory_allocated`` above the allocation before the gradient (in process).
- ``--device cpu``: each configuration runs in a fresh subprocess; we reset the kernel's peak-RSS counter
  (``/proc/self/clear_refs``) after building the model and a warm-up solve, and report ``VmHWM - VmRSS`` at that point
  (peak resident-set growth during the gradient, in MiB). Linux only.

    python scripts/bench_adjoint_memory.py                       # CPU, NFE 5 10 20 50
    python scripts/bench_adjoint_memory.py --device cuda --latent-size 64 --batch 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffalign.models.adapters import GuidedUNet  # noqa: E402
from diffalign.samplers import AdjointDPMScheduler, adjoint_sample  # noqa: E402

METHODS = ("backprop", "adjoint", "adjoint-reconstruct")
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tiny_sd_unet() -> UNet2DConditionModel:
    """diffusers' tiny SD UNet (as in tests/tiny_pipelines.py), seeded."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )


def one_gradient(method: str, nfe: int, args, device: torch.device, measure_start=None) -> float:
    """Build everything, then time and measure one gradient; returns the peak memory growth in MiB."""
    unet = tiny_sd_unet().to(device)
    model = GuidedUNet(unet, guidance_scale=args.guidance_scale)
    params = [p for p in unet.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(args.batch, 4, args.latent_size, args.latent_size, generator=g).to(device).requires_grad_(True)
    cond = torch.randn(2 * args.batch, 8, 32, generator=g).to(device).requires_grad_(True)
    scheduler = AdjointDPMScheduler(**SD_BETAS)
    with torch.no_grad():
        adjoint_sample(model, x_T, scheduler, 2, cond=cond)  # warm-up: allocator and kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = measure_start()
    start = time.perf_counter()
    if method == "backprop":
        scheduler.set_timesteps(nfe)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t, cond), t, x).prev_sample
    else:
        trajectory = "store" if method == "adjoint" else "reconstruct"
        x = adjoint_sample(model, x_T, scheduler, nfe, cond=cond, params=params, trajectory=trajectory)
    loss = x.square().mean()
    torch.autograd.grad(loss, [x_T, cond, *params])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _vm_kib("VmHWM") * 1024 - base
    return peak / 2**20, time.perf_counter() - start


def _vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status; the CPU measure needs Linux.")


def _reset_peak_rss() -> int:
    """Reset the peak-RSS counter (``echo 5 > /proc/self/clear_refs``) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vm_kib("VmRSS") * 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--latent-size", type=int, default=32, help="latent side (the tiny UNet's sample_size is 32)")
    parser.add_argument("--batch", type=int, default=1, help="images per gradient (the UNet sees 2x with guidance)")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "NFE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False; run on a GPU machine or use --device cpu.")
    if args.worker:
        peak, seconds = one_gradient(args.worker[0], int(args.worker[1]), args, torch.device("cpu"), _reset_peak_rss)
        print(json.dumps({"peak_mib": peak, "seconds": seconds}))
        return
    results = {}
    for method in args.methods:
        for nfe in args.nfe:
            if args.device == "cuda":
                peak, seconds = one_gradient(method, nfe, args, torch.device("cuda"))
            else:
                cmd = [sys.executable, __file__, "--worker", method, str(nfe)]
                cmd += ["--latent-size", str(args.latent_size), "--batch", str(args.batch)]
                cmd += ["--guidance-scale", str(args.guidance_scale)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                peak, seconds = json.loads(out)["peak_mib"], json.loads(out)["seconds"]
            results[method, nfe] = (peak, seconds)
            print(f"  {method:20s} NFE {nfe:3d}: {peak:9.1f} MiB  {seconds:6.1f} s", file=sys.stderr)
    measure = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS growth, fresh process each"
    print(
        f"\nPeak memory of one gradient (MiB; {measure}; tiny SD UNet, {args.batch}x4x{args.latent_size}x"
        f"{args.latent_size} latents, CFG {args.guidance_scale:g}, device {args.device})\n"
    )
    first = args.nfe[0]
    print("| method | " + " | ".join(f"NFE {n}" for n in args.nfe) + f" | NFE {args.nfe[-1]} / NFE {first} |")
    print("|---" * (len(args.nfe) + 2) + "|")
    for method in args.methods:
        cells = [f"{results[method, n][0]:.1f}" for n in args.nfe]
        ratio = results[method, args.nfe[-1]][0] / max(results[method, first][0], 1e-9)
        print(f"| {method} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    print("\n| method | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |")
    print("|---" * (len(args.nfe) + 1) + "|")
    for method in args.methods:
        print(f"| {method} (s) | " + " | ".join(f"{results[method, n][1]:.1f}" for n in args.nfe) + " |")


if __name__ == "__main__":
    main()
