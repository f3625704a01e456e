"""Real FID for ``diffalign bench --fid inception``: torch-fidelity's InceptionV3 from a weights file the user has.

Nothing is downloaded: the network weights come from ``--inception-weights`` (torch-fidelity's
``pt_inception-2015-12-05`` state dict) and the real-data statistics from ``--fid-stats`` (an ``.npz`` with ``mu``
(2048,) and ``sigma`` (2048, 2048), the pytorch-fid format). torch-fidelity needs torchvision, so it lives in the
``eval`` extra (``pip install 'diffalign[eval]'``); the CPU CI never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .frechet import feature_statistics, frechet_distance


def load_fid_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from an ``.npz`` (no pickles) with 2048-D Inception statistics."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--fid-stats {path} does not exist; pass an .npz with 'mu' and 'sigma' arrays.")
    with np.load(path, allow_pickle=False) as stats:
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"{path} has keys {sorted(stats)}; it needs 'mu' (2048,) and 'sigma' (2048, 2048).")
        mu, sigma = stats["mu"], stats["sigma"]
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(f"{path}: mu {mu.shape}, sigma {sigma.shape}; expected (2048,) and (2048, 2048).")
    return mu, sigma


def inception_extractor(weights_path: str | Path):
    """torch-fidelity's FID InceptionV3 with the user's weights; clear errors when either is missing."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"--inception-weights {weights_path} does not exist. Download torch-fidelity's "
            "pt_inception-2015-12-05 weights on a machine with internet access and pass the file's path."
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # ImportError, or torchvision failing to load its operators
        raise ImportError(
            "--fid inception needs torch-fidelity (and a torchvision that matches your torch): "
            f"pip install 'diffalign[eval]' ({type(err).__name__}: {err})"
        ) from err
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path)
    )
    return extractor.eval()


def inception_fid_fn(
    weights_path: str | Path, stats_path: str | Path, to_images: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], float]:
    """``fid(samples)``: ``to_images`` maps samples to (B, C, H, W) in [-1, 1]; FID against ``stats_path``."""
    mu_real, sigma_real = load_fid_stats(stats_path)
    extractor = inception_extractor(weights_path)

    @torch.no_grad()
    def fid(samples: torch.Tensor) -> float:
        images = to_images(samples).clamp(-1, 1)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        uint8 = ((images + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W), what torch-fidelity expects
        features = torch.cat([extractor(chunk)[0] for chunk in uint8.split(64)])  # (B, 2048)
        return frechet_distance(*feature_statistics(features), mu_real, sigma_real)

    return fid
