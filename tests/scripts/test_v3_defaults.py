"""scripts/v3_defaults.py: its toy data, budgets, conditional data pairing, and one small comparison end to end."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from v3_defaults import coarsened, compare, ems_data, parse_budget, shapes, table, train_toy_unet  # noqa: E402

from diffalign.models.adapters import plain_unet  # noqa: E402
from diffalign.models.digits import build_scheduler, load_digits_data  # noqa: E402
from diffalign.models.loading import schedule_config  # noqa: E402
from diffalign.samplers.ems import EMS_FILE  # noqa: E402
from diffalign.samplers.side_info import read_side_info  # noqa: E402


def test_budgets_parse_and_bad_ones_say_how():
    assert parse_budget("400x64") == (400, 64)
    with pytest.raises(argparse.ArgumentTypeError, match="GRIDxSAMPLES"):
        parse_budget("400")


def test_shapes_are_one_disk_or_square_in_range():
    images = shapes(64, torch.Generator().manual_seed(0))
    assert images.shape == (64, 1, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    lit = (images > -0.5).flatten(1).sum(1)  # pixels at least a quarter covered
    assert lit.min() >= 2 and lit.max() <= 36, lit


def test_conditional_rows_show_the_digit_their_prompt_names():
    """GuidedUNet gives batch row i the digit i % 10; the statistics' data must show that digit."""
    images, labels = load_digits_data("train")
    data = ems_data("digits-cond")
    assert len(data) % 10 == 0
    for i in (0, 7, 13, len(data) - 1):
        match = (images == data[i]).flatten(1).all(1)
        assert int(labels[match][0]) == i % 10
    assert torch.equal(ems_data("digits"), images)


def test_coarsened_statistics_keep_every_nth_point(tmp_path):
    from diffalign.models.digits import ASSETS_DIR

    shipped = ASSETS_DIR / "digits" / "scheduler"
    full, _ = read_side_info(shipped, EMS_FILE)
    thin, meta = read_side_info(coarsened(shipped, 4, tmp_path), EMS_FILE)
    assert meta["num_grid"] == 150 and torch.equal(thin["l"], full["l"][::4])
    assert thin["lambdas"][-1] == full["lambdas"][-1]  # 600 / 4: the grid's end is kept


@pytest.mark.slow
def test_the_second_unet_comparison_runs_end_to_end(tmp_path):
    """30 training steps, 20 x 8 statistics, 4 noises, NFE 5 and 8: UniPC plus v3 at its defaults on none and on the
    statistics (about 20 s on one core); the numbers themselves are the script's full run's (docs/dpm_solver_v3.md)."""
    torch.set_num_threads(1)
    unet, data = train_toy_unet(30, batch_size=16)
    args = argparse.Namespace(num_samples=4, seed=0, reference_rtol=1e-4, nfe=[5, 8], candidates=False)
    config = schedule_config(build_scheduler().config)
    record = compare("shapes", plain_unet(unet), config, data, [(20, 8)], None, args, tmp_path)
    assert [(r["budget"], r["sampler"]) for r in record["rows"]] == [
        ("-", "diffusers UniPC (defaults)"),
        ("none", "v3 defaults"),
        ("20x8", "v3 defaults"),
    ]
    assert all(len(r["mse"]) == 2 and all(m > 0 for m in r["mse"]) for r in record["rows"])
    assert record["budgets"]["20x8"] > 0  # CPU seconds of the statistics
    assert table(record, [5, 8]).count("\n") == 4
