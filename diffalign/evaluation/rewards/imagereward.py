"""ImageReward (Xu et al. 2023): a BLIP image-grounded text encoder and an MLP head, on transformers' BLIP.

``score = (MLP(h_[CLS]) - mu) / sigma`` where ``h_[CLS]`` is the first output token of the BLIP text encoder run on
the prompt (BERT tokens, padded to 35) with cross-attention to the BLIP ViT-L/16 image tokens, and ``mu, sigma``
are the published normalisation (0.16717..., 1.03333...). Images: shortest side to 224 px bicubic, centre crop 224,
CLIP mean/std, as ``ImageReward._transform``.

The ``image-reward`` package pins ``timm==0.6.13`` and ``fairscale==0.4.13`` and copies BLIP's code, so the
weights run here on ``BlipVisionModel`` + ``BlipTextModel``: ``scripts/convert_reward_checkpoint.py --kind
imagereward`` converts the published ``ImageReward.pt`` once into a folder (``config.json`` as ``BlipConfig``,
``model.safetensors`` with keys ``vision_model.*``, ``text_encoder.*``, ``mlp.*``, and the BERT tokenizer with
BLIP's added ``[DEC]``/``[ENC]`` tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import BertTokenizerFast, BlipConfig, BlipTextModel, BlipVisionModel

try:  # transformers >= 5: the PIL backend, as the published torchvision-on-PIL transform
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

from .aesthetic import AestheticMLP
from .base import ImageBatch, RewardModel, converted_source, resolve_source, to_pil_images

REWARD_MEAN = 0.16717362830052426  # ImageReward.mean
REWARD_STD = 1.0333394966054072  # ImageReward.std
MAX_TEXT_LENGTH = 35  # ImageReward.score: padding="max_length", max_length=35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageRewardModel(nn.Module):
    """BLIP vision encoder, BLIP text encoder (cross-attending to the image) and the reward MLP."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(config.text_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(n, 3, S, S) pixels, (n, L) tokens -> (n,) raw MLP outputs (before the published normalisation)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (n, 1 + P, D_v)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)  # (n, 1 + P)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state  # (n, L, D_t)
        return self.mlp(text[:, 0].float())  # (n,)


class ImageReward(RewardModel):
    """ImageReward-v1.0 score, normalised as published (about N(0, 1) over its training prompts)."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer: BertTokenizerFast, version: str):
        self.model, self.tokenizer, self.version = model, tokenizer, version
        size = model.vision_model.config.image_size
        self.image_processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            resample=Image.Resampling.BICUBIC,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )

    @classmethod
    def load(
        cls,
        source: str | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
    ) -> ImageReward:
        """A converted ImageReward folder or hub id (default: the folder the conversion script writes)."""
        folder, version = resolve_source(converted_source("imagereward", source), revision)
        if not (Path(folder) / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder} holds no model.safetensors; convert the published ImageReward.pt with "
                "`python scripts/convert_reward_checkpoint.py --kind imagereward --out FOLDER`."
            )
        model = ImageRewardModel(BlipConfig.from_pretrained(folder))
        model.load_state_dict(load_file(Path(folder) / "model.safetensors"))
        reward = cls(model.to(device, dtype).eval(), BertTokenizerFast.from_pretrained(folder), version)
        reward.batch_size = batch_size or reward.batch_size
        return reward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score_batch(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        dtype = next(self.model.parameters()).dtype
        raw = self.model(
            pixels.to(self.device, dtype),
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
        )  # (n,)
        return (raw - REWARD_MEAN) / REWARD_STD
