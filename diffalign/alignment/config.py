"""``TrainConfig``: every option of ``diffalign train``, as one dataclass whose fields carry their help text.

The command line is generated from the fields (TRL style): ``--name value`` for each field, grouped under
"model", "data" and "training" in ``--help``. Booleans accept ``--flag`` (true), ``--flag false`` and
``--flag true``. ``TrainConfig(...)`` validates itself, so the Python API and the CLI reject the same bad values.
"""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

EMBEDDED_MODEL = "digits-cond"


def _opt(default, help: str, group: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass
class TrainConfig:
    """Options of one preference-training run (Diffusion-DPO and the methods that share its loop)."""

    # model
    pretrained_model_name_or_path: str = _opt(
        EMBEDDED_MODEL,
        "diffusers pipeline (hub id or local folder; SD 1.x/2.x or SDXL) or the embedded 'digits-cond'",
        "model",
    )
    revision: str | None = _opt(None, "hub revision of the pipeline", "model")
    variant: str | None = _opt(None, "weights variant of the pipeline, e.g. 'fp16'", "model")
    finetune: str = _opt(
        "lora",
        "'lora': train LoRA adapters on the UNet, reference = the same UNet with adapters disabled (one UNet in "
        "memory); 'full': train every UNet weight against a frozen copy",
        "model",
        ("lora", "full"),
    )
    lora_rank: int = _opt(8, "LoRA rank r", "model")
    lora_alpha: float | None = _opt(None, "LoRA alpha (scale alpha / r); default: the rank", "model")
    lora_target_modules: str = _opt(
        "to_k,to_q,to_v,to_out.0", "comma-separated UNet module names that get LoRA adapters", "model"
    )
    gradient_checkpointing: bool = _opt(False, "recompute UNet activations in the backward pass", "model")
    attention: str = _opt(
        "default", "attention backend set with diffalign.kernels.set_attention_backend ('default': unchanged)", "model"
    )
    vae_dtype: str = _opt(
        "auto",
        "frozen VAE dtype: 'auto' = float32 for SDXL (its VAE overflows in fp16), else the mixed-precision dtype",
        "model",
        ("auto", "float32", "float16", "bfloat16"),
    )
    # data
    dataset: str | None = _opt(
        None,
        "Pick-a-Pic-style parquet file/folder or saved `datasets` folder (jpg_0, jpg_1, label_0, label_1, caption), "
        "or a folder with a JSONL of {prompt, chosen, rejected}; default for digits-cond: pairs of its own samples "
        "ranked by the digits classifier",
        "data",
    )
    dataset_split: str = _opt("train", "split to read from a `datasets` folder", "data")
    jsonl_name: str = _opt("pairs.jsonl", "name of the JSONL file inside a folder dataset", "data")
    max_train_samples: int | None = _opt(None, "keep only the first N pairs", "data")
    resolution: int | None = _opt(None, "training image side; default: the model's native size", "data")
    flip_labels: bool = _opt(
        False, "swap preferred and rejected (a sanity check: training should go backwards)", "data"
    )
    cache_dir: str | None = _opt(
        None,
        "folder for an on-disk cache of VAE latents and text embeddings (safetensors); later epochs and runs skip "
        "the encoders",
        "data",
    )
    dataloader_num_workers: int = _opt(0, "data-loading worker processes", "data")
    # training
    method: str = _opt("dpo", "preference method (see diffalign.alignment.methods.METHODS)", "training")
    beta: float = _opt(5000.0, "KL strength beta of Diffusion-DPO (the paper's 5000 for SD 1.5 / SDXL)", "training")
    output_dir: str = _opt("diffalign-dpo", "where checkpoints and the trained weights go", "training")
    seed: int = _opt(0, "seed of data order, timesteps, noise and LoRA initialisation", "training")
    train_batch_size: int = _opt(4, "preference pairs per process per micro-step", "training")
    gradient_accumulation_steps: int = _opt(1, "micro-steps per optimizer step", "training")
    max_train_steps: int = _opt(100, "optimizer steps", "training")
    learning_rate: float = _opt(1e-5, "AdamW learning rate", "training")
    scale_lr: bool = _opt(
        False, "multiply the learning rate by batch size x accumulation x processes (Diffusion-DPO recipe)", "training"
    )
    lr_scheduler: str = _opt(
        "constant", "diffusers.optimization.get_scheduler name: constant, linear, cosine, ...", "training"
    )
    lr_warmup_steps: int = _opt(0, "learning-rate warmup steps", "training")
    adam_beta1: float = _opt(0.9, "AdamW beta1", "training")
    adam_beta2: float = _opt(0.999, "AdamW beta2", "training")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay", "training")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", "training")
    max_grad_norm: float = _opt(1.0, "gradient-norm clipping (0 = off)", "training")
    mixed_precision: str = _opt("no", "mixed precision of the UNet forward", "training", ("no", "fp16", "bf16"))
    checkpointing_steps: int = _opt(
        500, "write a resumable checkpoint every N optimizer steps (0 = never)", "training"
    )
    checkpoints_total_limit: int | None = _opt(None, "keep at most N checkpoints (oldest removed)", "training")
    resume_from_checkpoint: str | None = _opt(
        None, "'latest' or a checkpoint folder: continue from that state", "training"
    )
    report_to: str = _opt("none", "accelerate tracker(s): none, tensorboard, wandb, all, ...", "training")
    tracker_project_name: str = _opt("diffalign", "project name given to the trackers", "training")
    cpu: bool = _opt(False, "train on CPU even when a GPU is present", "training")
    progress_bar: bool = _opt(True, "show a tqdm bar with the metrics", "training")

    def __post_init__(self):
        for name in (f.name for f in dataclasses.fields(self)):
            choices = self.__dataclass_fields__[name].metadata["choices"]
            if choices is not None and getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(choices)}.")
        positive = ("lora_rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("beta", "learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.checkpointing_steps < 0 or self.lr_warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("checkpointing_steps, lr_warmup_steps and max_grad_norm must be >= 0.")
        from .methods import get_method

        get_method(self.method)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--field`` option per ``TrainConfig`` field, grouped as model / data / training."""
    hints = typing.get_type_hints(TrainConfig)
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        kwargs = dict(default=f.default, help=f"{f.metadata['help']} (default: %(default)s)")
        if base is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=base, choices=f.metadata["choices"])
        groups[group_name].add_argument(f"--{f.name}", **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments (validated)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def parse_config(argv: list[str] | None = None, prog: str = "diffalign train") -> TrainConfig:
    """Parse command-line arguments into a ``TrainConfig``."""
    parser = argparse.ArgumentParser(prog=prog, description=TrainConfig.__doc__)
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))
