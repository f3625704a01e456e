"""DPM-Solver++: the exponential-integrator ODE solver on the data prediction (Lu et al. 2022b).

2M / 3M (multistep, Alg. 2 and its third-order extension) and 2S / 3S (singlestep, Alg. 1), with dynamic
thresholding for pixel-space models. The data prediction is bounded, which keeps guided sampling stable.
"""

from __future__ import annotations

from .exponential_integrator import DPMSolverBase, lambda_step, phi_functions


def data_coefficients(alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float):
    """``(c_x, a_1, a_2, a_3)`` of the data-form update ``x_t = (sigma_t/sigma_s) x_s - alpha_t sum_k phi_k(-h) D_k``.

    Lu et al. 2022b, Eq. (8) and its Taylor terms: ``-alpha_t phi_1(-h) = alpha_t (1 - e^{-h})``. At the clean
    end ``h = inf`` and the first-order step returns the data prediction.
    """
    h = lambda_step(alpha_s, sigma_s, alpha_t, sigma_t)
    phi_1, phi_2, phi_3 = phi_functions(-h)
    return sigma_t / sigma_s, alpha_t * phi_1, alpha_t * phi_2, alpha_t * phi_3


class DPMSolverPPScheduler(DPMSolverBase):
    """DPM-Solver++ (data prediction) as a diffusers scheduler.

    ``pipe.scheduler = DPMSolverPPScheduler.from_config(pipe.scheduler.config)``. ``solver_order=2`` with
    ``solver_mode='multistep'`` is DPM-Solver++(2M), the recommended default for guided sampling; order 3 for
    unconditional models; ``solver_mode='singlestep'`` gives 2S / 3S.
    """

    predicts_data = True

    def coefficients(self, alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float):
        return data_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
