"""Registry lookups, swap_scheduler, and the noise schedule surviving every config switch."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from diffalign import SCHEDULERS, DPMSolverPPScheduler, swap_scheduler
from diffalign.samplers import get_scheduler_class


class FakePipe:
    def __init__(self, scheduler):
        self.scheduler = scheduler


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("source", [DDPMScheduler, HeunDiscreteScheduler, EulerDiscreteScheduler])
def test_default_built_configs_keep_their_noise_schedule(name, source):
    """diffusers' from_config would replace a source's default betas by the target's (Heun: 0.00085..0.012)."""
    src = source()
    ours = SCHEDULERS[name].from_config(src.config)
    torch.testing.assert_close(ours.alphas_cumprod, src.alphas_cumprod.float())
    assert HeunDiscreteScheduler.from_config(DDPMScheduler().config).config.beta_end == 0.012  # the trap itself


def test_swap_scheduler_keeps_the_schedule_into_diffusers_classes_too():
    pipe = FakePipe(DDPMScheduler(prediction_type="v_prediction"))
    swap_scheduler(pipe, "HeunDiscreteScheduler")
    assert isinstance(pipe.scheduler, HeunDiscreteScheduler)
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.0001, 0.02)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    swap_scheduler(pipe, "dpm_solver_pp", solver_order=3)
    assert isinstance(pipe.scheduler, DPMSolverPPScheduler) and pipe.scheduler.config.solver_order == 3
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_lookup_by_name_class_name_and_diffusers_name():
    assert get_scheduler_class("dpm_solver_pp") is DPMSolverPPScheduler
    assert get_scheduler_class("DPMSolverPPScheduler") is DPMSolverPPScheduler
    assert get_scheduler_class("DDIMScheduler") is DDIMScheduler
    assert get_scheduler_class(DDIMScheduler) is DDIMScheduler
    with pytest.raises(ValueError, match="unknown scheduler 'UNet2DModel'"):
        get_scheduler_class("UNet2DModel")
    with pytest.raises(TypeError, match="no `scheduler` attribute"):
        swap_scheduler(object(), "dpm_solver_pp")
