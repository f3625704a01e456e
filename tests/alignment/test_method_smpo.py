"""SmPO as a method: zero gradient at p = 1/2 and Diffusion-DPO with the scaled beta at p = 1 through the trainer,
the inversion provider with the method's options (its round trip on digits: test_noise.py), the score ranges, the
checks on its data."""

import math

import pytest
import tiny_pipelines as tiny
import torch
from data_fixtures import write_ranked_parquet
from scored_fixtures import make_scored_digits, with_scores

from diffalign.alignment.config import TrainConfig, parse_config
from diffalign.alignment.losses import SMPO_PICKSCORE_RANGE
from diffalign.alignment.methods import DiffusionDPO, DPOOptions, MethodInputs
from diffalign.alignment.noise import NoiseRequest, inversion_noise
from diffalign.alignment.smpo import SCORE_RANGES, SmPO, SmPOOptions, parse_score_range
from diffalign.alignment.trainer import train
from diffalign.models.digits import load_digits_pipeline


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return make_scored_digits(tmp_path_factory.mktemp("scored"))


def config(tmp_path, dataset, name, **overrides):
    options = dict(method="smpo", dataset=str(dataset), output_dir=str(tmp_path / name), train_batch_size=4)
    options |= dict(max_train_samples=8, lora_target_modules="to_v,conv1", checkpointing_steps=0, progress_bar=False)
    options |= dict(max_train_steps=1, smpo_score_range="digits", adam_weight_decay=0.0)
    return TrainConfig(**(options | overrides))


def lora_b(unet) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in unet.named_parameters() if "lora_B" in n]


def test_equal_scores_give_no_gradient_through_the_method_and_unequal_ones_do(tmp_path, scored):
    _, pairs = scored
    tied = train(config(tmp_path, with_scores(pairs, tmp_path / "tied", [-0.5, -0.5]), "tied"))
    assert tied.history[0]["preference"] == 0.5 and tied.history[0]["pair_beta"] == 0.0
    assert all(torch.equal(b, torch.zeros_like(b)) for b in lora_b(tied.unet))  # lora_B starts at 0 and stays
    ordered = train(config(tmp_path, with_scores(pairs, tmp_path / "ordered", [-0.1, -2.0]), "ordered"))
    assert max(b.abs().max().item() for b in lora_b(ordered.unet)) > 5e-6  # Adam's first step: lr = 1e-5


