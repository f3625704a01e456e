"""The embedded digits reward: log-probability of the prompted digit under the shipped digits classifier.

The CPU default reward (no download): ``score(images, prompts)[i] = log p(y_i | x_i)`` where ``y_i`` is the digit
named in prompt i (``prompt_to_label``) and ``p`` the softmax of ``DigitsClassifier``. It is at most 0; a correct,
clean digit scores near 0. The classifier sees (N, 1, 8, 8) images in model space [-1, 1], so images in [0, 1]
(the ``DigitsPipeline`` output, ``output_type="pt"`` or ``"pil"``) are mapped with ``2 x - 1``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...models.digits import ASSETS_DIR, IMAGE_SIZE, NULL_LABEL, load_digits_classifier, prompt_to_label
from .base import ImageBatch, RewardModel, content_hash, folder_version, refuse_pickle


class DigitsReward(RewardModel):
    """log p(prompted digit | image) under the embedded digits classifier (or one saved at ``path``)."""

    name = "digits"
    batch_size = 1024

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        if path is not None:
            refuse_pickle(str(path))
        self.classifier = load_digits_classifier(path).to(device)
        self.device = torch.device(device)
        if path is None:
            self.version = f"embedded:digits/classifier#sha256:{content_hash(ASSETS_DIR / 'classifier')}"
        else:
            self.version = folder_version(path)

    @classmethod
    def load(
        cls, source: str | None = None, device: str | torch.device = "cpu", revision: str | None = None, **kwargs
    ) -> DigitsReward:
        """The shipped classifier (``source=None``) or a ``DigitsClassifier`` folder; no hub, so no ``revision``."""
        if revision is not None:
            raise ValueError(f"the digits reward is embedded or a local folder; revision={revision!r} does not apply.")
        reward = cls(source, device)
        reward.batch_size = kwargs.pop("batch_size", reward.batch_size)
        if kwargs:
            raise TypeError(f"the digits reward takes no options {sorted(kwargs)}; it accepts batch_size only.")
        return reward

    def score_batch(self, images: ImageBatch, prompts: list[str]) -> torch.Tensor:
        labels = torch.tensor([prompt_to_label(prompt) for prompt in prompts])  # (n,)
        if (labels == NULL_LABEL).any():
            raise ValueError("the digits reward needs a digit in every prompt ('a handwritten 7'); got an empty one.")
        pixels = digits_model_space(images).to(self.device)  # (n, 1, 8, 8) in [-1, 1]
        log_probs = self.classifier(pixels).float().log_softmax(dim=-1)  # (n, 10)
        return log_probs.gather(1, labels.to(self.device)[:, None])[:, 0]  # (n,)


def digits_model_space(images: ImageBatch) -> torch.Tensor:
    """8x8 digit images (PIL, or (N, 1 or 3, 8, 8) in [0, 1]) -> (N, 1, 8, 8) float32 in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        arrays = [np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in images]
        images = torch.from_numpy(np.stack(arrays))[:, None] if arrays else torch.zeros(0, 1, IMAGE_SIZE, IMAGE_SIZE)
    if tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[1] not in (1, 3):
        raise ValueError(
            f"the digits reward scores 8x8 grey (or RGB) digits; got images of shape {tuple(images.shape)}."
        )
    grey = images.float().mean(dim=1, keepdim=True)  # (N, 1, 8, 8) in [0, 1]
    return grey * 2.0 - 1.0
