"""``diffalign train`` (and ``accelerate launch -m diffalign.train``): preference training of a pipeline's UNet."""

from __future__ import annotations

from ..alignment.config import TrainConfig

NAME = "train"
HELP = "preference training (Diffusion-DPO and the other methods) of SD 1.5 / SDXL / digits-cond, LoRA or full"
DESCRIPTION = (
    "Preference-train a diffusers pipeline's UNet on preference records (pairs, K-way rankings, scored candidates; "
    "Pick-a-Pic parquet, `datasets` folders or JSONL), with the method chosen by --method. Multi-GPU: "
    "accelerate launch -m diffalign.train with the same options."
)
CONFIG = TrainConfig


def run(config: TrainConfig) -> int:
    """Train; the main process prints the last step's metrics and where the weights went."""
    from accelerate import PartialState

    from ..alignment.trainer import train

    result = train(config)
    if PartialState().is_main_process:
        print(summary_line(result, config))
    return 0


def summary_line(result, config: TrainConfig) -> str:
    """'step N: loss x, <the method's displayed metrics>; wrote <folder>' for the end of a run."""
    from ..alignment.methods import get_method

    if not result.history:
        return f"wrote {result.output_dir}"
    last = result.history[-1]
    shown = [key for key in ("loss", *get_method(config.method).display) if key in last]
    metrics = ", ".join(f"{key.replace('_', ' ')} {last[key]:.4f}" for key in shown)
    return f"step {result.global_step}: {metrics}; wrote {result.output_dir}"
