"""DPM-Solver: the exponential-integrator ODE solver on the noise prediction (Lu et al. 2022a, NeurIPS).

Orders 1-3, multistep or singlestep (DPM-Solver-1/2/3, Alg. 1-2 of the paper; DPM-Solver-1 is DDIM). Prefer
``DPMSolverPPScheduler`` for guided sampling; this one is the paper's original and the reference the others build on.
"""

from __future__ import annotations

from .exponential_integrator import DPMSolverBase, lambda_step, phi_functions


def noise_coefficients(alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float):
    """``(c_x, a_1, a_2, a_3)`` of the noise-form update ``x_t = (alpha_t/alpha_s) x_s - sigma_t sum_k phi_k(h) D_k``.

    Lu et al. 2022a, Eq. (3.7) and the Taylor terms of App. B. At the clean end (``sigma_t = 0``) only the first
    order is defined, with ``sigma_t (e^h - 1) = alpha_t sigma_s / alpha_s``, so the step returns the data
    prediction exactly.
    """
    h = lambda_step(alpha_s, sigma_s, alpha_t, sigma_t)
    c_x = alpha_t / alpha_s
    if sigma_t == 0.0:
        return c_x, alpha_t * sigma_s / alpha_s, float("nan"), float("nan")
    phi_1, phi_2, phi_3 = phi_functions(h)
    return c_x, sigma_t * phi_1, sigma_t * phi_2, sigma_t * phi_3


class DPMSolverScheduler(DPMSolverBase):
    """DPM-Solver (noise prediction) as a diffusers scheduler.

    ``pipe.scheduler = DPMSolverScheduler.from_config(pipe.scheduler.config)``. Config beyond diffusers'
    ``DPMSolverMultistepScheduler``: ``solver_mode`` ('multistep' | 'singlestep'), ``timestep_spacing`` also
    'time_uniform' / 'time_quadratic' / 'logSNR' / 'karras'. ``final_sigmas_type='zero'`` works here too.
    """

    predicts_data = False

    def coefficients(self, alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float):
        return noise_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
