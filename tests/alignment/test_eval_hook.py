"""``diffalign train --eval_steps``: the eval harness's numbers logged during training, against direct scoring."""

import json

import pytest

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_pairs import make_digits_pairs
from diffalign.alignment.trainer import train
from diffalign.evaluation.harness import DIGITS_PROMPTS, load_rewards, score_pipeline
from diffalign.pipelines.digits import load_digits_pipeline

SEEDS = [1_000_000, 1_000_001]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return make_digits_pairs(tmp_path_factory.mktemp("pairs"), load_digits_pipeline(True), samples_per_digit=4)


def test_eval_steps_log_policy_and_base_scores_that_match_direct_scoring(tmp_path, pairs_dir):
    config = TrainConfig(
        output_dir=str(tmp_path / "run"),
        dataset=str(pairs_dir),
        train_batch_size=8,
        learning_rate=5e-2,
        lora_target_modules="to_v,to_out.0,conv1,conv2",
        beta=500.0,
        max_train_steps=2,
        checkpointing_steps=0,
        progress_bar=False,
        eval_steps=2,
        eval_num_seeds=len(SEEDS),
    )
    result = train(config)
    assert "eval/digits/win_rate" not in result.history[0]
    logged = result.history[1]
    rewards = load_rewards(["digits"])
    base = score_pipeline(load_digits_pipeline(True), DIGITS_PROMPTS, SEEDS, rewards)["digits"]  # (20,)
    pipeline = load_digits_pipeline(True)
    pipeline.unet = result.unet.eval()
    tuned = score_pipeline(pipeline, DIGITS_PROMPTS, SEEDS, rewards)["digits"]
    assert logged["eval/digits/base_mean"] == pytest.approx(base.mean().item(), abs=1e-5)
    assert logged["eval/digits/tuned_mean"] == pytest.approx(tuned.mean().item(), abs=1e-5)
    assert tuned.sub(base).abs().max() > 1e-4  # the policy moved, so the two rows differ
    wins = (tuned > base).float().mean() + 0.5 * (tuned == base).float().mean()
    assert logged["eval/digits/win_rate"] == pytest.approx(wins.item(), abs=1e-6)
    assert logged["eval/digits/win_rate_low"] <= logged["eval/digits/win_rate"] <= logged["eval/digits/win_rate_high"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert lines[-1]["eval/digits/tuned_mean"] == logged["eval/digits/tuned_mean"]


def test_eval_options_are_validated():
    with pytest.raises(ValueError, match="eval_steps"):
        TrainConfig(eval_steps=-1)
