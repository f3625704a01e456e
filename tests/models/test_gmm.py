"""The analytic Gaussian mixture: exact score, exact ODE reference, UNet-like use in a diffusers pipeline."""

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

from diffalign.models.gmm import GaussianMixture
from diffalign.samplers import DPMSolverPPScheduler


@pytest.fixture(scope="module")
def digits_gmm():
    return GaussianMixture.from_digits()


def log_density(gmm, x, alpha, sigma):
    """log p_t(x) up to a constant, written independently of `GaussianMixture.eps` (full matrices)."""
    covs = torch.einsum("kde,ke,kfe->kdf", gmm.eigvecs, gmm.eigvals, gmm.eigvecs)
    cov_t = alpha**2 * covs + sigma**2 * torch.eye(gmm.config.dim, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(alpha * gmm.means, covariance_matrix=cov_t)
    return torch.logsumexp(dist.log_prob(x[:, None, :]) + gmm.log_weights, dim=-1)


@pytest.mark.parametrize("alpha", [0.05, 0.6, 0.999])
def test_eps_is_minus_sigma_times_the_score(digits_gmm, alpha):
    sigma = (1 - alpha**2) ** 0.5
    x0 = digits_gmm.sample_data(5, torch.Generator().manual_seed(0))
    x = (alpha * x0 + sigma * torch.randn(5, 64, dtype=torch.float64)).requires_grad_()
    (score,) = torch.autograd.grad(log_density(digits_gmm, x, alpha, sigma).sum(), x)
    torch.testing.assert_close(digits_gmm.eps(x.detach(), alpha, sigma), -sigma * score, rtol=1e-8, atol=1e-8)


def test_reference_solution_of_a_single_gaussian_is_exact():
    """For N(mu, s^2 I) the flow maps x_T to mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2)."""
    s2, mu = 0.3, torch.tensor([0.5, -1.0], dtype=torch.float64)
    gmm = GaussianMixture.from_parameters(mu[None], s2 * torch.eye(2, dtype=torch.float64)[None])
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rho_T = float(gmm.noise_schedule.rho(999.0))
    a_T, sig_T = 1 / (1 + rho_T**2) ** 0.5, rho_T / (1 + rho_T**2) ** 0.5
    exact = mu + s2**0.5 * (x_T - a_T * mu) / (a_T**2 * s2 + sig_T**2) ** 0.5
    torch.testing.assert_close(gmm.reference_solution(x_T, rho_T, 0.0), exact, rtol=0, atol=1e-8)


def test_data_samples_have_the_mixture_moments(digits_gmm):
    x = digits_gmm.sample_data(20000, torch.Generator().manual_seed(0))
    mean = (digits_gmm.log_weights.exp()[:, None] * digits_gmm.means).sum(0)
    assert (x.mean(0) - mean).abs().max() < 0.03


def test_save_load_round_trip_and_pipeline_use(digits_gmm, tmp_path):
    digits_gmm.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = GaussianMixture.from_pretrained(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x, 500).sample, digits_gmm(x, 500).sample)
    pipe = DDPMPipeline(unet=loaded, scheduler=DPMSolverPPScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (3, 8, 8, 1) and np.isfinite(images.images).all()


def test_bad_parameters_and_inputs(digits_gmm):
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture.from_parameters(torch.zeros(1, 2), -torch.eye(2)[None])
    with pytest.raises(ValueError, match="covariances have shape"):
        GaussianMixture.from_parameters(torch.zeros(2, 2), torch.eye(2)[None])
    with pytest.raises(ValueError, match="dim=64"):
        digits_gmm(torch.randn(2, 3, 8, 8), 10)
    with pytest.raises(ValueError, match="timesteps for a batch"):
        digits_gmm(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))


FINGERPRINT = (
    "import torch; torch.set_num_threads({}); from diffalign.models.gmm import GaussianMixture; "
    "from diffalign.samplers.side_info import model_fingerprint; "
    "print(model_fingerprint(GaussianMixture.from_digits()))"
)


@pytest.mark.slow  # two fresh interpreters importing torch + diffusers: ~20-45 s on 2 shared cores
def test_fingerprint_is_the_same_in_every_process_and_matches_the_shipped_side_information(digits_gmm):
    """Two processes with other BLAS / LAPACK thread counts (their eigenvectors differ in the last bits) agree, and
    the shipped EMS, DC ratios and learned grids of ``gmm`` record that fingerprint."""
    import json
    import subprocess
    import sys

    from diffalign.models.gmm import GMM_SCHEDULER_DIR
    from diffalign.samplers.side_info import model_fingerprint

    command = [[sys.executable, "-c", FINGERPRINT.format(n)] for n in (1, 3)]
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in command]
    outputs = [run.communicate(timeout=300) for run in runs]  # both at once: (stdout, stderr)
    printed = [out.strip().splitlines()[-1] if out.strip() else err[-2000:] for out, err in outputs]
    assert printed[0] == printed[1] == model_fingerprint(digits_gmm), printed
    for stem in ("dpm_solver_v3_ems", "dc_solver_ratios", "learned_grids"):
        assert json.loads((GMM_SCHEDULER_DIR / f"{stem}.json").read_text())["model_fingerprint"] == printed[0], stem
    moved = GaussianMixture.from_digits()
    moved.eigvecs.neg_()  # another (equally valid) eigenbasis: same mixture, same fingerprint
    assert model_fingerprint(moved) == printed[0]
    moved.covariances.mul_(1.01)
    assert model_fingerprint(moved) != printed[0]
