"""``adjoint_dpm``: the forward solver of AdjointDPM as a drop-in diffusers scheduler (Pan et al., ICLR 2024).

Sampling a pipeline with this scheduler gives exactly the samples that ``adjoint_sample`` differentiates with the
same config and NFE, so a latent or prompt optimised through the adjoint can be rendered by the usual pipeline.
"""

from __future__ import annotations

from .dpm_solver_pp import DPMSolverPPScheduler


class AdjointDPMScheduler(DPMSolverPPScheduler):
    """DPM-Solver++ (2M by default), the solver ``adjoint_sample`` builds from a foreign scheduler config.

    Same config as ``DPMSolverPPScheduler``. ``adjoint_sample`` reverses multistep updates only, so it rejects
    ``solver_mode='singlestep'``; as a pipeline scheduler that mode still samples like DPM-Solver++(2S)/(3S).
    """
