"""RankDPO as a method: Diffusion-DPO on pairs through the trainer, tied scores without weight or gradient, the K = 4
weights of raw reward scores through Syn-Pic by hand, shared noise, resume, and the tiny SDXL pipeline."""

import math

import pytest
import tiny_pipelines as tiny
import torch
import torch.nn.functional as F
from data_fixtures import write_ranked_parquet
from scored_fixtures import make_scored_digits

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_pairs import make_digits_pairs
from diffalign.alignment.methods import MethodInputs
from diffalign.alignment.rankdpo import RankDPO, RankDPOOptions
from diffalign.alignment.trainer import train
from diffalign.models.digits import load_digits_pipeline


def config(tmp_path, dataset, name, **overrides):
    options = dict(method="rankdpo", dataset=str(dataset), output_dir=str(tmp_path / name), train_batch_size=4)
    options |= dict(max_train_samples=8, lora_target_modules="to_v,conv1", checkpointing_steps=0, progress_bar=False)
    return TrainConfig(**(options | dict(max_train_steps=1) | overrides))


def inputs(scores, policy, reference=None) -> MethodInputs:
    reference = torch.zeros_like(policy) if reference is None else reference
    return MethodInputs({"scores": torch.tensor(scores)}, policy, None, policy, policy, reference)


def test_pairs_give_diffusion_dpo_through_the_trainer(tmp_path):
    """Pairs without scores (stored order = preference) at the same beta: the same losses and LoRA, to float32
    rounding (RankDPO subtracts (L - L_ref) per candidate, DPO (L_w - L_l) per model)."""
    pairs = make_digits_pairs(tmp_path / "pairs", load_digits_pipeline(True), samples_per_digit=2)
    steps = dict(max_train_steps=2, learning_rate=1e-3, beta=500.0, rankdpo_beta=500.0)
    rank = train(config(tmp_path, pairs, "rank", **steps))
    dpo = train(config(tmp_path, pairs, "dpo", method="dpo", **steps))
    assert rank.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(rank.history, dpo.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["implicit_accuracy"] == b["implicit_accuracy"]
    assert rank.history[1]["loss"] != pytest.approx(math.log(2), abs=1e-5)  # the second step saw a trained policy
    trained = dict(rank.unet.named_parameters())
    for name, parameter in dpo.unet.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(trained[name], parameter, atol=1e-6, rtol=1e-4, msg=name)


def test_tied_scores_get_no_weight_and_no_gradient():
    errors = torch.rand(2, 4, 1, 2, 2, generator=torch.Generator().manual_seed(0)).requires_grad_()
    scores = [[-1.0, -1.0, -1.0, -1.0], [-0.1, -0.1, -3.0, -3.0]]  # prompt 0 all tied; prompt 1 two tied pairs
    loss, _ = RankDPO(RankDPOOptions(rankdpo_beta=100.0)).loss(inputs(scores, errors))
    loss.backward()
    assert torch.equal(errors.grad[0], torch.zeros_like(errors.grad[0]))
    assert (errors.grad[1].flatten(1).abs().sum(1) > 0).all()
    all_tied, _ = RankDPO(RankDPOOptions()).loss(inputs([[0.0, 0.0]], torch.rand(1, 2).requires_grad_()))
    assert all_tied.item() == 0.0


def test_k4_weights_of_raw_reward_scores_by_hand():
    """Raw log-probabilities -> Syn-Pic phi = wins / 3 = (1, 1/3, 2/3, 0); gains 2^phi - 1; positions by phi
    (ranking 'labels') 1, 3, 2, 4 with 1 / log2(1 + r) = 1, 0.5, 0.630930, 0.430677; W_ij = |dG| |dD|."""
    hand = {  # (i, j): W_ij for i above j
        (0, 1): (1 - 0.259921) * (1 - 0.5),
        (0, 2): (1 - 0.587401) * (1 - 0.630930),
        (0, 3): 1.0 * (1 - 0.430677),
        (2, 1): (0.587401 - 0.259921) * (0.630930 - 0.5),
        (2, 3): 0.587401 * (0.630930 - 0.430677),
        (1, 3): 0.259921 * (0.5 - 0.430677),
    }
    excess = torch.tensor([[0.3, -0.2, 0.1, 0.5]])  # L_theta - L_ref per candidate (reference errors 0)
    beta = 2.0
    expected = sum(w * F.softplus(0.5 * beta * (excess[0, i] - excess[0, j])) for (i, j), w in hand.items())
    options = RankDPOOptions(rankdpo_beta=beta, rankdpo_ranking="labels", rankdpo_normalize=False)
    loss, metrics = RankDPO(options).loss(inputs([[-0.1, -2.0, -0.5, -5.0]], excess))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["pair_weight"].item() == pytest.approx(sum(hand.values()) / 6, abs=1e-5)
    normalized, _ = RankDPO(RankDPOOptions(rankdpo_beta=beta, rankdpo_ranking="labels")).loss(
        inputs([[-0.1, -2.0, -0.5, -5.0]], excess)
    )
    assert normalized.item() == pytest.approx(expected.item() / sum(hand.values()), abs=1e-5)
    # 'scores' takes the stored scores as phi: scores already in [0, 1] as Syn-Pic's give the same loss
    direct = RankDPO(RankDPOOptions(beta, "scores", "labels", rankdpo_normalize=False))
    same, _ = direct.loss(inputs([[1.0, 1 / 3, 2 / 3, 0.0]], excess))
    assert same.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return make_scored_digits(tmp_path_factory.mktemp("scored"))


def test_k4_candidates_share_noise_and_resume_continues_the_curve(tmp_path, scored):
    candidates, _ = scored
    common = dict(max_train_samples=None, checkpointing_steps=2, learning_rate=1e-3)
    full = train(config(tmp_path, candidates, "full", max_train_steps=4, **common)).history
    assert full[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and full[0]["pair_weight"] > 0
    train(config(tmp_path, candidates, "resumed", max_train_steps=2, **common))
    common |= dict(max_train_steps=4, resume_from_checkpoint="latest")
    resumed = train(config(tmp_path, candidates, "resumed", **common))
    assert [h["step"] for h in resumed.history] == [3, 4]
    for a, b in zip(full[2:], resumed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_rankdpo_one_step_full_finetune_on_tiny_sdxl(tmp_path):
    tiny.make_sdxl_pipeline(tmp_path)
    dataset = write_ranked_parquet(tmp_path / "ranked.parquet", num_rows=2, k=4)
    result = train(
        config(
            tmp_path,
            dataset,
            "out",
            pretrained_model_name_or_path=str(tmp_path / "sdxl"),
            finetune="full",
            train_batch_size=2,
            max_train_samples=None,
        )
    )
    # the frozen copy under no_grad and the policy with autograd round differently (see test_trainer_sd.py)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=5e-4)
    assert math.isfinite(result.history[0]["pair_weight"]) and result.history[0]["pair_weight"] > 0
    assert (tmp_path / "out" / "model_index.json").is_file()  # the full pipeline with the trained UNet
