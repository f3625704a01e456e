"""`diffalign bench` rows on learned time grids (`dpm_solver_v3:grid=ld3`) on the shipped grids of `gmm`; the shipped
`digits-cond` grids."""

import dataclasses

import pytest
import torch

from diffalign.evaluation.benchmark import run_benchmark, summarize
from diffalign.evaluation.targets import gmm_target
from diffalign.models import load_model
from diffalign.samplers import LearnedGrids

SPECS = [
    "dpm_solver_v3",
    "dpm_solver_v3:grid=learned",
    "UniPCMultistepScheduler",
    "UniPCMultistepScheduler:grid=ld3",
    "dpm_solver_pp:grid=gits",
]


@pytest.fixture(scope="module")
def target():
    return gmm_target()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_grid_rows_beat_the_default_grid_and_skip_nfes_without_a_grid(target):
    rows = run_benchmark(target, SPECS, nfes=(5, 7), num_samples=48, seeds=(0,), progress=False)
    mse = {(r["sampler"], r["nfe"]): r["mse"] for r in summarize(rows)}
    # 128 test noises (docs/learned_grids.md): v3 1.29e-3 on its shipped LD3 grid vs 7.98e-3 on linspace; UniPC
    # 5.66e-3 on LD3 vs 2.71e-2; the factor 2 leaves room for these 48 noises
    assert mse[("dpm_solver_v3 (grid=learned)", 5)] < 0.5 * mse[("dpm_solver_v3", 5)]
    assert (
        mse[("diffusers UniPCMultistepScheduler (grid=ld3)", 5)] < 0.5 * mse[("diffusers UniPCMultistepScheduler", 5)]
    )
    assert mse[("dpm_solver_pp (grid=gits)", 5)] < 0.02  # 1.18e-2 on the test noises, 3.02e-2 on linspace
    assert all(r["nfe_used"] == 5 for r in rows if r["nfe"] == 5)
    assert ("dpm_solver_v3 (grid=learned)", 7) not in mse and ("dpm_solver_v3", 7) in mse  # no grid for NFE 7


def test_grid_rows_check_their_grids(target):
    with pytest.raises(ValueError, match="has no learned_grids"):
        run_benchmark(dataclasses.replace(target, side_info=None), SPECS[1:2], (5,), num_samples=2, seeds=(0,))
    with pytest.raises(ValueError, match="belong to model"):
        run_benchmark(dataclasses.replace(target, fingerprint="another"), SPECS[1:2], (5,), num_samples=2, seeds=(0,))
    with pytest.raises(ValueError, match="no gist grid for 'dpm_solver_v3 .grid=gist.' at NFE"):
        run_benchmark(target, ["dpm_solver_v3:grid=gist"], (5,), num_samples=2, seeds=(0,))  # a typo
    with pytest.raises(ValueError, match="needs grid="):
        run_benchmark(target, ["dpm_solver_v3:grid_guidance=2"], (5,), num_samples=2, seeds=(0,))


def test_shipped_digits_cond_grids_belong_to_guidance_4():
    spec = load_model("digits-cond")
    grids = LearnedGrids.load(spec.scheduler_dir)
    grids.check_model(spec.fingerprint)
    for solver in ("DPMSolverPPScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler"):
        for nfe in (5, 10):
            assert len(grids.get(solver, nfe, 4.0)) == nfe + 1 and grids.get(solver, nfe) is None
            assert grids.get(solver, nfe, 4.0, method="gits") is not None
