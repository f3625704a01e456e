"""``diffalign calibrate --grid gits``: a GITS grid for a diffusers scheduler on gmm, loadable and used."""

import numpy as np
import pytest
import torch

from diffalign.commands import calibrate
from diffalign.evaluation.calibration import CalibrateConfig
from diffalign.samplers import DPMSolverPPScheduler, LearnedGrids


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
