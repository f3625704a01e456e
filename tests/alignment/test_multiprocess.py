"""Two CPU processes (torchrun + gloo) give the same loss curve as one process at the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffalign.alignment.digits_pairs import make_digits_pairs
from diffalign.models.digits import load_digits_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--max_train_steps", "4", "--learning_rate", "1e-3", "--beta", "500", "--checkpointing_steps", "2"]
COMMON += ["--lora_target_modules", "to_v,to_out.0,conv1,conv2", "--progress_bar", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def history(output_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((output_dir / "diffalign_train.json").read_text())["history"]]


def test_two_processes_match_one_process(tmp_path):
    pairs = make_digits_pairs(tmp_path / "pairs", load_digits_pipeline(True), samples_per_digit=8)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_port", str(free_port())]
    two = launcher + ["-m", "diffalign.train", "--dataset", str(pairs), "--output_dir", str(tmp_path / "two")]
    one = [sys.executable, "-m", "diffalign.train", "--dataset", str(pairs), "--output_dir", str(tmp_path / "one")]
    for command, batch in ((two, "4"), (one, "8")):
        done = subprocess.run(
            command + ["--train_batch_size", batch] + COMMON,
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    # both processes wrote their RNG state into one checkpoint: a real 2-process group, not two 1-process runs
    assert (tmp_path / "two" / "checkpoint-2" / "random_states_1.pkl").is_file()
    losses_two, losses_one = history(tmp_path / "two"), history(tmp_path / "one")
    assert len(losses_two) == len(losses_one) == 4
    assert losses_two == pytest.approx(losses_one, abs=1e-4)  # measured max difference 2e-6
    assert max(abs(a - losses_one[0]) for a in losses_one) > 1e-2  # the curve moves, so the match means something
