"""LAION aesthetic predictor v2: an MLP on L2-normalised CLIP ViT-L/14 image embeddings (prompts are ignored).

Schuhmann, "improved-aesthetic-predictor" (``sac+logos+ava1-l14-linearMSE``): ``score = MLP(E_I / |E_I|)`` with
``E_I`` the projected image embedding of ``openai/clip-vit-large-patch14`` (768-D), on a 1-10 scale. The published
MLP is a pickled ``.pth``; ``scripts/convert_reward_checkpoint.py --kind aesthetic --checkpoint FILE`` writes it
once as ``aesthetic_mlp.safetensors``. The same MLP shape (no activations between its linear layers) is
ImageReward's head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .base import ImageBatch, converted_source, folder_version, refuse_pickle
from .clip import CLIPRewardBase, load_clip_model, load_clip_processing

MLP_FILE = "aesthetic_mlp.safetensors"


class AestheticMLP(nn.Module):
    """``Linear(D, 1024) -> Linear(128) -> Linear(64) -> Linear(16) -> Linear(1)`` with dropouts, no activations,
    as published (keys ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n, D) features -> (n,) scores."""
        return self.layers(features)[:, 0]


class AestheticPredictor(CLIPRewardBase):
    """LAION aesthetic score of each image (its prompt is not used)."""

    name = "aesthetic"
    default_model = "openai/clip-vit-large-patch14"

    @classmethod
    def load(
        cls,
        source: str | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        clip: str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
    ) -> AestheticPredictor:
        """MLP from ``source`` (a folder with ``aesthetic_mlp.safetensors`` or that file; default: the converted
        folder); CLIP from ``clip``, else from ``source`` when it holds a CLIP model, else the published hub id
        (``revision`` pins it)."""
        source = converted_source("aesthetic", source)
        refuse_pickle(source)
        mlp_file = Path(source).expanduser()
        mlp_file = mlp_file if mlp_file.suffix == ".safetensors" else mlp_file / MLP_FILE
        if not mlp_file.is_file():
            raise FileNotFoundError(
                f"no {MLP_FILE} at {source}; convert the published sac+logos+ava1-l14-linearMSE.pth once with "
                "`python scripts/convert_reward_checkpoint.py --kind aesthetic --checkpoint FILE --out FOLDER`."
            )
        if clip is None:
            clip = str(mlp_file.parent) if (mlp_file.parent / "config.json").is_file() else cls.default_model
        model, clip_version = load_clip_model(clip, revision, device, dtype)
        tokenizer, image_processor, _ = load_clip_processing(clip, revision)
        weights = load_file(mlp_file)
        mlp = AestheticMLP(weights["layers.0.weight"].shape[1])
        mlp.load_state_dict(weights)
        if mlp.layers[0].in_features != model.config.projection_dim:
            raise ValueError(
                f"the aesthetic MLP takes {mlp.layers[0].in_features}-D features but the CLIP model {clip} gives "
                f"{model.config.projection_dim}-D ones; pair the MLP with the CLIP it was trained on (ViT-L/14)."
            )
        mlp_version = folder_version(mlp_file.parent, (mlp_file.name, "reward_source.json"))
        reward = cls(model, tokenizer, image_processor, f"mlp {mlp_version}; clip {clip_version}")
        reward.mlp = mlp.to(device).eval()
        reward.batch_size = batch_size or reward.batch_size
        return reward

    def score_batch(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        return self.mlp(self.embed_images(images))  # (n,)
