"""Files of an eval report: ``eval.json`` (everything), ``eval.md`` (a table per reward) and ``grid.png``."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

CELL = 64
"""Smallest side of a grid cell in pixels; smaller images (digits are 8x8) are enlarged with nearest neighbours."""
LABEL_WIDTH = 160
GAP = 2
"""White pixels between cells."""


def _interval(stats: dict, key: str) -> str:
    low, high = stats[f"{key}_ci"]
    return f"{stats[key]:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(report: dict) -> str:
    """The report as Markdown: the settings, then one row per reward with 95% bootstrap intervals."""
    tuned = f"LoRA `{report['lora']}`" if report["lora"] else f"weights `{report['weights']}`"
    prompts = report["prompts_file"] or "built-in digit prompts"
    bootstrap = report["bootstrap"]
    unit = "prompt x seed cells" if bootstrap["unit"] == "cell" else "prompts (all seeds of a prompt together)"
    lines = [
        f"Tuned: `{report['pipeline']}` + {tuned}; base: `{report['pipeline']}`. "
        f"Prompts: {prompts} ({len(report['prompts'])}, sha256 {report['prompts_sha256'][:12]}), "
        f"seeds {report['seeds'][0]}..{report['seeds'][-1]} ({len(report['seeds'])} per prompt), "
        f"{report['sampler']}, NFE {report['nfe']}, guidance {report['guidance_scale']:g}. "
        f"Mean / median [95% percentile-bootstrap interval, {bootstrap['resamples']} resamples of the {unit}, seed "
        f"{bootstrap['seed']}]; win-rate: tuned > base, ties count half.",
        "",
        "| reward | base mean | tuned mean | tuned - base | base median | tuned median | win-rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in report["rewards"].items():
        base, tuned_stats = result["base"], result["tuned"]
        cells = [
            _interval(base, "mean"),
            _interval(tuned_stats, "mean"),
            _interval(result, "mean_difference"),
            _interval(base, "median"),
            _interval(tuned_stats, "median"),
            _interval(result, "win_rate"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Reward versions: " + ", ".join(f"{n} = `{r['version']}`" for n, r in report["rewards"].items())]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, report: dict) -> Path:
    path.write_text(markdown_table(report), encoding="utf-8")
    return path


def _to_pil(image: torch.Tensor, side: int) -> Image.Image:
    """(C, H, W) in [0, 1] -> an RGB PIL image whose smaller side is ``side`` (nearest-neighbour enlargement)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).convert("RGB")
    scale = max(1, side // min(picture.size))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def write_grid(
    path: Path, base: torch.Tensor, tuned: torch.Tensor, prompts: list[str], num_prompts: int, num_seeds: int
) -> Path:
    """A PNG with a base row and a tuned row per prompt (first ``num_prompts``), one column per seed.

    ``base`` and ``tuned`` are (P * S, C, H, W) in [0, 1], prompt-major, as ``sample_images`` returns them.
    """
    seeds_per_prompt = len(base) // len(prompts)
    rows, columns = min(num_prompts, len(prompts)), min(num_seeds, seeds_per_prompt)
    width, height = (side + GAP for side in _to_pil(base[0], CELL).size)
    grid = Image.new("RGB", (LABEL_WIDTH + columns * width, 2 * rows * height + rows * 2 * GAP), "white")
    draw = ImageDraw.Draw(grid)
    for p in range(rows):
        for k, (model, images) in enumerate((("base", base), ("tuned", tuned))):
            top = (2 * p + k) * height + p * 2 * GAP  # a wider gap between prompts
            draw.text((4, top + 4), f"{model}\n{prompts[p][:24]}", fill="black")
            for s in range(columns):
                grid.paste(_to_pil(images[p * seeds_per_prompt + s], CELL), (LABEL_WIDTH + s * width, top))
    temporary = path.with_name(path.name + ".tmp.png")
    grid.save(temporary)
    temporary.replace(path)
    return path
