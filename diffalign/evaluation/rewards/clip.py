"""CLIP-based rewards on transformers' ``CLIPModel``: CLIP score and PickScore.

- CLIP score (Hessel et al. 2021, "CLIPScore"), in the torchmetrics convention ``100 * max(cos(E_I, E_T), 0)``
  (Hessel et al. scale by 2.5 instead of 100); default model ``openai/clip-vit-large-patch14``.
- PickScore (Kirstain et al. 2023, "Pick-a-Pic"): ``logit_scale.exp() * cos(E_I, E_T)`` as in the official
  inference code; model ``yuvalkirstain/PickScore_v1``, processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.

Images go through the PIL backend of ``CLIPImageProcessor`` (shortest side to 224 px bicubic, centre crop 224,
CLIP mean/std), the resize the official code ran; prompts are truncated to the text model's 77 positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPModel, CLIPTokenizer

try:  # transformers >= 5: pick the PIL backend explicitly (the torchvision one resizes slightly differently)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is PIL/numpy-based
    from transformers import CLIPImageProcessor

from .base import PROCESSOR_PATTERNS, ImageBatch, RewardModel, resolve_source, to_pil_images


def load_clip_model(
    source: str, revision: str | None, device: str | torch.device, dtype: torch.dtype
) -> tuple[CLIPModel, str]:
    """A ``CLIPModel`` (safetensors only) from a folder or hub id, in eval mode, and its version string."""
    folder, version = resolve_source(source, revision, ("*.json", "*.txt", "model*.safetensors"))
    model = CLIPModel.from_pretrained(folder, use_safetensors=True).to(device, dtype).eval()
    return model, version


def load_clip_processing(source: str, revision: str | None) -> tuple[CLIPTokenizer, CLIPImageProcessor, str]:
    """The tokenizer and (PIL-backend) image processor saved in a folder or hub repo, and their version string."""
    folder, version = resolve_source(source, revision, PROCESSOR_PATTERNS)
    if not (Path(folder) / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{source} has no preprocessor_config.json; pass processor=FOLDER_OR_HUB_ID holding the CLIP processor "
            "(tokenizer + image processor, as CLIPProcessor.save_pretrained writes them)."
        )
    return CLIPTokenizer.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder), version


class CLIPRewardBase(RewardModel):
    """Shared by CLIP-based rewards: L2-normalised image and text embeddings from one ``CLIPModel``."""

    default_model = ""
    default_processor = None  # None: the processor files live beside the model

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, image_processor: CLIPImageProcessor, version: str):
        self.model, self.tokenizer, self.image_processor, self.version = model, tokenizer, image_processor, version

    @classmethod
    def load(
        cls,
        source: str | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        processor: str | None = None,
        processor_revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
    ) -> CLIPRewardBase:
        """The model from ``source`` (default: the published hub id); ``processor`` defaults to the published one
        for the published model and to ``source`` itself for any other folder or hub id."""
        source = source or cls.default_model
        model, version = load_clip_model(source, revision, device, dtype)
        if processor is None and source == cls.default_model and cls.default_processor:
            processor = cls.default_processor
        elif processor is None:
            processor, processor_revision = source, revision
        tokenizer, image_processor, processor_version = load_clip_processing(processor, processor_revision)
        if (processor, processor_revision) != (source, revision):
            version = f"{version} (processor {processor_version})"
        reward = cls(model, tokenizer, image_processor, version)
        reward.batch_size = batch_size or reward.batch_size
        return reward

    @property
    def device(self) -> torch.device:
        return self.model.device

    def embed_images(self, images: ImageBatch) -> torch.Tensor:
        """(n, D) L2-normalised, projected image embeddings."""
        pixels = self.image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        features = getattr(features, "pooler_output", features)  # transformers 5 returns a model output
        return torch.nn.functional.normalize(features.float(), dim=-1)  # (n, D)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """(n, D) L2-normalised, projected text embeddings; prompts truncated to the text model's positions."""
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )  # padded to the full length, so a prompt's tokens do not depend on its batch
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1)  # (n, D)

    def cosine(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        """(n,) cosine similarity of image i and prompt i."""
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1)


class CLIPScore(CLIPRewardBase):
    """CLIP score ``100 * max(cos, 0)`` (torchmetrics' ``CLIPScore``; Hessel et al. 2021 with weight 100)."""

    name = "clip"
    default_model = "openai/clip-vit-large-patch14"

    def score_batch(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        return (100.0 * self.cosine(images, prompts)).clamp(min=0.0)  # (n,)


class PickScore(CLIPRewardBase):
    """PickScore ``exp(logit_scale) * cos`` (Kirstain et al. 2023, the official inference code)."""

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def score_batch(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)  # (n,)
