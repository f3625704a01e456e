"""`diffalign ems`: the embedded mixture and a text-to-image pipeline folder (VAE-encoded images, guidance)."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import make_sd_pipeline

from diffalign.cli import main
from diffalign.samplers import DPMSolverV3Scheduler


def test_ems_command_on_gmm_writes_loadable_statistics(tmp_path, capsys):
    out = tmp_path / "gmm_ems"
    args = ["ems", "--model", "gmm", "--grid-size", "8", "--num-samples", "32", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "wrote DPM-Solver-v3 EMS" in capsys.readouterr().out
    scheduler = DPMSolverV3Scheduler.from_pretrained(out)  # a fresh folder gets a scheduler config too
    assert scheduler.ems.num_grid == 8 and scheduler.ems.meta["model"] == "gmm"
    assert scheduler.ems.meta["dtype"] == "float64" and scheduler.ems.sample_shape == (1, 8, 8)
    short = tmp_path / "short"
    assert main(args[:-3] + ["--t-start", "500", "--fd-step", "1e-2", "--out", str(short), "--quiet"]) == 0
    partial = DPMSolverV3Scheduler.from_pretrained(short)
    assert partial.ems.meta["t_start"] == 500.0 and partial.ems.meta["fd_step"] == 1e-2
    with pytest.raises(ValueError, match="outside the EMS range"):
        partial.set_timesteps(5)  # the grid starts at t = 999, above what these statistics cover
    partial.set_timesteps(timesteps=[500, 300, 100])
    # deterministic: the same command gives the same statistics
    assert main(args[:-3] + ["--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = DPMSolverV3Scheduler.from_pretrained(tmp_path / "again")
    assert torch.equal(again.ems.l, scheduler.ems.l) and torch.equal(again.ems.s, scheduler.ems.s)


def test_ems_command_on_a_text_pipeline_folder(tmp_path):
    pipe = make_sd_pipeline(tmp_path)
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"not an image")
    folder = tmp_path / "sd"
    with pytest.raises(ValueError, match="--prompts"):
        main(["ems", "--model", str(folder), "--data", str(data), "--grid-size", "3", "--num-samples", "4"])
    args = ["ems", "--model", str(folder), "--data", str(data), "--prompts", "a cat", "--guidance-scale", "3"]
    assert main(args + ["--grid-size", "3", "--num-samples", "4", "--quiet"]) == 0
    scheduler = DPMSolverV3Scheduler.from_pretrained(folder, subfolder="scheduler")  # next to the pipeline's config
    latent = pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size
    assert scheduler.ems.sample_shape == latent and "guidance 3.0" in scheduler.ems.meta["model"]
    scheduler.check_model(pipe.unet)
