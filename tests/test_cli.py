"""The command line: help, the `sample` demo's output and numbers, and argument errors."""

import subprocess
import sys

import pytest

from diffalign.cli import main


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "diffalign", "--help"], capture_output=True, text=True, check=True)
    assert "sample" in out.stdout and "usage: diffalign" in out.stdout


def test_sample_writes_a_grid_and_dpm_solver_pp_beats_ddim(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--out", str(out), "--nfe", "6", "--num-images", "8"]) == 0
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    errors = {
        line.rsplit(maxsplit=1)[0].strip(): float(line.split()[-1])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("  ")
    }
    assert {"dpm_solver", "dpm_solver_pp", "diffusers DDIM"} <= set(errors)
    # Measured at NFE 6, 8 images: v3 (shipped EMS) 0.055, DPM-Solver++(2M) 0.106, DDIM 0.117 RMS to the exact
    # ODE solution.
    assert errors["dpm_solver_pp"] < 0.95 * errors["diffusers DDIM"]
    assert errors["dpm_solver_v3"] < 0.75 * errors["dpm_solver_pp"]


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--nfe", "0"])
    assert "--nfe must be >= 1" in capsys.readouterr().err


def test_bench_writes_its_outputs(tmp_path, capsys):
    args = ["bench", "--model", "gmm", "--nfe", "4", "8", "--num-samples", "16", "--seeds", "0", "--quiet"]
    assert main(args + ["--samplers", "dpm_solver_pp", "DDIMScheduler", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {f"bench_gmm.{ext}" for ext in ("csv", "json", "md", "png")}
    assert "| dpm_solver_pp |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--model", "gmm", "--fid", "inception"])
    assert "--fid inception applies to diffusers pipelines" in capsys.readouterr().err
