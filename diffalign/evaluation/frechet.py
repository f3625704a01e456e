"""Fréchet distances between feature statistics, and FD-digits for the embedded digits models.

The Fréchet distance between Gaussians N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID, Heusel et al. 2017,
eq. 6) is

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2)).

The trace term is computed from symmetric eigen-decompositions in float64: S1^(1/2) from ``eigh(S1)``, then the
eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), clipped at 0, whose square roots sum to the trace.
This equals tr((S1 S2)^(1/2)) of the usual ``scipy.linalg.sqrtm`` formula without its complex round-off.

"FD-digits" is that distance in the 64-D penultimate feature space of ``DigitsClassifier``, against the statistics
of all 1,797 real digits, computed from the data when first needed (never stored). Its small-sample bias is of the
order of the real-vs-real floor that ``digits_fd_floor`` measures; report that floor beside any FD-digits number.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..models.digits import DigitsClassifier, load_digits_classifier, load_digits_data


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)) in float64, with the unbiased (N - 1) covariance."""
    features = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigh, negative round-off eigenvalues -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID's formula, Heusel et al. 2017)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            "both sides need (D,) means and (D, D) covariances from the same feature space."
        )
    sqrt_sigma1 = _sqrtm_psd(sigma1)  # (D, D)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # (D, D), symmetric PSD
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


@torch.no_grad()
def digits_features(
    images: torch.Tensor, classifier: DigitsClassifier | None = None, batch_size: int = 1024
) -> torch.Tensor:
    """(N, 1, 8, 8) images in [-1, 1] (model space) -> (N, 64) classifier features, on CPU in float32."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(
            f"images must be (N, 1, 8, 8) in [-1, 1], got shape {tuple(images.shape)}; use output_type='latent' "
            "from DigitsPipeline, or map [0, 1] images with x * 2 - 1."
        )
    classifier = _default_classifier() if classifier is None else classifier
    device, dtype = classifier.device, classifier.dtype
    chunks = [classifier.features(chunk.to(device, dtype)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(chunks)  # (N, D)


@lru_cache(maxsize=1)
def _default_classifier() -> DigitsClassifier:
    return load_digits_classifier()


@lru_cache(maxsize=1)
def real_digits_statistics() -> tuple[np.ndarray, np.ndarray]:
    """Feature mean (D,) and covariance (D, D) of all 1,797 real digits under the shipped classifier."""
    images, _ = load_digits_data("all")
    return feature_statistics(digits_features(images))


def fd_digits(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """FD-digits of (N, 1, 8, 8) generated images in [-1, 1] against all real digits.

    With the shipped classifier (``classifier=None``) the real statistics are cached; a custom classifier has its
    real statistics recomputed on each call.
    """
    if classifier is None:
        mu_real, sigma_real = real_digits_statistics()
    else:
        mu_real, sigma_real = feature_statistics(digits_features(load_digits_data("all")[0], classifier))
    return frechet_distance(*feature_statistics(digits_features(images, classifier)), mu_real, sigma_real)


def digits_fd_floor(seed: int = 0) -> float:
    """FD-digits between two random halves (898 vs 899 images) of the real digits: the estimator's noise floor.

    FD's small-sample bias falls like 1/n1 + 1/n2, so n generated samples against all 1,797 real ones sit on a lower
    floor, about (1/n + 1/1797) / (2/898) of this one (0.7x for n = 1000); and since the shipped models train on
    all 1,797 digits, samples close to training images can score below it. The floor also varies by about +-2
    with ``seed``.
    """
    images, _ = load_digits_data("all")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    features = digits_features(images[order])  # (N, D)
    half = len(features) // 2
    return frechet_distance(*feature_statistics(features[:half]), *feature_statistics(features[half:]))
