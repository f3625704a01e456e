"""HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip ViT-H-14 fine-tuned on human preferences.

``score = cos(E_I, E_T)``: the diagonal of ``image_features @ text_features.T`` with L2-normalised open_clip
features and no logit scale, as ``hpsv2.img_score.score`` (about 0.2-0.35; compare scores within one prompt). The
published checkpoint (``xswu/HPSv2``, ``HPS_v2.1_compressed.pt``) is pickled; ``scripts/convert_reward_checkpoint.py
--kind hpsv2.1`` converts it once into an open_clip ``local-dir`` folder (``open_clip_config.json`` +
``open_clip_model.safetensors``), which ``open_clip.create_model("local-dir:...")`` reads.

The ``hpsv2`` package pins ``protobuf<4``, ``pytest==7.2.0`` and ``pytest-split==0.8.0`` and carries its own copy
of open_clip, so the model runs on the maintained ``open-clip-torch`` (the ``[eval]`` extra). Its validation
transform (``light_augmentation=True``) is re-stated here in torch: to tensor, resize the longest side to 224 px
(bicubic, antialiased), pad to a centred square with 0, normalise with the CLIP mean/std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import ImageBatch, RewardModel, converted_source, resolve_source, to_pil_images

IMAGE_SIZE = 224  # ViT-H-14 vision_cfg.image_size
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip OPENAI_DATASET_STD


def hps_preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One RGB image -> (3, size, size): HPSv2's ``ToTensor, ResizeMaxSize(size, fill=0), Normalize``."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    height, width = pixels.shape[1:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_size = (round(height * scale), round(width * scale))
        pixels = F.interpolate(pixels[None], size=new_size, mode="bicubic", align_corners=False, antialias=True)[0]
    pad_h, pad_w = size - pixels.shape[1], size - pixels.shape[2]
    pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (pixels - mean) / std  # (3, size, size)


def import_open_clip():
    """``open_clip``, or an error naming the extra that installs it."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "the hpsv2.1 reward runs on open_clip, which is not installed; `pip install diffalign[eval]` (or "
            "`pip install open-clip-torch`, which needs a torchvision built for your torch)."
        ) from error
    return open_clip


class HPSv21(RewardModel):
    """HPSv2.1 score: cosine of open_clip ViT-H-14 image and text features after the HPS fine-tune."""

    name = "hpsv2.1"

    def __init__(self, model, tokenizer, version: str):
        self.model, self.tokenizer, self.version = model, tokenizer, version
        image_size = model.visual.image_size
        self.image_size = image_size[0] if isinstance(image_size, tuple | list) else image_size

    @classmethod
    def load(
        cls,
        source: str | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        batch_size: int | None = None,
    ) -> HPSv21:
        """A converted open_clip folder or hub id (default: the folder the conversion script writes)."""
        folder, version = resolve_source(converted_source("hpsv2.1", source), revision)
        if not (Path(folder) / "open_clip_model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder} holds no open_clip_model.safetensors; convert the published HPS_v2.1_compressed.pt with "
                "`python scripts/convert_reward_checkpoint.py --kind hpsv2.1 --out FOLDER`."
            )
        open_clip = import_open_clip()
        model = open_clip.create_model(f"local-dir:{folder}", device=device).eval()
        reward = cls(model, open_clip.get_tokenizer(f"local-dir:{folder}"), version)
        reward.batch_size = batch_size or reward.batch_size
        return reward

    def score_batch(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = torch.stack([hps_preprocess(image, self.image_size) for image in to_pil_images(images)])
        image_features = self.model.encode_image(pixels.to(device), normalize=True)  # (n, D)
        text_features = self.model.encode_text(self.tokenizer(prompts).to(device), normalize=True)  # (n, D)
        return (image_features * text_features).sum(dim=-1).float()  # (n,) the diagonal of I @ T^T
