"""``TrainConfig``: every option of ``diffalign train``, as one dataclass whose fields carry their help text.

The command line is generated from the fields (TRL style): ``--name value`` for each field, grouped under
"model", "data" and "training" in ``--help``, then one group per preference method for its own options (the
method's ``Options`` dataclass, which ``TrainConfig`` inherits). Booleans accept ``--flag`` (true), ``--flag
false`` and ``--flag true``. ``TrainConfig(...)`` validates itself, so the Python API and the CLI reject the same
bad values.
"""

from dataclasses import dataclass
from typing import Literal

from ..options import option, parse_args, validate_choices
from .d3po import D3POOptions
from .dense_methods import DenseDPOOptions, PatchDPOOptions
from .methods import METHODS, DPOOptions, DROOptions, get_method, method_options
from .rankdpo import RankDPOOptions
from .rollout import RolloutOptions
from .smpo import SmPOOptions

EMBEDDED_MODEL = "digits-cond"


@dataclass
class RunOptions:
    """The options every preference method shares: model, data and training loop."""

    # model
    pretrained_model_name_or_path: str = option(
        EMBEDDED_MODEL,
        "diffusers pipeline (hub id or local folder; SD 1.x/2.x, SDXL, or the video pipelines TextToVideoSDPipeline "
        "and AnimateDiffPipeline), the embedded 'digits-cond', or the embedded video model 'digits-clips' (or a "
        "folder saved from a DigitsClipPipeline)",
        "model",
    )
    revision: str | None = option(None, "hub revision of the pipeline", "model")
    variant: str | None = option(None, "weights variant of the pipeline, e.g. 'fp16'", "model")
    finetune: Literal["lora", "full"] = option(
        "lora",
        "'lora': train LoRA adapters on the UNet, reference = the same UNet with adapters disabled (one UNet in "
        "memory); 'full': train every UNet weight against a frozen copy",
        "model",
    )
    lora_rank: int = option(8, "LoRA rank r", "model")
    lora_alpha: float | None = option(None, "LoRA alpha (scale alpha / r); default: the rank", "model")
    lora_target_modules: str = option(
        "to_k,to_q,to_v,to_out.0", "comma-separated UNet module names that get LoRA adapters", "model"
    )
    gradient_checkpointing: bool = option(False, "recompute UNet activations in the backward pass", "model")
    attention: str = option(
        "default", "attention backend set with diffalign.kernels.set_attention_backend ('default': unchanged)", "model"
    )
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = option(
        "auto",
        "frozen VAE dtype: 'auto' = float32 for SDXL (its VAE overflows in fp16), else the mixed-precision dtype",
        "model",
    )
    # data
    dataset: str | None = option(
        None,
        "Pick-a-Pic-style parquet file/folder or saved `datasets` folder (jpg_0, jpg_1, label_0, label_1, caption), "
        "or a folder with a JSONL of {prompt, chosen, rejected}; default for digits-cond: pairs of its own samples "
        "ranked by the digits classifier",
        "data",
    )
    dataset_split: str = option("train", "split to read from a `datasets` folder", "data")
    jsonl_name: str = option("pairs.jsonl", "name of the JSONL file inside a folder dataset", "data")
    max_train_samples: int | None = option(None, "keep only the first N pairs", "data")
    resolution: int | None = option(None, "training image side; default: the model's native size", "data")
    flip_labels: bool = option(
        False, "swap preferred and rejected (a sanity check: training should go backwards)", "data"
    )
    cache_dir: str | None = option(
        None,
        "folder for an on-disk cache of VAE latents and text embeddings (safetensors); later epochs and runs skip "
        "the encoders",
        "data",
    )
    image_root: str | None = option(
        None,
        "folder that image paths of the dataset may point into besides the dataset's own folder (absolute paths, "
        "'..', path-only parquet entries are refused otherwise)",
        "data",
    )
    dataloader_num_workers: int = option(0, "data-loading worker processes", "data")
    streaming: bool = option(
        False,
        "read a parquet/`datasets` table lazily instead of loading it (for data too large to copy): every process "
        "reads its own share of the files, shuffled through a buffer; use at least as many parquet files as "
        "processes x workers",
        "data",
    )
    shuffle_buffer: int = option(1000, "with --streaming: records in the shuffle buffer", "data")
    # training
    method: str = option("dpo", f"preference method, one of {sorted(METHODS)} (options: its group)", "training")
    output_dir: str = option("diffalign-dpo", "where checkpoints and the trained weights go", "training")
    seed: int = option(0, "seed of data order, timesteps, noise and LoRA initialisation", "training")
    train_batch_size: int = option(4, "preference pairs per process per micro-step", "training")
    gradient_accumulation_steps: int = option(1, "micro-steps per optimizer step", "training")
    max_train_steps: int = option(100, "optimizer steps", "training")
    learning_rate: float = option(1e-5, "AdamW learning rate", "training")
    scale_lr: bool = option(
        False, "multiply the learning rate by batch size x accumulation x processes (Diffusion-DPO recipe)", "training"
    )
    lr_scheduler: str = option(
        "constant", "diffusers.optimization.get_scheduler name: constant, linear, cosine, ...", "training"
    )
    lr_warmup_steps: int = option(0, "learning-rate warmup steps", "training")
    adam_beta1: float = option(0.9, "AdamW beta1", "training")
    adam_beta2: float = option(0.999, "AdamW beta2", "training")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay", "training")
    adam_epsilon: float = option(1e-8, "AdamW epsilon", "training")
    max_grad_norm: float = option(1.0, "gradient-norm clipping (0 = off)", "training")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "mixed precision of the UNet forward", "training")
    checkpointing_steps: int = option(
        500, "write a resumable checkpoint every N optimizer steps (0 = never)", "training"
    )
    checkpoints_total_limit: int | None = option(None, "keep at most N checkpoints (oldest removed)", "training")
    resume_from_checkpoint: str | None = option(
        None, "'latest' or a checkpoint folder: continue from that state", "training"
    )
    report_to: str = option("none", "accelerate tracker(s): none, tensorboard, wandb, all, ...", "training")
    tracker_project_name: str = option("diffalign", "project name given to the trackers", "training")
    cpu: bool = option(False, "train on CPU even when a GPU is present", "training")
    progress_bar: bool = option(True, "show a tqdm bar with the metrics", "training")
    # evaluation (the numbers of `diffalign eval`, logged during training)
    eval_steps: int = option(
        0, "every N optimizer steps, score the policy against its base model on the eval prompts (0 = never)", "eval"
    )
    eval_prompts: str | None = option(
        None, "text file with one prompt per line; default for digits-cond: the ten digit prompts", "eval"
    )
    eval_rewards: list[str] = option(("digits",), "reward models (diffalign.evaluation.rewards names)", "eval")
    eval_num_seeds: int = option(4, "seeds per eval prompt", "eval")
    eval_first_seed: int = option(1_000_000, "first eval seed (held out from training's seeds)", "eval")
    eval_sampler: str | None = option(None, "eval sampler; default: as `diffalign eval`", "eval")
    eval_nfe: int | None = option(None, "eval model evaluations per sample; default: as `diffalign eval`", "eval")
    eval_guidance_scale: float | None = option(None, "eval guidance scale; default: as `diffalign eval`", "eval")


