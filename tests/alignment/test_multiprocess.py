"""Two CPU processes (torchrun + gloo) give the same loss curve as one process at the same global batch, also when
the two-process run is interrupted in epoch 1 and resumed with two processes, or with one (converted)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffalign.alignment.digits_pairs import make_digits_pairs
from diffalign.models.digits import load_digits_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--learning_rate", "1e-3", "--beta", "500", "--checkpointing_steps", "5", "--max_train_samples", "32"]
COMMON += ["--lora_target_modules", "to_v,to_out.0,conv1,conv2", "--progress_bar", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def history(output_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((output_dir / "diffalign_train.json").read_text())["history"]]


def run(command: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(command + COMMON, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_resumed_in_epoch_1_match_one_process(tmp_path):
    """32 pairs at global batch 8: 4 steps per epoch; the two-process run stops at step 5 and resumes to step 8."""
    pairs = make_digits_pairs(tmp_path / "pairs", load_digits_pipeline(True), samples_per_digit=8)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    two = ["-m", "diffalign.train", "--dataset", str(pairs), "--output_dir", str(tmp_path / "two")]
    two += ["--train_batch_size", "4"]
    one = [sys.executable, "-m", "diffalign.train", "--dataset", str(pairs), "--output_dir", str(tmp_path / "one")]
    run(one + ["--train_batch_size", "8", "--max_train_steps", "8"])
    run(launcher + [str(free_port())] + two + ["--max_train_steps", "5"])
    # both processes wrote their RNG state into one checkpoint: a real 2-process group, not two 1-process runs
    assert (tmp_path / "two" / "checkpoint-5" / "random_states_1.pkl").is_file()
    shutil.copytree(tmp_path / "two", tmp_path / "converted")
    run(launcher + [str(free_port())] + two + ["--max_train_steps", "8", "--resume_from_checkpoint", "latest"])
    converted = [sys.executable, "-m", "diffalign.train", "--dataset", str(pairs), "--train_batch_size", "8"]
    converted += ["--output_dir", str(tmp_path / "converted"), "--max_train_steps", "8"]
    run(converted + ["--resume_from_checkpoint", "latest"])
    losses_two, losses_one = history(tmp_path / "two"), history(tmp_path / "one")  # the resume appended 6-8
    assert len(losses_two) == len(losses_one) == 8
    assert losses_two == pytest.approx(losses_one, abs=1e-4)  # measured max difference 2e-6
    assert history(tmp_path / "converted") == pytest.approx(losses_one, abs=1e-4)  # 2 x 4 -> 1 x 8 records
    assert max(abs(a - losses_one[0]) for a in losses_one) > 1e-2  # the curve moves, so the match means something
