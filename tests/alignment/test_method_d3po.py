"""D3PO and the rollout machinery: rollouts, the replay buffer, the loss, and runs through the trainer."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.alignment.config import TrainConfig, parse_config
from diffalign.alignment.d3po import D3POOptions, preference_pairs, trajectory_log_probs
from diffalign.alignment.digits_pairs import make_digits_pairs
from diffalign.alignment.methods import D3PO, MethodInputs
from diffalign.alignment.replay import ReplayBuffer
from diffalign.alignment.rollout import Rollout, RolloutRequest, sample_rollout, sampling_scheduler
from diffalign.alignment.trainer import train
from diffalign.models.digits import load_digits_pipeline


@pytest.fixture(scope="module")
def pipeline():
    return load_digits_pipeline(True)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, pipeline):
    return make_digits_pairs(tmp_path_factory.mktemp("pairs"), pipeline, samples_per_digit=2)


def request_for(pipeline, prompts, num_candidates=2, epoch=0, seed=0, reward=None):
    """A RolloutRequest on the digits UNet with the prompts' and the empty prompt's conditioning bound in."""
    encoder, unet = pipeline.text_encoder, pipeline.unet

    def bound(texts):
        states = encoder(encoder.tokenize(texts * num_candidates))  # (K B, 1, D) candidate-major
        return lambda x, t: unet(x, t, encoder_hidden_states=states).sample

    return RolloutRequest(
        batch={"prompt": prompts, "index": torch.arange(len(prompts)) + 10},
        latent_shape=(len(prompts), num_candidates, 1, 8, 8),
        unet=bound(prompts),
        scheduler=pipeline.scheduler,
        decode=lambda x: ((x + 1) / 2).clamp(0, 1),
        epoch=epoch,
        seed=seed,
        reward=reward,
        unconditional=bound([""] * len(prompts)),
    )


def fake_rollout(size, num_candidates=2, steps=3, fill=0.0, dtype=torch.float32):
    latents = torch.full((size, num_candidates, steps + 1, 1, 2, 2), fill, dtype=dtype)
    timesteps = torch.zeros(size, num_candidates, steps, dtype=torch.long)
    return Rollout(latents, timesteps, torch.full((size, num_candidates, steps), fill), torch.full((size, 2), fill))


@torch.no_grad()
def test_rollouts_share_x_T_per_prompt_are_seeded_per_record_and_their_log_probs_rescore(pipeline):
    prompts = ["a handwritten 3", "a handwritten 7"]
    rollout = sample_rollout(request_for(pipeline, prompts), num_steps=3, eta=1.0, guidance_scale=2.0)
    assert rollout.latents.shape == (2, 2, 4, 1, 8, 8) and rollout.timesteps.shape == (2, 2, 3)
    assert rollout.timesteps[0, 1].tolist() == rollout.timesteps[1, 0].tolist() == [999, 666, 332]
    assert torch.equal(rollout.latents[:, 0, 0], rollout.latents[:, 1, 0])  # one x_T per prompt
    assert (rollout.latents[:, 0, -1] - rollout.latents[:, 1, -1]).abs().max() > 0.1  # K different trajectories
    assert not torch.equal(rollout.latents[0, 0, 0], rollout.latents[1, 0, 0])
    again = sample_rollout(request_for(pipeline, prompts), num_steps=3, eta=1.0, guidance_scale=2.0)
    assert torch.equal(rollout.latents, again.latents)  # determinism under a seed
    # record 11 alone (a 1-process slice of the batch) gets the same trajectories: seeds per record, not per batch
    single = request_for(pipeline, prompts[1:])
    single.batch["index"] = torch.tensor([11])
    alone = sample_rollout(single, num_steps=3, eta=1.0, guidance_scale=2.0)
    torch.testing.assert_close(alone.latents[0], rollout.latents[1], atol=1e-4, rtol=0)  # batch-size rounding
    other_epoch = sample_rollout(request_for(pipeline, prompts, epoch=1), num_steps=3, guidance_scale=2.0)
    assert not torch.equal(other_epoch.latents[:, :, 0], rollout.latents[:, :, 0])
    # the stored log-probabilities are what the guided policy gives the stored steps (what D3PO recomputes)
    request = request_for(pipeline, prompts)
    from diffalign.alignment.rollout import guided

    rescored = trajectory_log_probs(
        guided(request.unet, request.unconditional, 2.0), sampling_scheduler(pipeline.scheduler, 3), rollout, 1.0
    )
    torch.testing.assert_close(rescored, rollout.log_probs, atol=1e-5, rtol=0)
    scored = sample_rollout(request_for(pipeline, prompts, reward=lambda im, p: im.mean((1, 2, 3))), num_steps=3)
    torch.testing.assert_close(scored.rewards, ((scored.latents[:, :, -1] + 1) / 2).clamp(0, 1).mean((2, 3, 4)))


def test_replay_buffer_keeps_the_newest_prompts_in_order_and_round_trips(tmp_path):
    buffer = ReplayBuffer(capacity=3)
    for step in range(3):  # 2 prompts per rollout: ids 0..5, the last 3 stay
        ids = buffer.add(fake_rollout(2, fill=step, dtype=torch.bfloat16), ["a 1", "a 2"], torch.tensor([4, 5]), step)
        assert ids == [2 * step, 2 * step + 1]
    assert len(buffer) == 3
    assert [e["id"] for e in buffer.entries] == [3, 4, 5] and [e["epoch"] for e in buffer.entries] == [1, 2, 2]
    assert buffer.entries[0]["latents"].dtype == torch.bfloat16  # kept in the latent dtype
    buffer.save(tmp_path / "buffer.safetensors")
    loaded = ReplayBuffer.load(tmp_path / "buffer.safetensors")
    assert (
        loaded.capacity == 3 and loaded.next_id == 6 and [e["prompt"] for e in loaded.entries] == ["a 2", "a 1", "a 2"]
    )
    for a, b in zip(buffer.entries, loaded.entries, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("latents", "timesteps", "log_probs", "rewards"))
    assert loaded.add(fake_rollout(1), ["a 3"], torch.tensor([0]), 3) == [6]
    with pytest.raises(ValueError, match="--rollout_buffer_size 3"):
        ReplayBuffer(4).load_state_dict(buffer.state_dict())


def test_pairs_are_best_against_worst_and_ties_are_dropped():
    pairs, keep = preference_pairs(torch.tensor([[0.1, 0.5], [2.0, -1.0], [1.0, 1.0]]))
    assert pairs.tolist()[:2] == [[1, 0], [0, 1]] and keep.tolist() == [True, True, False]
    pairs, keep = preference_pairs(torch.tensor([[0.0, 3.0, -2.0]]))
    assert pairs.tolist() == [[1, 2]] and keep.tolist() == [True]
    # a tie margin drops pairs whose rewards differ by float rounding (digits: log p ~ 0 for both) and keeps the rest
    scores = torch.tensor([[-1.1921e-07, 0.0], [-2.3, -1e-6], [-5e-4, -2e-3]])
    pairs, keep = preference_pairs(scores, tie_margin=1e-3)
    assert pairs.tolist() == [[1, 0], [1, 0], [0, 1]] and keep.tolist() == [False, True, True]
    assert preference_pairs(scores)[1].tolist() == [True, True, True]  # the official rule: exact ties only
    with pytest.raises(ValueError, match="d3po_tie_margin"):
        D3POOptions(d3po_tie_margin=-1.0)


def test_d3po_loss_is_log2_at_the_reference_and_descends(pipeline):
    """At pi_theta = pi_ref a pair's loss is log 2, a tie's 0; a small step against the gradient lowers the loss."""
    method = D3PO(D3POOptions(d3po_num_steps=2, d3po_guidance_scale=1.0))
    request = request_for(pipeline, ["a handwritten 3", "a handwritten 5"])
    rollout = sample_rollout(request, num_steps=2, guidance_scale=1.0)
    method.sampler = sampling_scheduler(pipeline.scheduler, 2)
    scores = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # prompt 0: trajectory 0 preferred; prompt 1 tied (dropped)
    inputs = MethodInputs({"scores": scores}, None, None, None, None, None, rollout, request.unet, None, request.unet)
    loss, metrics = method.loss(inputs)
    assert loss.item() == pytest.approx(math.log(2) / 2, abs=1e-6) and metrics["pairs_kept"].item() == 0.5
    # one gradient step on a scalar shift of the policy's output lowers the loss and opens the margin
    shift = torch.zeros((), requires_grad=True)
    direction = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs.policy = lambda x, t: request.unet(x, t) + shift * direction
    loss, _ = method.loss(inputs)
    (gradient,) = torch.autograd.grad(loss, shift)
    assert gradient.abs().item() > 1e-6
    with torch.no_grad():
        shift -= gradient.sign() * min(1.0, 1e-3 / gradient.abs().item())  # a small step: |shift gradient| <= 1e-3
    moved, moved_metrics = method.loss(inputs)
    assert moved.item() < math.log(2) / 2 - 1e-7 and moved_metrics["reward_margin"].item() > 0


def small(tmp_path, pairs_dir, name, **overrides):
    options = dict(method="d3po", output_dir=str(tmp_path / name), dataset=str(pairs_dir), train_batch_size=4)
    options |= dict(lora_target_modules="to_v,conv1", checkpointing_steps=0, progress_bar=False, max_train_steps=4)
    options |= dict(max_train_samples=8, learning_rate=1e-4, d3po_num_steps=2, d3po_guidance_scale=2.0)
    return TrainConfig(**(options | overrides))


def test_d3po_trains_resumes_mid_run_with_its_buffer_and_flips(tmp_path, pairs_dir):
    """4 steps at 2 steps per epoch; a run stopped at step 3 (mid epoch 1) and resumed gives the same losses."""
    full = train(small(tmp_path, pairs_dir, "full", rollout_buffer_size=6))
    losses = [h["loss"] for h in full.history]
    assert losses[0] == pytest.approx(full.history[0]["pairs_kept"] * math.log(2), abs=1e-6)  # ties add 0
    assert max(abs(x - losses[0]) for x in losses) > 1e-4  # the run moves, so the match below means something
    first = small(tmp_path, pairs_dir, "resumed", rollout_buffer_size=6, checkpointing_steps=3, max_train_steps=3)
    train(first)
    buffer = ReplayBuffer.load(tmp_path / "resumed" / "checkpoint-3" / "replay_0.safetensors")
    assert len(buffer) == 6 and buffer.next_id == 12  # 3 steps x 4 prompts, the newest 6 kept
    assert [e["epoch"] for e in buffer.entries] == [0, 0, 1, 1, 1, 1]
    resumed = train(small(tmp_path, pairs_dir, "resumed", rollout_buffer_size=6, resume_from_checkpoint="latest"))
    history = json.loads((tmp_path / "resumed" / "diffalign_train.json").read_text())["history"]
    assert [h["loss"] for h in history] == pytest.approx(losses, abs=1e-6)
    assert resumed.history[0]["reward"] == pytest.approx(full.history[3]["reward"], abs=1e-6)
    flipped = train(small(tmp_path, pairs_dir, "flipped", flip_labels=True, max_train_steps=1))
    assert flipped.history[0]["reward"] == pytest.approx(full.history[0]["reward"], abs=1e-6)  # same samples
    assert flipped.history[0]["loss"] == pytest.approx(losses[0], abs=1e-6)  # log 2 per kept pair either way


def test_d3po_options_are_a_help_group(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = capsys.readouterr().out
    assert "method d3po (D3PO):\n  --d3po_beta D3PO_BETA" in out and "--rollout_buffer_size" in out
    config = parse_config(["--method", "d3po", "--d3po_num_steps", "4"])
    assert (config.d3po_num_steps, config.d3po_beta, config.d3po_clip_range, config.d3po_eta) == (4, 0.1, 0.1, 1.0)
    assert config.d3po_guidance_scale == 5.0 and config.d3po_reward == "digits"
    with pytest.raises(ValueError, match="d3po_eta must be > 0"):
        TrainConfig(method="d3po", d3po_eta=0.0)


_spec = importlib.util.spec_from_file_location("trainer_sd", Path(__file__).resolve().parent / "test_trainer_sd.py")
trainer_sd = importlib.util.module_from_spec(_spec)  # its tiny pipelines and Pick-a-Pic writer
_spec.loader.exec_module(trainer_sd)


class MeanReward:
    name, version = "mean", "test"

    def score(self, images, prompts):
        return images.float().mean((1, 2, 3)).cpu()


def test_one_d3po_step_on_tiny_sdxl(tmp_path, monkeypatch):
    from diffalign.evaluation import rewards

    monkeypatch.setattr(rewards, "load_reward", lambda name, device="cpu", **kwargs: MeanReward())
    trainer_sd.tiny.make_sdxl_pipeline(tmp_path)
    config = TrainConfig(
        method="d3po",
        pretrained_model_name_or_path=str(tmp_path / "sdxl"),
        dataset=str(trainer_sd.write_pickapic(tmp_path / "data.parquet", num_rows=2)),
        output_dir=str(tmp_path / "out"),
        train_batch_size=2,
        max_train_steps=1,
        d3po_num_steps=2,
        checkpointing_steps=0,
        progress_bar=False,
    )
    result = train(config)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.history[0]["pairs_kept"] == 1.0 and math.isfinite(result.history[0]["reward"])


def test_human_labels_export_read_and_train(tmp_path, pipeline):
    """Export 4 prompts' trajectories, label 3 of them (one each way, one null), train one step on the labels."""
    from diffalign.alignment.labels import export_for_labelling, read_labels

    prompts = ["a handwritten 1", "a handwritten 2", "a handwritten 3", "a handwritten 4"]
    with torch.no_grad():
        rollout = sample_rollout(request_for(pipeline, prompts), num_steps=2, guidance_scale=2.0)
    buffer = ReplayBuffer(8)
    buffer.add(rollout, prompts, torch.arange(4), 0)
    folder = export_for_labelling(buffer, tmp_path / "export")
    records = [json.loads(line) for line in (folder / "trajectories.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3] and records[2]["images"] == ["images/2_0.png", "images/2_1.png"]
    from PIL import Image

    assert Image.open(folder / "images" / "2_1.png").size == (8, 8)
    choices = {0: 1, 1: 0, 2: None, 3: 1}
    lines = [json.dumps({"id": i, "choice": c}) + "\n" for i, c in choices.items()]
    (folder / "labels.jsonl").write_text("".join(lines))
    assert read_labels(folder / "labels.jsonl", 2) == choices
    (tmp_path / "bad.jsonl").write_text('{"id": 0, "choice": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*choice.*0..1"):
        read_labels(tmp_path / "bad.jsonl", 2)
    config = TrainConfig(
        method="d3po",
        dataset=str(folder),
        jsonl_name="trajectories.jsonl",
        d3po_labels=str(folder / "labels.jsonl"),
        d3po_guidance_scale=2.0,
        output_dir=str(tmp_path / "out"),
        train_batch_size=4,
        max_train_steps=1,
        checkpointing_steps=0,
        progress_bar=False,
    )
    result = train(config)
    assert result.history[0]["pairs_kept"] == 0.75  # the null choice is a tie
    assert result.history[0]["loss"] == pytest.approx(0.75 * math.log(2), abs=1e-6)  # the tie adds 0
    assert result.history[0]["reward"] == pytest.approx(3 / 8)  # one-hot choices as rewards


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, pairs_dir):
    """torchrun with 2 CPU processes x 2 prompts gives the losses and rewards of 1 process x 4 prompts: rollouts are
    seeded per record, each process samples its own prompts and keeps its own buffer (replay_0 / replay_1)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    common = ["-m", "diffalign.train", "--method", "d3po", "--dataset", str(pairs_dir), "--max_train_samples", "8"]
    common += ["--lora_target_modules", "to_v,conv1", "--learning_rate", "1e-4", "--d3po_num_steps", "2"]
    common += ["--d3po_guidance_scale", "2", "--max_train_steps", "3", "--checkpointing_steps", "3"]
    common += ["--progress_bar", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    commands = {
        "one": [sys.executable, *common, "--train_batch_size", "4"],
        "two": [*launcher, str(port), *common, "--train_batch_size", "2"],
    }
    for name, command in commands.items():
        done = subprocess.run(
            command + ["--output_dir", str(tmp_path / name)], env=env, cwd=root, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
    history = {n: json.loads((tmp_path / n / "diffalign_train.json").read_text())["history"] for n in commands}
    for key in ("loss", "reward"):
        assert [h[key] for h in history["two"]] == pytest.approx([h[key] for h in history["one"]], abs=1e-5)
    assert (tmp_path / "two" / "checkpoint-3" / "replay_1.safetensors").is_file()
    assert len(ReplayBuffer.load(tmp_path / "two" / "checkpoint-3" / "replay_1.safetensors")) == 6  # 3 steps x 2
