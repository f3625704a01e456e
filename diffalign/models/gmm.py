"""``gmm``: an analytic Gaussian-mixture "model" whose noise prediction is exact, with a UNet's call signature.

For data ``x_0 ~ sum_k w_k N(mu_k, S_k)`` and ``x_t = alpha_t x_0 + sigma_t eps``, the noised marginal is
``sum_k w_k N(alpha mu_k, alpha^2 S_k + sigma^2 I)``, so the exact noise prediction is
``eps(x_t) = -sigma grad log p_t(x_t) = sigma sum_k gamma_k(x_t) (alpha^2 S_k + sigma^2 I)^{-1} (x_t - alpha mu_k)``
with responsibilities ``gamma_k``. With ``S_k = U_k diag(d_k) U_k^T`` every inverse is diagonal in ``U_k``.

Because the model is exact, a sampler's distance to an accurate solution of the probability-flow ODE is pure solver
error; ``reference_solution`` gives that solution to 1e-10 (``evaluation.reference.probability_flow_solution``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ..evaluation.reference import probability_flow_solution
from ..samplers import NoiseScheduleVP

GMM_SCHEDULER_DIR = Path(__file__).resolve().parent.parent / "assets" / "gmm" / "scheduler"
"""The embedded mixture's scheduler folder: its schedule config and learned side information (EMS, DC ratios)."""


@dataclass
class GMMOutput(BaseOutput):
    sample: torch.Tensor  # (B, *sample_shape), same as the input


