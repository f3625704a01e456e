"""Tests for the reward models: the digits reward on real digits, and the registry's errors."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from diffalign.evaluation.rewards import REWARDS, RewardModel, load_reward
from diffalign.evaluation.rewards.base import to_pil_images
from diffalign.pipelines.digits import load_digits_data

# ---------------------------------------------------------------------------------------------------------------------
# digits: log p(prompted digit)


@pytest.fixture(scope="module")
def digits_reward():
    return load_reward("digits")


@pytest.fixture(scope="module")
def held_out_digits():
    images, labels = load_digits_data("test")  # (N, 1, 8, 8) in [-1, 1], (N,)
    return (images[:200] + 1) / 2, labels[:200]  # the reward takes images in [0, 1]


def test_digits_reward_prefers_the_prompted_digit(digits_reward, held_out_digits):
    images, labels = held_out_digits
    right = digits_reward.score(images, [f"a handwritten {int(y)}" for y in labels])  # (N,)
    wrong = digits_reward.score(images, [f"a handwritten {(int(y) + 1) % 10}" for y in labels])
    assert isinstance(digits_reward, RewardModel) and right.shape == (200,) and right.dtype == torch.float32
    assert (right <= 0).all()  # log-probabilities
    assert (right > wrong).float().mean() > 0.95  # the classifier's held-out accuracy is about 0.98
    assert right.mean() > -0.2 and wrong.mean() < -5.0


def test_digits_reward_pil_matches_tensor_and_batches(digits_reward, held_out_digits):
    images, labels = held_out_digits
    prompts = [str(int(y)) for y in labels[:20]]
    quantised = (images[:20] * 255).round() / 255  # what an 8-bit PIL image holds
    from_tensor = digits_reward.score(quantised, prompts)
    from_pil = digits_reward.score(to_pil_images(images[:20]), prompts)
    one_by_one = torch.cat([digits_reward.score(quantised[i : i + 1], prompts[i : i + 1]) for i in range(20)])
    torch.testing.assert_close(from_pil, from_tensor, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one, from_tensor, atol=1e-5, rtol=0)
    assert digits_reward.version.startswith("embedded:digits/classifier#sha256:")


def test_digits_reward_rejects_bad_input(digits_reward, held_out_digits):
    images, _ = held_out_digits
    with pytest.raises(ValueError, match="one prompt per image"):
        digits_reward.score(images[:3], ["1", "2"])
    with pytest.raises(ValueError, match="needs a digit"):
        digits_reward.score(images[:1], [""])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        digits_reward.score(images[:1] * 2 - 1.5, ["1"])
    with pytest.raises(ValueError, match="8x8"):
        digits_reward.score(torch.zeros(1, 1, 16, 16), ["1"])


def test_load_reward_errors(tmp_path):
    assert set(REWARDS) == {"digits", "clip", "pickscore", "hpsv2.1", "imagereward", "aesthetic"}
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        load_reward("nope")
    with pytest.raises(FileNotFoundError, match="no digits model folder"):
        load_reward(f"digits:{tmp_path / 'missing'}")
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    checkpoint.write_bytes(b"not read")
    for name in (str(checkpoint), f"digits:{checkpoint}"):
        with pytest.raises(ValueError, match="convert_reward_checkpoint.py"):
            load_reward(name)
    with pytest.raises(ValueError, match="'pickscore:"):
        load_reward(str(tmp_path))
