"""Checkpoints, resume checks and the run history of ``diffalign train``.

A checkpoint ``checkpoint-<step>`` is an accelerate state written to a temporary folder and renamed into place, plus
``trainer_state.json``: the global step and the run's config (every ``TrainConfig`` field and the number of
processes). A resume compares that config with the new one and refuses a run that would continue differently: other
batches skipped (batch size, accumulation, processes, data, seed) or another objective (model, adapter, method and
its options). Folders that are not ``checkpoint-<number>`` (e.g. a user's ``checkpoint-best``) are left alone.

The history is ``history.jsonl`` in the output folder, one line per optimizer step, appended as the run goes; a
resume drops the lines after its checkpoint's step (they are recomputed) and appends after them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

TRAINER_STATE_NAME = "trainer_state.json"
HISTORY_NAME = "history.jsonl"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
RESUME_KEYS = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "finetune",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "dataset",
    "dataset_split",
    "jsonl_name",
    "max_train_samples",
    "streaming",
    "shuffle_buffer",
    "resolution",
    "flip_labels",
    "method",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "num_processes",
)
"""Keys whose change would make a resumed run skip other batches or optimise another objective."""
GLOBAL_BATCH_KEYS = ("train_batch_size", "num_processes")


def numbered_checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders with a trainer state in ``output_dir``, by increasing step."""
    found = [p for p in output_dir.glob("checkpoint-*") if CHECKPOINT_NAME.fullmatch(p.name)]
    found = [p for p in found if (p / TRAINER_STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    """``which`` = 'latest' -> the highest ``checkpoint-<step>`` in ``output_dir`` (None if none); else a path."""
    if which != "latest":
        path = Path(which)
        if not (path / TRAINER_STATE_NAME).is_file():
            raise ValueError(
                f"--resume_from_checkpoint {which}: no {TRAINER_STATE_NAME} there; pass 'latest' or a "
                "checkpoint-<step> folder written by diffalign train."
            )
        return path
    found = numbered_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, run_config: dict) -> Path:
    """accelerate ``save_state`` into ``.checkpoint-<step>.tmp`` plus the trainer state, renamed to
    ``checkpoint-<step>``; the oldest numbered checkpoints beyond ``limit`` are removed. Collective call."""
    final, temporary = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": step, "config": run_config}
        (temporary / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if limit is not None:
            done = numbered_checkpoints(output_dir)
            for old in done[: max(0, len(done) - limit)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(checkpoint: Path, run_config: dict, keys: tuple[str, ...]) -> tuple[int, str | None]:
    """(global step of ``checkpoint``, a note when the run is converted) after comparing its saved config with
    ``run_config`` on ``keys``: a ValueError names every differing key. One difference converts exactly and is
    accepted: another process count at the same global micro-batch (train_batch_size x num_processes), since the
    processes' batches then cover the same records per micro-step (not for a stream, whose shares depend on it). A
    checkpoint written before configs were saved is accepted as it is."""
    state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    step, saved = int(state["global_step"]), state.get("config")
    if saved is None:
        return step, None
    differing = [k for k in keys if saved.get(k) != run_config.get(k)]
    if not differing:
        return step, None
    convertible = not saved.get("streaming")  # a stream's shares depend on the process count
    if convertible and set(differing) <= set(GLOBAL_BATCH_KEYS) and _global_batch(saved) == _global_batch(run_config):
        note = " and ".join(f"{k} {saved[k]} -> {run_config[k]}" for k in differing)
        return step, f"converted {note} (same global micro-batch of {_global_batch(saved)} records)"
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {run_config.get(k)!r}" for k in differing)
    raise ValueError(
        f"cannot resume from {checkpoint}: the run would continue differently ({details}). Resume with the "
        "checkpoint's values ("
        + (
            "a streamed run resumes with its process count: each process's share of the stream depends on it"
            if saved.get("streaming")
            else "a process count may change at the same train_batch_size x num_processes"
        )
        + "), or start a new run in another --output_dir."
    )


def _global_batch(config: dict) -> int:
    return config["train_batch_size"] * config["num_processes"]


class RunHistory:
    """``history.jsonl``: one JSON line per optimizer step, kept up to the resumed step and appended after it."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / HISTORY_NAME

    def start(self, step: int) -> None:
        """Keep the lines of steps <= ``step`` (0 for a new run), rewritten atomically."""
        kept = [line for line in self.read() if line["step"] <= step]
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(line) + "\n" for line in kept))
        os.replace(temporary, self.path)

    def append(self, line: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(text) for text in self.path.read_text().splitlines() if text.strip()]


def lora_hooks(accelerator, file_name: str = "unet_lora.safetensors") -> None:
    """Checkpoint only the LoRA weights (safetensors) instead of the whole UNet."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
            save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(output_dir, file_name))
        weights.clear()

    def load_hook(models, input_dir):
        unet = accelerator.unwrap_model(models.pop())
        result = set_peft_model_state_dict(unet, load_file(os.path.join(input_dir, file_name)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {input_dir} has LoRA keys this UNet lacks: {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