@dataclass
class TrainConfig(
    DROOptions,
    D3POOptions,
    PatchDPOOptions,
    DenseDPOOptions,
    RankDPOOptions,
    SmPOOptions,
    DPOOptions,
    RolloutOptions,
    RunOptions,
):
    """Options of one preference-training run: the shared ones, then every registered method's own options."""

    def __post_init__(self):
        validate_choices(self)
        RolloutOptions.__post_init__(self)
        positive = ("lora_rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.checkpointing_steps < 0 or self.lr_warmup_steps < 0 or self.max_grad_norm < 0 or self.eval_steps < 0:
            raise ValueError("checkpointing_steps, lr_warmup_steps, max_grad_norm and eval_steps must be >= 0.")
        if self.eval_steps and self.eval_num_seeds < 1:
            raise ValueError(f"eval_num_seeds must be >= 1 with --eval_steps, got {self.eval_num_seeds}.")
        if self.streaming and self.max_train_samples is not None:
            raise ValueError("--max_train_samples needs a dataset of known length; drop it or --streaming.")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}.")
        method_options(get_method(self.method), self)  # the method's options validate themselves


def parse_config(argv: list[str] | None = None, prog: str = "diffalign train") -> TrainConfig:
    """Parse command-line arguments into a ``TrainConfig``."""
    return parse_args(TrainConfig, argv, prog)
