"""The trainer on the embedded digits-cond model (pixel space, no VAE): init, beta, resume, NaN, cache, reward."""

import json
import math

import pytest
import torch
from PIL import Image

from diffalign.alignment import trainer as trainer_module
from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_pairs import evaluate_digits, make_digits_pairs
from diffalign.alignment.trainer import train
from diffalign.models.digits import load_digits_pipeline

LORA_TARGETS = "to_v,to_out.0,conv1,conv2"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """160 best-vs-worst pairs of digits-cond's own samples (32 per digit, DDIM 2 steps)."""
    return make_digits_pairs(tmp_path_factory.mktemp("pairs"), load_digits_pipeline(True), samples_per_digit=32)


def config(tmp_path, pairs_dir, name: str, **overrides) -> TrainConfig:
    options = dict(
        output_dir=str(tmp_path / name),
        dataset=str(pairs_dir),
        train_batch_size=8,
        learning_rate=1e-3,
        beta=500.0,
        lora_target_modules=LORA_TARGETS,
        checkpointing_steps=0,
        progress_bar=False,
    )
    return TrainConfig(**(options | overrides))


def test_first_step_is_log2_and_moves_the_lora(tmp_path, pairs_dir):
    result = train(config(tmp_path, pairs_dir, "init", max_train_steps=1))
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.history[0]["implicit_accuracy"] == 0.0
    lora_b = [p for n, p in result.unet.named_parameters() if "lora_B" in n]
    assert max(p.abs().max().item() for p in lora_b) > 1e-4  # lora_B starts at 0: a non-zero gradient moved it
    assert (tmp_path / "init" / "pytorch_lora_weights.safetensors").is_file()


def test_larger_beta_drifts_less_from_the_reference(tmp_path, pairs_dir):
    base = load_digits_pipeline(True)
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 1000, (64,), generator=generator)
    cond = base.text_encoder(torch.arange(64) % 10)
    with torch.no_grad():
        reference = base.unet(x, t, encoder_hidden_states=cond).sample
    drift = {}
    for beta in (100.0, 10000.0):
        unet = train(config(tmp_path, pairs_dir, f"beta{beta}", beta=beta, max_train_steps=30)).unet
        with torch.no_grad():
            drift[beta] = (unet(x, t, encoder_hidden_states=cond).sample - reference).pow(2).mean().item()
    assert drift[10000.0] < drift[100.0] / 3  # measured 12x less at 40 steps, batch 16


