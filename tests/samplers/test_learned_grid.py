"""Learned grids as side information: save / from_pretrained round trip, set_timesteps uses them, fingerprints."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffalign.samplers import DCSolverScheduler, DPMSolverPPScheduler, DPMSolverV3Scheduler
from diffalign.samplers.learned_grid import LearnedGrids, pipeline_grid_kwargs, set_grid
from diffalign.samplers.side_info import schedule_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = [157.4, 3.2, 1.5, 0.79, 0.23, 0.0]


def grids_for(scheduler, solver=None, **info) -> LearnedGrids:
    grids = LearnedGrids(schedule=schedule_fingerprint(scheduler.noise_schedule), model="toy-model")
    grids.add(solver or scheduler, GRID, **info)
    return grids


def test_round_trip_and_set_timesteps_uses_the_grid(tmp_path):
    scheduler = DPMSolverPPScheduler()
    scheduler.learned_grids = grids_for(scheduler, method="gits")
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "learned_grids.safetensors").is_file() and (tmp_path / "scheduler_config.json").is_file()
    loaded = DPMSolverPPScheduler.from_pretrained(tmp_path)
    assert loaded.learned_grids.info["DPMSolverPPScheduler/nfe=5"] == {"method": "gits"}
    loaded.set_timesteps(5)
    np.testing.assert_allclose(loaded.sigmas.numpy(), GRID, rtol=1e-6)
    loaded.set_timesteps(6)  # no grid for 6: the configured spacing
    assert len(loaded.sigmas) == 7 and loaded.sigmas[1] > 20


def test_solvers_may_share_one_grid_array(tmp_path):
    grids = grids_for(DPMSolverPPScheduler())
    shared = np.asarray(GRID)
    grids.add("A", shared)
    grids.add("B", shared)
    grids.save(tmp_path)
    assert LearnedGrids.load(tmp_path).get("B", 5) == pytest.approx(GRID)


def test_grid_of_another_solver_is_not_used(tmp_path):
    scheduler = DPMSolverPPScheduler()
    grids_for(scheduler, "UniPCMultistepScheduler").save(tmp_path)
    scheduler.load_learned_grids(tmp_path).set_timesteps(5)
    assert scheduler.sigmas[1] > 20


def test_side_info_schedulers_keep_their_own_files(tmp_path):
    scheduler = DCSolverScheduler()
    scheduler.learned_grids = grids_for(scheduler)
    scheduler.save_pretrained(tmp_path)
    loaded = DCSolverScheduler.from_pretrained(tmp_path)
    assert loaded.learned_sigmas(5) == pytest.approx(GRID)


def test_schedule_fingerprint_mismatch_raises(tmp_path):
    grids_for(DPMSolverPPScheduler()).save(tmp_path)
    with pytest.raises(ValueError, match="noise schedule"):
        DPMSolverPPScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).load_learned_grids(
            tmp_path
        )


def test_model_fingerprint_mismatch_raises():
    grids = grids_for(DPMSolverPPScheduler())
    grids.check_model("toy-model")
    with pytest.raises(ValueError, match="belong to model toy-model"):
        grids.check_model(torch.nn.Linear(2, 2))


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="strictly decreasing"):
        grids_for(DPMSolverPPScheduler()).add("X", [1.0, 2.0, 0.0])


def test_diffusers_helpers():
    ours = DPMSolverPPScheduler()
    grids = grids_for(ours, "DPMSolverMultistepScheduler")
    dpm = DPMSolverMultistepScheduler.from_config(ours.config)
    kwargs = pipeline_grid_kwargs(dpm, grids, 5)
    assert kwargs["timesteps"][0] == 999 and len(kwargs["timesteps"]) == 5
    dpm.set_timesteps(**kwargs)
    assert dpm.timesteps.tolist() == kwargs["timesteps"]
    unipc = UniPCMultistepScheduler.from_config(ours.config)
    with pytest.raises(ValueError, match="set_grid"):
        pipeline_grid_kwargs(unipc, grids_for(ours, "UniPCMultistepScheduler"), 5)
    set_grid(unipc, GRID)
    assert unipc.timesteps.tolist() == kwargs["timesteps"] and float(unipc.sigmas[-1]) == 0.0
    np.testing.assert_allclose(unipc.sigmas[:-1].numpy(), GRID[:-1], rtol=0.05)  # moved to integer timesteps


def test_shipped_gmm_grids_load_with_from_pretrained():
    folder = Path(__file__).resolve().parents[2] / "diffalign" / "assets" / "gmm" / "scheduler"
    scheduler = DPMSolverV3Scheduler.from_pretrained(folder)
    assert scheduler.ems is not None and scheduler.learned_grids is not None
    for nfe in (5, 6, 8, 10):
        scheduler.set_timesteps(nfe)
        np.testing.assert_allclose(
            scheduler.sigmas.numpy(), scheduler.learned_sigmas(nfe), rtol=1e-2
        )  # snapped to EMS
    assert scheduler.learned_grids.get("UniPCMultistepScheduler", 5) is not None


def test_alternatives_are_kept_beside_the_selected_grid(tmp_path):
    scheduler = DPMSolverPPScheduler()
    grids = grids_for(scheduler, method="ld3")
    other = [157.4, 5.0, 2.0, 0.5, 0.1, 0.0]
    assert grids.add(scheduler, other, alternative=True, method="gits") == "DPMSolverPPScheduler/nfe=5/method=gits"
    grids.save(tmp_path)
    loaded = LearnedGrids.load(tmp_path)
    assert loaded.get(scheduler, 5) == pytest.approx(GRID) and loaded.get(scheduler, 5, method="ld3") == pytest.approx(
        GRID
    )
    assert loaded.get(scheduler, 5, method="gits") == pytest.approx(other)
    assert loaded.get(scheduler, 5, 7.5, method="gits") == pytest.approx(other)  # guidance-free fallback
    assert (
        loaded.get(scheduler, 5, method="time_quadratic") is None and loaded.get(scheduler, 6, method="gits") is None
    )
    scheduler.load_learned_grids(tmp_path).set_timesteps(5)  # set_timesteps takes the selected grid
    np.testing.assert_allclose(scheduler.sigmas.numpy(), GRID, rtol=1e-6)
    with pytest.raises(ValueError, match="stored under its method"):
        grids.add(scheduler, other, alternative=True)
