"""``diffalign train`` (and ``accelerate launch -m diffalign.train``): preference training of a pipeline's UNet."""

from __future__ import annotations

from ..alignment.config import TrainConfig

NAME = "train"
HELP = "preference training (Diffusion-DPO) of SD 1.5 / SDXL / digits-cond, LoRA or full"
DESCRIPTION = (
    "Preference-train a diffusers pipeline's UNet on pairs (Pick-a-Pic format or a JSONL folder). Multi-GPU: "
    "accelerate launch -m diffalign.train with the same options."
)
CONFIG = TrainConfig


def run(config: TrainConfig) -> int:
    """Train; the main process prints the last step's metrics and where the weights went."""
    from accelerate import PartialState

    from ..alignment.trainer import train

    result = train(config)
    if not PartialState().is_main_process:
        return 0
    if result.history:
        last = result.history[-1]
        print(f"step {result.global_step}: loss {last['loss']:.4f}, implicit accuracy {last['implicit_accuracy']:.3f}")
    print(f"wrote {result.output_dir}")
    return 0