def test_resume_in_epoch_1_continues_the_same_loss_curve(tmp_path, pairs_dir):
    """32 pairs, 4 steps per epoch: stopped at step 5 (in epoch 1) and resumed, the curve is the uninterrupted one."""
    common = dict(max_train_samples=32, train_batch_size=4, gradient_accumulation_steps=2, checkpointing_steps=5)
    full = train(config(tmp_path, pairs_dir, "full", max_train_steps=10, **common)).history
    train(config(tmp_path, pairs_dir, "resumed", max_train_steps=5, **common))
    assert (tmp_path / "resumed" / "checkpoint-5" / "trainer_state.json").is_file()
    resumed = train(
        config(tmp_path, pairs_dir, "resumed", max_train_steps=10, resume_from_checkpoint="latest", **common)
    ).history
    assert [h["step"] for h in resumed] == [6, 7, 8, 9, 10]
    for a, b in zip(full[5:], resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert not list((tmp_path / "resumed").glob(".checkpoint-*"))  # no temporary folders left
    # one history across the interruption: history.jsonl and the summary hold steps 1-10
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "resumed" / "diffalign_train.json").read_text())
    assert [h["step"] for h in lines] == [h["step"] for h in summary["history"]] == list(range(1, 11))
    assert [h["loss"] for h in lines] == pytest.approx([h["loss"] for h in full], abs=1e-6)
    # a resume that would skip other batches is refused, naming what differs
    other = dict(common, train_batch_size=8, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match=r"train_batch_size: 4 -> 8\)"):
        train(config(tmp_path, pairs_dir, "resumed", max_train_steps=12, **other))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, pairs_dir, monkeypatch):
    calls = {"n": 0}
    original = trainer_module.PreferenceStep.__call__

    def poisoned(self, batch, epoch):
        loss, metrics = original(self, batch, epoch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    monkeypatch.setattr(trainer_module.PreferenceStep, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match="at step 3.*checkpoint-2"):
        train(config(tmp_path, pairs_dir, "nan", max_train_steps=5, checkpointing_steps=1))
    assert json.loads((tmp_path / "nan" / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not (tmp_path / "nan" / "checkpoint-3").exists()


def test_cached_run_matches_the_uncached_run(tmp_path, pairs_dir):
    plain = train(config(tmp_path, pairs_dir, "plain", max_train_steps=3)).history
    cache_dir = tmp_path / "cache"
    cached = train(config(tmp_path, pairs_dir, "cached", max_train_steps=3, cache_dir=str(cache_dir))).history
    assert (cache_dir / "meta.json").is_file() and list(cache_dir.glob("shard_*.safetensors"))
    for a, b in zip(plain, cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)


def test_corrupt_images_are_skipped_and_all_corrupt_is_an_error(tmp_path, pairs_dir):
    lines = (pairs_dir / "pairs.jsonl").read_text().splitlines()[:16]
    (tmp_path / "images").mkdir()
    records = []
    for i, line in enumerate(lines):
        record = json.loads(line)
        for key in ("chosen", "rejected"):
            Image.open(pairs_dir / record[key]).save(tmp_path / f"images/{i}_{key}.png")
            record[key] = f"images/{i}_{key}.png"
        records.append(record)
    (tmp_path / "images/0_chosen.png").write_bytes(b"not a png")
    records[1]["rejected"] = "images/missing.png"
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    result = train(config(tmp_path, tmp_path, "some_bad", max_train_steps=2, train_batch_size=8))
    # pairs 0 (corrupt) and 1 (missing) are unreadable: index 0 passes over both, index 1 over one -> 3 skips
    assert result.skipped_pairs == 3

    for i in range(16):
        (tmp_path / f"images/{i}_rejected.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="none of the 16 preference records has readable images"):
        train(config(tmp_path, tmp_path, "all_bad", max_train_steps=1))


def test_dpo_raises_the_reward_and_flipped_labels_lower_it(tmp_path, pairs_dir):
    """The demo in small: classifier log p(prompted digit) on held-out seeds, DDIM 2 steps, no guidance."""
    base = evaluate_digits(load_digits_pipeline(True), samples_per_digit=30)
    scores = {}
    for flip in (False, True):
        options = dict(flip_labels=flip, max_train_steps=40, train_batch_size=32, learning_rate=3e-4)
        pipeline = load_digits_pipeline(True)
        pipeline.unet = train(config(tmp_path, pairs_dir, f"flip{flip}", **options)).unet.eval()
        scores[flip] = evaluate_digits(pipeline, samples_per_digit=30)
    # measured (60 steps): log p -0.162 -> -0.052 (accuracy 0.970 -> 0.990); flipped: -2.35 (accuracy 0.593)
    assert scores[False]["mean_log_prob"] > base["mean_log_prob"] + 0.05
    assert scores[False]["accuracy"] >= base["accuracy"]
    assert scores[True]["mean_log_prob"] < base["mean_log_prob"] - 0.5
    assert scores[True]["accuracy"] < base["accuracy"] - 0.1


def test_attention_backend_switch_trains_the_same(tmp_path, pairs_dir):
    """`--attention fused` (QKV fused, SDPA) gives the default processors' losses: same model, other kernels."""
    runs = {
        name: train(config(tmp_path, pairs_dir, f"attn-{name}", attention=name, max_train_steps=3)).history
        for name in ("default", "fused")
    }
    for a, b in zip(runs["default"], runs["fused"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    with pytest.raises(ValueError, match="attention"):
        train(config(tmp_path, pairs_dir, "attn-bad", attention="no-such-kernel", max_train_steps=1))