def test_certain_preference_is_diffusion_dpo_with_beta_times_scale_through_the_trainer(tmp_path, scored):
    _, pairs = scored
    certain = with_scores(pairs, tmp_path / "certain", [0.0, -100.0])  # p = sigmoid(100) = 1 in float32
    steps = dict(max_train_steps=2, learning_rate=1e-3)
    smpo = train(config(tmp_path, certain, "smpo", **steps, smpo_noise="forward", smpo_beta=50.0))
    dpo = train(config(tmp_path, certain, "dpo", **steps, method="dpo", beta=500.0))
    assert smpo.history[0]["preference"] == 1.0 and smpo.history[0]["pair_beta"] == 500.0
    for a, b in zip(smpo.history, dpo.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert smpo.history[1]["loss"] != pytest.approx(math.log(2), abs=1e-5)  # the second step saw a trained policy
    for a, b in zip(lora_b(smpo.unet), lora_b(dpo.unet), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_method_loss_at_p_one_is_dpo_loss_with_the_scaled_beta_and_p_below_half_reverses():
    generator = torch.Generator().manual_seed(0)
    policy, reference = torch.rand(3, 2, 1, 4, 4, generator=generator), torch.rand(3, 2, 1, 4, 4, generator=generator)
    method = SmPO(SmPOOptions(smpo_beta=20.0, smpo_score_range="digits"))

    def inputs(scores):
        return MethodInputs({"scores": torch.tensor(scores)}, policy, None, policy, policy, reference)

    loss, metrics = method.loss(inputs([[0.0, -100.0]] * 3))
    expected, _ = DiffusionDPO(DPOOptions(beta=200.0)).loss(inputs([[0.0, -100.0]] * 3))
    torch.testing.assert_close(loss, expected, atol=1e-7, rtol=1e-6)
    swapped = MethodInputs({}, policy, None, policy, policy.flip(1), reference.flip(1))
    reversed_loss, _ = method.loss(inputs([[-100.0, 0.0]] * 3))  # p = 0: the same as the swapped pair at p = 1
    torch.testing.assert_close(reversed_loss, DiffusionDPO(DPOOptions(beta=200.0)).loss(swapped)[0])
    # digits range (-1, 0): p = p_0 / (p_0 + p_1) of the classifier probabilities exp(score)
    p = method.preference(torch.tensor([[math.log(0.9), math.log(0.3)]]))
    assert p.item() == pytest.approx(0.9 / 1.2, abs=1e-6)


def test_the_inversion_provider_takes_the_methods_steps_and_forward_noise_is_shared():
    """The round trip inversion -> DDIM sampling on digits is tests/alignment/test_noise.py's (RMS < 0.1 with 4
    steps, < 0.01 with 10 steps and renoise 2 at t = 200); here: the method hands its options to that provider
    (--smpo_inversion uniform)."""
    pipeline = load_digits_pipeline(True)
    cond = pipeline.text_encoder(torch.arange(8) % 10)

    def unet(x, t):
        return pipeline.unet(x, t, encoder_hidden_states=cond).sample

    latents = torch.rand(4, 2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, K, c, h, w)
    request = NoiseRequest(latents, torch.arange(4), 0, 7, pipeline.scheduler, unet)
    uniform = SmPOOptions(smpo_inversion="uniform", smpo_inversion_steps=3, smpo_renoise=1)
    timesteps, eps = SmPO(uniform).noise_provider()(request)
    expected_t, expected_eps = inversion_noise(request, steps=3, renoise=1)
    assert torch.equal(timesteps, expected_t) and torch.equal(eps, expected_eps)
    assert not torch.equal(eps, inversion_noise(request, steps=2)[1])
    assert SmPO.noise == "inversion" and SmPOOptions().smpo_noise == "inversion"  # the paper's default
    assert SmPOOptions().smpo_inversion == "official"  # official_inversion_noise: test_method_smpo_inversion.py
    forward_t, forward_eps = SmPO(SmPOOptions(smpo_noise="forward")).noise_provider()(request)
    assert torch.equal(forward_eps[:, 0], forward_eps[:, 1]) and torch.equal(forward_t, timesteps)  # shared draws


def test_score_ranges_and_bad_input():
    assert parse_score_range("pickscore_cosine") == SMPO_PICKSCORE_RANGE
    assert parse_score_range("pickscore") == pytest.approx((11.543526500463486, 28.201571106910706))
    assert parse_score_range("-3,1.5") == (-3.0, 1.5) and "digits" in SCORE_RANGES
    with pytest.raises(ValueError, match="'MIN,MAX'"):
        TrainConfig(method="smpo", smpo_score_range="wide")
    with pytest.raises(ValueError, match="MAX > MIN"):
        SmPOOptions(smpo_score_range="1,0")
    with pytest.raises(ValueError, match="not allowed"):
        TrainConfig(method="smpo", smpo_noise="sde")
    errors = torch.zeros(2, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="K = 4.*--method rankdpo"):
        SmPO(SmPOOptions()).loss(MethodInputs({"scores": torch.zeros(2, 4)}, errors, None, errors, errors, errors))
    with pytest.raises(ValueError, match="diffalign pairs"):
        pairs = errors[:, :2]
        SmPO(SmPOOptions()).loss(MethodInputs({}, pairs, None, pairs, pairs, pairs))


def test_smpo_one_lora_step_with_policy_inversion_on_tiny_sdxl(tmp_path):
    tiny.make_sdxl_pipeline(tmp_path)
    dataset = write_ranked_parquet(tmp_path / "pairs.parquet", num_rows=2, k=2)  # scores (r, r - 0.1)
    result = train(
        config(
            tmp_path,
            dataset,
            "out",
            pretrained_model_name_or_path=str(tmp_path / "sdxl"),
            smpo_score_range="pickscore",
            smpo_inversion_steps=2,
            train_batch_size=2,
            max_train_samples=None,
        )
    )
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    width = parse_score_range("pickscore")[1] - parse_score_range("pickscore")[0]
    assert result.history[0]["preference"] == pytest.approx(1 / (1 + math.exp(-0.1 / width)), abs=1e-6)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_cli_parses_the_method_options():
    config = parse_config(["--method", "smpo", "--smpo_noise", "forward", "--smpo-score-range=-2,0"])
    assert (config.method, config.smpo_noise, config.smpo_score_range) == ("smpo", "forward", "-2,0")
    config = parse_config(["--method", "smpo", "--smpo-inversion", "uniform", "--smpo_renoise", "2"])
    assert (config.smpo_inversion, config.smpo_renoise, config.smpo_inversion_steps) == ("uniform", 2, 5)
    config = parse_config(["--method", "rankdpo", "--rankdpo_ranking", "labels", "--rankdpo_normalize", "false"])
    assert (config.rankdpo_ranking, config.rankdpo_normalize, config.rankdpo_gain) == ("labels", False, "synpic")
