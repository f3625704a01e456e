"""Tiny random Stable Diffusion 1.5 / SDXL pipelines, built fully offline, for pipeline-level scheduler tests.

The component configs follow diffusers' own fast tests (``get_dummy_components`` in its
``tests/pipelines/stable_diffusion/test_stable_diffusion.py`` and ``stable_diffusion_xl/test_stable_diffusion_xl.py``);
the scheduler configs are the real models' ones. The CLIP tokenizer is a byte-level BPE with no merges, written to
disk here, so nothing is downloaded. This module is a helper, not a test module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

SD_SIZE = 32
"""Image side for the tiny SD pipeline (VAE factor 2: 16x16 latents)."""
SDXL_SIZE = 64
"""Image side for the tiny SDXL pipeline (32x32 latents, the UNet's ``sample_size``)."""

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TEXT_HIDDEN = 32
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
"""The Stable Diffusion 1.x / XL training noise schedule."""


def make_tokenizer(directory: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is every byte-level character, alone and word-final (``</w>``).

    With no merges every prompt tokenizes character by character, so any text works. The special tokens come last,
    as in the real CLIP vocabulary (so ``eos`` has the largest id). Files are written to ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE maps bytes to
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)


def text_config(tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    """diffusers' tiny CLIP text config (hidden 32, 5 layers, 4 heads), with the tokenizer's vocabulary and ids."""
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=tokenizer.model_max_length,
        **extra,
    )


def tiny_vae(block_out_channels: tuple[int, int] = (32, 64), norm_num_groups: int = 32) -> AutoencoderKL:
    """A two-level KL autoencoder (downsampling factor 2, 4 latent channels)."""
    return AutoencoderKL(
        block_out_channels=block_out_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=norm_num_groups,
    )


def sd_components(tmp_path: Path) -> dict:
    """Seeded components of a tiny SD 1.5 pipeline, with SD 1.5's ``PNDMScheduler`` config."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
    )
    torch.manual_seed(0)
    vae = tiny_vae()
    tokenizer = make_tokenizer(tmp_path / "tokenizer_src")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(tokenizer))
    scheduler = PNDMScheduler(**BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def sdxl_components(tmp_path: Path) -> dict:
    """Seeded components of a tiny SDXL pipeline, with SDXL's ``EulerDiscreteScheduler`` config.

    The UNet's cross-attention width is both text encoders' hidden states side by side (32 + 32 = 64); its added
    embedding takes six size / crop ids of ``addition_time_embed_dim`` 8 plus the second encoder's pooled
    projection (32): 6 * 8 + 32 = 80.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=SDXL_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,
        norm_num_groups=1,
    )
    torch.manual_seed(0)
    vae = tiny_vae()
    tokenizer = make_tokenizer(tmp_path / "tokenizer_src")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(tokenizer, hidden_act="gelu", projection_dim=TEXT_HIDDEN))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, hidden_act="gelu", projection_dim=TEXT_HIDDEN))
    scheduler = EulerDiscreteScheduler(
        **BETAS, timestep_spacing="leading", steps_offset=1, interpolation_type="linear", use_karras_sigmas=False
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )


def save_and_reload(pipe: DiffusionPipeline, directory: Path) -> DiffusionPipeline:
    """``save_pretrained`` to ``directory`` and load it back with ``DiffusionPipeline.from_pretrained``."""
    pipe.save_pretrained(str(directory))
    reloaded = DiffusionPipeline.from_pretrained(str(directory))
    reloaded.set_progress_bar_config(disable=True)
    return reloaded


def make_sd_pipeline(tmp_path: Path) -> StableDiffusionPipeline:
    """A tiny random SD 1.5 pipeline, saved under ``tmp_path`` and reloaded from there."""
    tmp_path = Path(tmp_path)
    return save_and_reload(StableDiffusionPipeline(**sd_components(tmp_path)), tmp_path / "sd")


def make_sdxl_pipeline(tmp_path: Path) -> StableDiffusionXLPipeline:
    """A tiny random SDXL pipeline, saved under ``tmp_path`` and reloaded from there."""
    tmp_path = Path(tmp_path)
    return save_and_reload(StableDiffusionXLPipeline(**sdxl_components(tmp_path)), tmp_path / "sdxl")
