"""The trainer on a streamed dataset (``--streaming``): parquet shards read lazily, each process its own share,
reshuffled per epoch; a run interrupted in epoch 1 and resumed continues the uninterrupted loss curve, with one
and with two processes (torchrun + gloo), and a resume under another process count is refused."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_pairs import make_digits_pairs
from diffalign.alignment.trainer import train
from diffalign.models.digits import load_digits_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
OPTIONS = dict(learning_rate=1e-3, beta=500.0, lora_target_modules="to_v,to_out.0,conv1,conv2", progress_bar=False)
OPTIONS |= dict(streaming=True, shuffle_buffer=16, checkpointing_steps=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """digits-cond's 40 best-vs-worst pairs as Pick-a-Pic parquet, 4 files of 10 rows (chosen = jpg_0 or jpg_1)."""
    root = tmp_path_factory.mktemp("stream")
    pairs = make_digits_pairs(root / "pairs", load_digits_pipeline(True), samples_per_digit=8)
    records = [json.loads(line) for line in (pairs / "pairs.jsonl").read_text().splitlines()]
    (root / "shards").mkdir()
    for shard in range(4):
        rows = records[shard::4]
        first = [(pairs / (r["chosen"] if i % 2 else r["rejected"])).read_bytes() for i, r in enumerate(rows)]
        second = [(pairs / (r["rejected"] if i % 2 else r["chosen"])).read_bytes() for i, r in enumerate(rows)]
        label_0 = [float(i % 2) for i in range(len(rows))]
        table = dict(caption=[r["prompt"] for r in rows], jpg_0=first, jpg_1=second, label_0=label_0)
        table["label_1"] = [1.0 - v for v in label_0]
        pq.write_table(pa.table(table), root / "shards" / f"train-{shard:05d}.parquet")
    return root / "shards"


@pytest.fixture(autouse=True)
def no_shutdown_wait(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # a 5 s wait after each shuffled pass


def losses(output_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((output_dir / "diffalign_train.json").read_text())["history"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_run_resumed_in_epoch_1_continues_the_same_curve(tmp_path, shards, workers):
    """40 pairs at batch 8: 5 steps per epoch; stopped at step 6 (epoch 1, checkpoint) and resumed to step 9.
    Without workers the resume starts after the last record read; with 2 it re-reads the batches seen."""
    common = dict(OPTIONS, dataset=str(shards), train_batch_size=8, dataloader_num_workers=workers)
    full = train(TrainConfig(output_dir=str(tmp_path / "full"), max_train_steps=9, **common)).history
    train(TrainConfig(output_dir=str(tmp_path / "resumed"), max_train_steps=6, **common))
    position = tmp_path / "resumed" / "checkpoint-6" / "stream_position_0.safetensors"
    assert position.is_file()  # the stream position travels with the checkpoint
    resumed = train(
        TrainConfig(output_dir=str(tmp_path / "resumed"), max_train_steps=9, resume_from_checkpoint="latest", **common)
    ).history
    assert [h["step"] for h in resumed] == [7, 8, 9]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full[6:]], abs=1e-6)
    assert losses(tmp_path / "resumed") == pytest.approx([h["loss"] for h in full], abs=1e-6)
    assert max(abs(h["loss"] - full[0]["loss"]) for h in full) > 1e-2  # the curve moves: the match means something


def test_streamed_epochs_see_every_record_in_a_new_order(tmp_path, shards, monkeypatch):
    from diffalign.alignment import step as step_module

    seen: list[list[tuple]] = []  # (prompt, pixel sum) per record: a stream's index counts positions
    original = step_module.PreferenceStep.__call__

    def record(self, batch, epoch):
        sums = batch["pixels"].sum(dim=(1, 2, 3, 4)).tolist()
        seen.append([(prompt, round(total, 3)) for prompt, total in zip(batch["prompt"], sums, strict=True)])
        return original(self, batch, epoch)

    monkeypatch.setattr(step_module.PreferenceStep, "__call__", record)
    config = dict(OPTIONS, dataset=str(shards), train_batch_size=8, checkpointing_steps=0, max_train_steps=10)
    train(TrainConfig(output_dir=str(tmp_path / "run"), **config))
    epochs = [sum(seen[:5], []), sum(seen[5:], [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 40
    assert epochs[0] != epochs[1]


def test_streaming_refuses_max_train_samples_and_a_jsonl_folder(tmp_path):
    with pytest.raises(ValueError, match="known length"):
        TrainConfig(streaming=True, max_train_samples=8)
    pairs = make_digits_pairs(tmp_path / "pairs", load_digits_pipeline(True), samples_per_digit=4)
    with pytest.raises(ValueError, match="Drop --streaming"):
        train(TrainConfig(**dict(OPTIONS, dataset=str(pairs), output_dir=str(tmp_path / "run"), max_train_steps=1)))


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


def test_two_processes_resume_a_stream_and_refuse_another_process_count(tmp_path, shards):
    """Each of 2 processes streams 2 of the 4 files (20 pairs, batch 4: 5 steps per epoch); stopped at step 6 and
    resumed, the curve is the uninterrupted 2-process one."""
    from test_multiprocess import free_port

    flags = ["--streaming", "--shuffle_buffer", "16", "--learning_rate", "1e-3", "--beta", "500"]
    flags += ["--lora_target_modules", "to_v,to_out.0,conv1,conv2", "--progress_bar", "false"]
    flags += ["--dataset", str(shards), "--train_batch_size", "4", "--checkpointing_steps", "3"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]

    def two(name: str, steps: int, *extra: str) -> None:
        out = ["--output_dir", str(tmp_path / name), "--max_train_steps", str(steps)]
        run(launch + [str(free_port()), "-m", "diffalign.train", *flags, *out, *extra])

    two("full", 9)
    two("resumed", 6)
    assert (tmp_path / "resumed" / "checkpoint-6" / "stream_position_1.safetensors").is_file()
    two("resumed", 9, "--resume_from_checkpoint", "latest")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    one = [sys.executable, "-m", "diffalign.train", *flags, "--output_dir", str(tmp_path / "full")]
    refused = run(
        one + ["--train_batch_size", "8", "--max_train_steps", "12", "--resume_from_checkpoint", "latest"], False
    )
    assert refused.returncode != 0 and "streamed run resumes with its process count" in refused.stderr


def test_a_stream_with_a_cache_is_encoded_once_and_trains(tmp_path, shards):
    config = dict(OPTIONS, dataset=str(shards), train_batch_size=8, checkpointing_steps=0, max_train_steps=2)
    config["cache_dir"] = str(tmp_path / "cache")
    history = train(TrainConfig(output_dir=str(tmp_path / "run"), **config)).history
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts at the reference
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    shards_written = json.loads((tmp_path / "cache" / "shards.json").read_text())
    assert meta["streamed"] and sum(count for _, count in shards_written) == 40
