"""Attention backends on full-size UNets: forward and forward+backward time and peak memory, as ratios to diffusers'.

Builds ``UNet2DConditionModel`` with the real Stable Diffusion 1.5 and SDXL UNet configs (written out below, random
weights: timing does not depend on them) and times every ``diffalign.kernels`` backend in the same run against the
model's default processor (diffusers' ``AttnProcessor2_0``). Forward runs under ``torch.no_grad``; forward+backward
takes the mean square of the output and back-propagates into every parameter (full fine-tuning). Each time is the
median of ``--repeats`` runs after warm-up rounds (two on CUDA, one on CPU), the backends taking turns run by run;
the default processor is timed twice ("default (again)") to show the noise of the measurement. Peak memory is the
CUDA peak above the weights (not measured on CPU).

Shapes: ``sd15``: 64x64 latents, 77x768 text; ``sdxl``: 128x128 latents, 77x2048 text + pooled 1280 + 6 time ids;
``tiny`` (for CPU): the SD 1.5 layout at quarter width (80..320 channels, 2 heads per layer, so SD 1.5's head sizes 40,
80, 160) on 32x32 latents with 77x768 text.

    python scripts/bench_attention.py --device cuda --dtype fp16 --out docs/bench/attention   # sd15 (B=2) + sdxl (B=1)
    OMP_NUM_THREADS=2 python scripts/bench_attention.py --device cpu                        # tiny, float32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from diffalign.kernels import available_backends, set_attention_backend

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' historical name: 8 heads per attention layer
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),  # heads per level: head size 64 everywhere
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled text 1280
)
TINY_UNET = SD15_UNET | dict(
    sample_size=32, block_out_channels=(80, 160, 320, 320), attention_head_dim=2, norm_num_groups=16
)
SHAPES = {  # name: (UNet config, text tokens, SDXL added conditioning)
    "sd15": (SD15_UNET, 77, False),
    "sdxl": (SDXL_UNET, 77, True),
    "tiny": (TINY_UNET, 77, False),
}
DEFAULT_BATCH = {"sd15": 2, "sdxl": 1, "tiny": 1}
BACKENDS = ("sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math", "xformers", "fused")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(shape: str, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Seeded UNet inputs: latents (B, 4, S, S), timestep, text states (B, 77, D), SDXL's pooled text and time ids."""
    config, tokens, added = SHAPES[shape]
    generator = torch.Generator(device).manual_seed(0)
    size = config["sample_size"]
    inputs = {
        "sample": torch.randn(batch, 4, size, size, generator=generator, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device),
        "encoder_hidden_states": torch.randn(
            batch, tokens, config["cross_attention_dim"], generator=generator, device=device, dtype=dtype
        ),
    }
    if added:
        pixels = 8 * size
        time_ids = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], device=device, dtype=dtype)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=generator, device=device, dtype=dtype),
            "time_ids": time_ids.repeat(batch, 1),
        }
    return inputs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(fn, device: torch.device) -> tuple[float, float | None]:
    """Milliseconds of one ``fn()``, and its CUDA peak memory (GiB) above what was allocated before it."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_memory = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    elapsed = 1e3 * (time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - start_memory) / 2**30 if device.type == "cuda" else None
    return elapsed, peak


def bench_shape(shape: str, batch: int, backends: list[str], device, dtype, repeats: int) -> list[dict]:
    """One row per backend (and the default twice): median times, peak memory, and the output's max |difference|.

    Backends are timed round-robin, one run of each per round, so that drift in the machine's load (or clocks)
    spreads over all of them instead of biasing the ones timed last.
    """
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SHAPES[shape][0]).to(dtype)
    inputs = make_inputs(shape, batch, device, dtype)

    def forward():
        with torch.no_grad():
            return unet(**inputs).sample

    def forward_backward():
        unet(**inputs).sample.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    labels = ["default", *backends, "default (again)"]
    runs = {label: {"forward": [], "train": []} for label in labels}
    warmup = 2 if device.type == "cuda" else 1
    for round_index in range(warmup + repeats):
        for label in labels:
            set_attention_backend(unet, label.removesuffix(" (again)"))
            for kind, fn in (("forward", forward), ("train", forward_backward)):
                result = run_once(fn, device)
                if round_index >= warmup:
                    runs[label][kind].append(result)
        print(f"  {shape}: round {round_index + 1} of {warmup + repeats} done", flush=True)

    rows, reference = [], None
    for label in labels:
        set_attention_backend(unet, label.removesuffix(" (again)"))
        out = forward().float()
        reference = out if reference is None else reference
        row = dict(backend=label, max_abs_diff=(out - reference).abs().max().item())
        for kind in ("forward", "train"):
            times, peaks = zip(*runs[label][kind], strict=True)
            row[f"{kind}_ms"] = statistics.median(times)
            row[f"{kind}_peak_gib"] = None if peaks[0] is None else max(peaks)
        rows.append(row)
    set_attention_backend(unet, "default")
    base = rows[0]
    for row in rows:
        for key in ("forward_ms", "train_ms", "forward_peak_gib", "train_peak_gib"):
            row[key.rsplit("_", 1)[0] + "_ratio"] = row[key] / base[key] if base[key] else None
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    lines = [
        f"Attention backends, {results['device']}, {results['dtype']}, torch {results['torch']} "
        f"(median of {results['repeats']} runs; ratios against diffusers' default processor, below 1 = faster / "
        "less memory; peak memory above the weights)",
        "",
    ]
    for shape, entry in results["shapes"].items():
        lines += [
            f"**{shape}** ({entry['description']}, batch {entry['batch']})",
            "",
            "| backend | forward ms | ratio | fwd+bwd ms | ratio | fwd peak GiB | ratio | fwd+bwd peak GiB | ratio "
            "| max abs diff |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in entry["rows"]:
            lines.append(
                f"| {row['backend']} | {row['forward_ms']:.2f} | {_fmt(row['forward_ratio'], '.3f')} "
                f"| {row['train_ms']:.2f} | {_fmt(row['train_ratio'], '.3f')} "
                f"| {_fmt(row['forward_peak_gib'], '.2f')} | {_fmt(row['forward_peak_ratio'], '.3f')} "
                f"| {_fmt(row['train_peak_gib'], '.2f')} | {_fmt(row['train_peak_ratio'], '.3f')} "
                f"| {row['max_abs_diff']:.1e} |"
            )
        if entry["skipped"]:
            lines.append(f"\nNot run (no native kernel here): {', '.join(entry['skipped'])}.")
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--shapes", help="comma-separated sd15, sdxl, tiny (default: sd15,sdxl on CUDA, tiny on CPU)")
    parser.add_argument("--batch", type=int, help="batch size for every shape (default: sd15 2, sdxl 1, tiny 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--backends", help=f"comma-separated backends (default: {','.join(BACKENDS)})")
    parser.add_argument("--out", default="bench_attention", help="writes OUT.md and OUT.json (default: %(default)s)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    shapes = (args.shapes or ("sd15,sdxl" if device.type == "cuda" else "tiny")).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown --shapes {unknown}; choose from {sorted(SHAPES)}")
    wanted = args.backends.split(",") if args.backends else list(BACKENDS)
    native = set(available_backends(device, dtype))
    backends = [b for b in wanted if b in native]
    skipped = [b for b in wanted if b not in native]
    warnings.simplefilter("ignore", FutureWarning)
    diffusers_logging.set_verbosity_error()

    results = dict(
        device=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        torch=torch.__version__,
        repeats=args.repeats,
        shapes={},
    )
    for shape in shapes:
        batch = args.batch or DEFAULT_BATCH[shape]
        size = SHAPES[shape][0]["sample_size"]
        description = f"{size}x{size} latents, {SHAPES[shape][1]}x{SHAPES[shape][0]['cross_attention_dim']} text"
        print(f"{shape}: {description}, batch {batch}, {device_name(device)}, {dtype}", flush=True)
        rows = bench_shape(shape, batch, backends, device, dtype, args.repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the UNet went with bench_shape's frame
        results["shapes"][shape] = dict(description=description, batch=batch, rows=rows, skipped=skipped)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    write_atomic(out.with_suffix(".md"), table)
    write_atomic(out.with_suffix(".json"), json.dumps(results, indent=2))
    print("\n" + table)
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