class GaussianMixture(ModelMixin, ConfigMixin):
    """Exact epsilon-prediction of a Gaussian mixture under the VP schedule given by the config's beta keys.

    Call like a ``UNet2DModel``: ``gmm(x_t, t).sample`` with ``x_t`` of shape (B, C, H, W) (or any shape whose
    trailing size is ``dim``) and ``t`` a scalar or (B,) training timestep (float allowed). Parameters are buffers,
    so ``save_pretrained`` / ``from_pretrained`` store them as safetensors.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        num_components: int = 1,
        dim: int = 2,
        sample_size: int | None = None,
        in_channels: int = 1,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__()
        if sample_size is not None and in_channels * sample_size**2 != dim:
            raise ValueError(f"in_channels * sample_size^2 = {in_channels * sample_size**2} must equal dim={dim}.")
        K, D = num_components, dim
        self.register_buffer("means", torch.zeros(K, D, dtype=torch.float64))  # (K, D)
        self.register_buffer("covariances", torch.eye(D, dtype=torch.float64).repeat(K, 1, 1))  # (K, D, D) S_k
        self.register_buffer("eigvecs", torch.eye(D, dtype=torch.float64).repeat(K, 1, 1))  # (K, D, D) columns
        self.register_buffer("eigvals", torch.ones(K, D, dtype=torch.float64))  # (K, D)
        self.register_buffer("log_weights", torch.full((K,), -math.log(K), dtype=torch.float64))  # (K,)
        self.noise_schedule = NoiseScheduleVP.from_config(self.config)

    @classmethod
    def from_parameters(cls, means, covariances, weights=None, **config) -> GaussianMixture:
        """Build from ``means`` (K, D), ``covariances`` (K, D, D) symmetric positive definite, ``weights`` (K,)."""
        means = torch.as_tensor(np.asarray(means, dtype=np.float64))
        covs = torch.as_tensor(np.asarray(covariances, dtype=np.float64))
        K, D = means.shape
        if covs.shape != (K, D, D):
            raise ValueError(f"covariances have shape {tuple(covs.shape)}, expected ({K}, {D}, {D}).")
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if weights.shape != (K,) or torch.any(weights <= 0):
            raise ValueError(f"weights must be {K} positive numbers, got {weights.tolist()}.")
        covs = 0.5 * (covs + covs.transpose(1, 2))
        eigvals, eigvecs = torch.linalg.eigh(covs)
        if torch.any(eigvals <= 0):
            raise ValueError("covariances must be positive definite (add a small multiple of the identity).")
        model = cls(num_components=K, dim=D, **config)
        model.means.copy_(means)
        model.covariances.copy_(covs)
        model.eigvecs.copy_(eigvecs)
        model.eigvals.copy_(eigvals)
        total = weights.sum().item()
        model.log_weights.copy_(torch.tensor([math.log(w / total) for w in weights.tolist()], dtype=torch.float64))
        return model

    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        """What defines the mixture, for ``samplers.side_info.model_fingerprint``: means, covariances, weights.

        Not the eigendecomposition: LAPACK's eigenvectors differ in their last bits with the thread count (and in
        the repeated eigenvalues of the digits' constant pixels, in direction), so hashing them gave every process
        its own fingerprint.
        """
        return {"means": self.means, "covariances": self.covariances, "log_weights": self.log_weights}

    @classmethod
    def from_digits(cls, pixel_floor: float = 0.05, **config) -> GaussianMixture:
        """One Gaussian per class of scikit-learn's 8x8 digits (1,797 images scaled to [-1, 1]), fitted from the data.

        Covariances are the classes' empirical ones plus ``pixel_floor^2 I``, so every component is full rank and
        the score is smooth down to ``t = 0``. Samples are (B, 1, 8, 8) images that look like blurry digits.
        """
        from sklearn.datasets import load_digits

        data = load_digits()
        pixels = data.images.reshape(len(data.images), -1).astype(np.int64)  # (1797, 64) integers 0..16
        means, covs, weights = [], [], []
        for k in range(10):
            a = pixels[data.target == k]  # (n, 64); x = a / 8 - 1 in [-1, 1]
            n, s = len(a), a.sum(0)  # (64,) exact integer sums
            means.append((s - 8 * n) / (8 * n))
            # unbiased covariance of x = (n sum a a^T - s s^T) / (64 n (n - 1)): integers, then one rounding per
            # entry, so the bits do not depend on BLAS threads or CPU (np.cov's matrix product does)
            scatter = n * np.einsum("ni,nj->ij", a, a) - np.outer(s, s)  # (64, 64) exact
            covs.append(scatter / (64 * n * (n - 1)) + pixel_floor**2 * np.eye(64))
            weights.append(n)
        config.setdefault("sample_size", 8)
        return cls.from_parameters(np.stack(means), np.stack(covs), np.asarray(weights, float), **config)

    def eps(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Exact noise prediction for flat ``x`` (B, D) at noise level ``alpha``, ``sigma`` (scalars or (B,))."""
        x = x.to(torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)  # (B or 1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        var = alpha**2 * self.eigvals + sigma**2  # (B or 1, K, D) eigenvalues of alpha^2 S_k + sigma^2 I
        diff = x[:, None, :] - alpha * self.means  # (B, K, D)
        z = torch.einsum("bkd,kde->bke", diff, self.eigvecs)  # (B, K, D) coordinates in each eigenbasis
        log_prob = -0.5 * ((z**2 / var).sum(-1) + torch.log(var).sum(-1))  # (B, K), constants dropped
        gamma = torch.softmax(log_prob + self.log_weights, dim=-1)  # (B, K)
        precision_diff = torch.einsum("bke,kde->bkd", z / var, self.eigvecs)  # (B, K, D)
        return sigma[:, :, 0] * torch.einsum("bk,bkd->bd", gamma, precision_diff)  # (B, D)

    def forward(self, sample: torch.Tensor, timestep, *args, return_dict: bool = True, **kwargs):
        """UNet-style call: ``sample`` (B, ...) with ``prod(...) = dim``, ``timestep`` scalar or (B,)."""
        B = sample.shape[0]
        if sample[0].numel() != self.config.dim:
            raise ValueError(f"sample has {sample[0].numel()} values per item, this model has dim={self.config.dim}.")
        t = torch.as_tensor(timestep).detach().reshape(-1).cpu().double().numpy()
        if len(t) not in (1, B):
            raise ValueError(f"got {len(t)} timesteps for a batch of {B}.")
        alpha, sigma = self.noise_schedule.alpha_sigma(t)
        out = self.eps(sample.reshape(B, -1), alpha, sigma).reshape(sample.shape).to(sample.dtype)
        return GMMOutput(sample=out) if return_dict else (out,)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws from the data distribution, (n, D) float64."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.config.dim, generator=generator, dtype=torch.float64)
        scaled = torch.einsum("nde,ne->nd", self.eigvecs[k], z * self.eigvals[k].sqrt())
        return self.means[k] + scaled

    def reference_solution(
        self, x_T: torch.Tensor, rho_T: float, rho_end: float, rtol: float = 1e-10, atol: float = 1e-10
    ) -> torch.Tensor:
        """Probability-flow ODE solution from ``x_T`` at diffusers sigma ``rho_T`` to ``rho_end`` (0 allowed).

        dopri5 in float64 on ``dy/du = eps`` (see ``probability_flow_solution``); the exact eps needs no
        timestep, so the solve is exact up to the tolerances. Returns a float64 tensor shaped like ``x_T``.
        """

        def eps_fn(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            alpha = 1.0 / torch.sqrt(1.0 + u**2)
            return self.eps(x.reshape(x.shape[0], -1), alpha, u * alpha).reshape(x.shape)

        return probability_flow_solution(eps_fn, x_T, rho_T, rho_end, rtol=rtol, atol=atol)
