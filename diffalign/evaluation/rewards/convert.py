"""One-time conversion of reward checkpoints published as pickles (``.pt`` / ``.pth``) into safetensors folders.

The pickle is read once with ``torch.load(weights_only=True)`` (tensors and plain containers only, no code), and
the folder is written atomically (temporary folder + rename) with a ``reward_source.json`` recording where the
checkpoint came from and its sha256. ``scripts/convert_reward_checkpoint.py`` is the command line.

- ``hpsv2.1``: the open_clip state dict of ``HPS_v2.1_compressed.pt`` -> ``open_clip_model.safetensors`` +
  ``open_clip_config.json`` (ViT-H-14, HPS's longest-side resize), an open_clip ``local-dir`` folder.
- ``imagereward``: ``ImageReward.pt`` (BLIP in the original Salesforce naming + MLP) -> transformers BLIP names
  (``vision_model.*``, ``text_encoder.*``) + ``mlp.*``, a ``BlipConfig`` from ``med_config.json``, the BERT tokenizer.
- ``aesthetic``: the MLP of ``sac+logos+ava1-l14-linearMSE.pth`` -> ``aesthetic_mlp.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

from .aesthetic import MLP_FILE

VIT_H_14 = {  # open_clip model_configs/ViT-H-14.json
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
HPS_PREPROCESS = {  # hpsv2 create_model_and_transforms(light_augmentation=True): ResizeMaxSize(224, fill=0)
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "longest",
    "fill_color": 0,
}
# original BLIP ViT (models/BLIP/vit.py) -> transformers BlipVisionModel, as transformers' convert_blip script
BLIP_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def load_pickled_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read with ``torch.load(weights_only=True)``; unwraps ``state_dict`` / ``module.``."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (got {type(state).__name__}).")
    return {key.removeprefix("module."): value for key, value in state.items()}


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hps_files(state: dict[str, torch.Tensor], model_cfg: dict | None = None) -> tuple[dict, dict]:
    """HPSv2.1 open_clip state dict -> ({file: tensors}, {file: json})."""
    config = {"model_cfg": model_cfg or VIT_H_14, "preprocess_cfg": HPS_PREPROCESS}
    return {"open_clip_model.safetensors": state}, {"open_clip_config.json": config}


def blip_vision_key(key: str) -> str:
    """An original BLIP ViT key (after ``visual_encoder.``) -> its ``BlipVisionModel`` key."""
    for pattern, replacement in BLIP_VISION_RENAMES:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    raise ValueError(f"unexpected BLIP vision key {key!r}; is this an ImageReward (BLIP ViT) checkpoint?")


def imagereward_files(state: dict[str, torch.Tensor], med_config: dict) -> tuple[dict, dict, list[str]]:
    """``ImageReward.pt`` + ``med_config.json`` -> ({file: tensors}, {file: json}, dropped keys).

    The vision config is read off the tensors (width, depth, patch, image size; 64-wide heads as BLIP's ViT-B/L);
    the text config from ``med_config`` with ``encoder_hidden_size`` = the vision width.
    """
    tensors, dropped = {}, []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            tensors["vision_model." + blip_vision_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            tensors["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            tensors[key] = value
        else:
            dropped.append(key)  # vision_proj / text_proj / buffers: unused by the reward
    width = tensors["vision_model.embeddings.position_embedding"].shape[-1]
    patch = tensors["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    num_patches = tensors["vision_model.embeddings.position_embedding"].shape[1] - 1
    depth = len({key.split(".")[3] for key in tensors if key.startswith("vision_model.encoder.layers.")})
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=width // 64,
        image_size=round(num_patches**0.5) * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP vit.py: partial(nn.LayerNorm, eps=1e-6)
        hidden_act="gelu",
    )
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_act=med_config.get("hidden_act", "gelu"),
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=None,
        sep_token_id=None,
    )
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    return {"model.safetensors": tensors}, {"config.json": config.to_dict()}, dropped


def aesthetic_files(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The aesthetic MLP's state dict (keys ``layers.*``) -> ({file: tensors}, {})."""
    if "layers.0.weight" not in state:
        raise ValueError(f"expected the aesthetic MLP's keys layers.0.weight ...; got {sorted(state)[:5]} ...")
    return {MLP_FILE: {key: value for key, value in state.items() if key.startswith("layers.")}}, {}


def write_folder(
    out: str | Path,
    tensors: dict[str, dict[str, torch.Tensor]],
    jsons: dict[str, dict],
    source: dict,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write safetensors + JSON files (+ ``extra(folder)``) into ``out`` atomically; ``source`` goes to
    ``reward_source.json``. An existing ``out`` is replaced only once the new folder is complete."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, state in tensors.items():
            save_file({key: value.contiguous().clone() for key, value in state.items()}, tmp / name)
        for name, content in {**jsons, "reward_source.json": source}.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
