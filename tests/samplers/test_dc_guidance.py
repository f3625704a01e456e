"""Guidance-aware DC-Solver: the ratios are those of the guidance scale the pipeline actually runs with.

A tiny random SD pipeline (tests/tiny_pipelines.py) samples at 4 steps with guidance 3 and 7 after
``swap_scheduler``; the scheduler must pick the ratios calibrated for each. CPR is refused outside the calibrated
guidance range as it is outside the calibrated NFE range.
"""

import warnings

import pytest
import tiny_pipelines as tiny
import torch

from diffalign.samplers import DCSolverScheduler, swap_scheduler
from diffalign.samplers.dc_cpr import fit_cpr

RATIOS = {3.0: [1.0, 1.0, 1.02, 0.97], 7.0: [1.0, 1.0, 1.08, 0.91]}


def calibrated(**config) -> DCSolverScheduler:
    scheduler = DCSolverScheduler(**tiny.BETAS, **config)
    for g, ratios in RATIOS.items():
        scheduler.set_dc_ratios(4, ratios, guidance_scale=g)
    return scheduler


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny.make_sd_pipeline(tmp_path_factory.mktemp("sd"))
    torch.set_num_threads(threads)


def test_ratios_follow_the_pipelines_guidance(sd_pipe):
    sd_pipe.scheduler = calibrated()
    swap_scheduler(sd_pipe, "dc_solver")  # carries the ratios over and follows the pipeline
    for g in (7.0, 3.0, 7.0):
        sd_pipe("a digit", num_inference_steps=4, guidance_scale=g, output_type="latent", height=32, width=32)
        assert sd_pipe.scheduler.dc_guidance_scale == g
        assert sd_pipe.scheduler.dc_ratio_source == "calibrated" and sd_pipe.scheduler.dc_ratios == RATIOS[g]
    with pytest.warns(UserWarning, match="no compensation ratios for NFE 4 at guidance_scale=1"):
        sd_pipe("a digit", num_inference_steps=4, guidance_scale=1.0, output_type="latent", height=32, width=32)
    assert sd_pipe.scheduler.dc_guidance_scale == 1.0


def test_hand_written_loops_set_the_guidance_and_an_unrun_pipeline_defers_to_the_config():
    scheduler = calibrated().set_guidance_scale(7.0)
    scheduler.set_timesteps(4)
    assert scheduler.dc_ratios == RATIOS[7.0] and scheduler.config.guidance_scale == 7.0

    class Unrun:  # a pipeline before its first call has no guidance scale yet
        @property
        def guidance_scale(self):
            raise AttributeError("_guidance_scale")

    pipe = Unrun()
    scheduler.follow_pipeline(pipe).set_timesteps(4)
    assert scheduler.dc_ratios == RATIOS[7.0]
    with pytest.raises(ValueError, match="finite"):
        scheduler.set_guidance_scale(float("nan"))


def test_cpr_refuses_to_extrapolate_the_guidance_scale():
    """CPR fitted on guidance 2-6 predicts inside that range silently and falls back to ratios 1 outside it."""
    scheduler = DCSolverScheduler()
    settings = [
        (n, g, [1.0, 1.0] + [1.0 + 0.01 * g * s / n for s in range(3, n + 1)])
        for n in (5, 6, 8)
        for g in (2.0, 4.0, 6.0)
    ]
    for n, g, ratios in settings:
        scheduler.set_dc_ratios(n, ratios, guidance_scale=g)
    scheduler.cpr_coeffs = fit_cpr(settings, dc_order=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.set_guidance_scale(5.0).set_timesteps(7)
    assert scheduler.dc_ratio_source == "cpr" and scheduler.dc_ratios[-1] == pytest.approx(1.05, abs=1e-6)
    with pytest.warns(UserWarning, match="guidance_scale 9 is outside the calibrated guidance 2-6"):
        scheduler.set_guidance_scale(9.0).set_timesteps(7)
    assert scheduler.dc_ratio_source == "fallback" and scheduler.dc_ratios == [1.0] * 7
