"""A small analytic Gaussian mixture (exact eps) for the learned-grid tests: 4 components in 16 dimensions."""

import numpy as np
import pytest
import torch

from diffalign.models.gmm import GaussianMixture
from diffalign.samplers.schedule import NoiseScheduleVP

SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


class ToyMixture:
    """``model(x, t)``, the scheduler ``config``, and ``noises(seed, n)`` -> (x_T, accurate ODE end point)."""

    def __init__(self):
        rng = np.random.default_rng(0)
        means = rng.normal(0, 0.8, (4, 16))
        covariances = np.stack([np.diag(rng.uniform(0.005, 0.1, 16)) for _ in range(4)])
        self.gmm = GaussianMixture.from_parameters(means, covariances, sample_size=4)
        self.config = {k: self.gmm.config[k] for k in SCHEDULE_KEYS}
        self.schedule = NoiseScheduleVP.from_config(self.config)
        self.rho_T = float(self.schedule.rho(self.schedule.t_max))

    def model(self, x, t):
        return self.gmm(x.double(), t).sample.to(x.dtype)

    def noises(self, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
        end = self.gmm.reference_solution(x.double(), self.rho_T, 0.0, rtol=1e-8, atol=1e-8)
        return x, end.float()


@pytest.fixture(scope="session")
def toy_mixture() -> ToyMixture:
    return ToyMixture()


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: tiny tensors on a shared 2-core machine are ~20x slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
