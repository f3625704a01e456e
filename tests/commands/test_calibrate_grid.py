"""``diffalign calibrate --grid gits``: GITS grids on gmm and on a tiny SD pipeline folder, loadable and used."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from tiny_pipelines import make_sd_pipeline

from diffalign.cli import main
from diffalign.commands import calibrate
from diffalign.evaluation.calibration import CalibrateConfig
from diffalign.samplers import DPMSolverPPScheduler, LearnedGrids, pipeline_grid_kwargs


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_calibrate_grid_writes_a_grid_the_scheduler_uses(tmp_path, one_thread):
    config = CalibrateConfig(model="gmm", grid="gits", solver="dpm_solver_pp", nfe=[5], out=str(tmp_path))
    assert calibrate.run(config) == 0
    grids = LearnedGrids.load(tmp_path)
    assert list(grids.grids) == ["DPMSolverPPScheduler/nfe=5"]
    scheduler = DPMSolverPPScheduler.from_pretrained(tmp_path)
    scheduler.set_timesteps(5)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), grids.grids["DPMSolverPPScheduler/nfe=5"], rtol=1e-6)


def test_unknown_grid_method_is_rejected():
    with pytest.raises(ValueError, match="grid"):
        CalibrateConfig(model="gmm", grid="ays")


def test_calibrate_grid_on_a_text_pipeline_folder_is_found_by_from_pretrained(tmp_path, one_thread):
    """A GITS grid for a diffusers scheduler goes into the pipeline's scheduler folder, keyed by the guidance scale;
    the pipeline runs on it, and our schedulers' ``from_pretrained`` of that folder load it. (A tiny SD UNet call
    takes ~0.4 s here, hence 1 noise and 6 candidates: ~70 calls.)"""
    make_sd_pipeline(tmp_path)
    folder = tmp_path / "sd"
    with pytest.raises(ValueError, match="DC-Solver ratios are calibrated for the embedded models"):
        CalibrateConfig(model=str(folder))
    args = ["calibrate", "--model", str(folder), "--grid", "gits", "--nfe", "3", "--prompts", "a cat"]
    args += ["--solver", "DPMSolverMultistepScheduler", "--guidance_scale", "3", "--grid_noises", "1"]
    assert main(args + ["--grid_candidates", "6"]) == 0
    grids = LearnedGrids.load(folder / "scheduler")
    key = "DPMSolverMultistepScheduler/nfe=3/guidance_scale=3"
    assert list(grids.grids) == [key] and grids.info[key]["method"] == "gits" and grids.info[key]["n_noises"] == 1

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    grids.check_model(pipe.unet)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    kwargs = pipeline_grid_kwargs(pipe.scheduler, grids, 3, guidance_scale=3.0)
    assert kwargs["timesteps"][0] == 999 and kwargs["timesteps"] != [999, 666, 333]  # learned, not linspace
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a cat", guidance_scale=3.0, output_type="latent", **kwargs).images
    assert pipe.scheduler.timesteps.tolist() == kwargs["timesteps"] and torch.isfinite(latents).all()

    ours = DPMSolverPPScheduler.from_pretrained(folder, subfolder="scheduler")
    assert ours.learned_grids.get("DPMSolverMultistepScheduler", 3, 3.0) == pytest.approx(grids.grids[key])
