"""``adjoint_dpm``: the forward solver of AdjointDPM as a drop-in diffusers scheduler (Pan et al., ICLR 2024).

Sampling a pipeline with this scheduler gives exactly the samples that ``adjoint_sample`` differentiates with the
same config and NFE, so a latent or prompt optimised through the adjoint can be rendered by the usual pipeline.
"""

from __future__ import annotations

from .dpm_solver_pp import DPMSolverPPScheduler


class AdjointDPMScheduler(DPMSolverPPScheduler):
    """Multistep DPM-Solver++ (2M by default) whose solves ``adjoint_sample`` can differentiate.

    Same config as ``DPMSolverPPScheduler``; ``solver_mode`` must stay ``'multistep'`` (the adjoint reverses
    multistep updates only).
    """

    def _init_vp(self) -> None:
        if self.config.solver_mode != "multistep":
            raise ValueError(
                f"AdjointDPMScheduler needs solver_mode='multistep', got {self.config.solver_mode!r}; use "
                "DPMSolverPPScheduler for singlestep sampling."
            )
        super()._init_vp()
