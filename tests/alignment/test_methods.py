"""The method interface: options in --help, the reference skipped when not needed, metrics logged as they are, the
rollout hook called before the loss, and Diffusion-DPO's errors reduced per candidate."""

import dataclasses
import math

import pytest
import torch

from diffalign.alignment import step as step_module
from diffalign.alignment.config import TrainConfig, parse_config
from diffalign.alignment.digits_pairs import make_digits_pairs
from diffalign.alignment.losses import candidate_errors
from diffalign.alignment.methods import METHODS, DiffusionDPO, DPOOptions, MethodInputs, PreferenceMethod
from diffalign.alignment.rollout import Rollout
from diffalign.alignment.trainer import train
from diffalign.models.digits import load_digits_pipeline


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return make_digits_pairs(tmp_path_factory.mktemp("pairs"), load_digits_pipeline(True), samples_per_digit=2)


@dataclasses.dataclass
class NoOptions:
    pass


class ErrorGap(PreferenceMethod):
    """A reference-free toy: minimise the preferred candidate's error minus the others' (independent noise)."""

    name, Options, noise, needs_reference, display = "gap", NoOptions, "independent", False, ("gap",)
    seen: list = []

    def loss(self, inputs: MethodInputs):
        self.seen.append(inputs)
        errors = candidate_errors(inputs.policy_errors)  # (B, K)
        gap = errors[:, 0] - errors[:, 1:].mean(1)
        return gap.mean(), {"gap": gap.mean().detach(), "count": torch.tensor(float(errors.shape[0]))}


class FakeOnline(ErrorGap):
    """Online toy: 'samples' by returning the batch's candidates at the end of a 2-step chain, reward = -index."""

    name, online, events = "fake_online", True, []

    def rollout(self, request):
        self.events.append(("rollout", request))
        size, num_candidates, *shape = request.latent_shape
        chain = torch.zeros(size, num_candidates, 3, *shape)
        chain[:, :, -1] = torch.arange(float(num_candidates)).reshape(1, -1, 1, 1, 1)  # x_0 = the candidate number
        rewards = -torch.arange(float(num_candidates)).expand(size, -1)
        steps = torch.zeros(size, num_candidates, 2)
        return Rollout(latents=chain, timesteps=steps.long(), log_probs=steps, rewards=rewards)

    def loss(self, inputs):
        self.events.append(("loss", inputs))
        return super().loss(inputs)


class InversionGap(ErrorGap):
    """The toy with noise from the DDIM inversion of each candidate by the policy."""

    name, noise = "inversion_gap", "inversion"


def small(tmp_path, pairs_dir, name, **overrides):
    options = dict(output_dir=str(tmp_path / name), dataset=str(pairs_dir), train_batch_size=4, max_train_samples=8)
    options |= dict(lora_target_modules="to_v,conv1", checkpointing_steps=0, progress_bar=False, max_train_steps=2)
    return TrainConfig(**(options | overrides))


def test_method_options_are_a_help_group_and_beta_keeps_working(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = capsys.readouterr().out
    assert "method dpo (Diffusion-DPO):\n  --beta BETA" in out
    assert parse_config(["--beta", "250"]).beta == 250.0
    with pytest.raises(ValueError, match="beta must be > 0"):
        TrainConfig(beta=0)


def test_a_reference_free_method_skips_the_reference_and_logs_its_own_metrics(tmp_path, pairs_dir, monkeypatch):
    monkeypatch.setitem(METHODS, "gap", ErrorGap)
    monkeypatch.setattr(ErrorGap, "seen", [])
    calls = []
    monkeypatch.setattr(step_module.PreferenceStep, "reference_output", lambda *a: calls.append(a))
    result = train(small(tmp_path, pairs_dir, "gap", method="gap"))
    assert calls == []  # no reference forward
    assert set(result.history[0]) == {"step", "loss", "gap", "count", "skipped", "lr"}
    assert result.history[0]["count"] == 4.0 and result.history[0]["gap"] == pytest.approx(result.history[0]["loss"])
    inputs = ErrorGap.seen[0]
    assert inputs.reference_errors is None and inputs.policy_errors.shape == (4, 2, 1, 8, 8)
    assert inputs.noise.shape == (4, 2, 1, 8, 8) and inputs.timesteps.shape == (4, 2)
    assert not torch.equal(inputs.noise[:, 0], inputs.noise[:, 1])  # independent per candidate


def test_the_inversion_provider_runs_in_the_trainer(tmp_path, pairs_dir, monkeypatch):
    monkeypatch.setitem(METHODS, "inversion_gap", InversionGap)
    monkeypatch.setattr(InversionGap, "seen", [])
    result = train(small(tmp_path, pairs_dir, "inversion", method="inversion_gap", max_train_steps=1))
    inputs = InversionGap.seen[0]
    assert (inputs.timesteps == inputs.timesteps[:, :1]).all()  # one t per prompt
    assert not torch.equal(inputs.noise[:, 0], inputs.noise[:, 1])  # each candidate's own inversion
    assert math.isfinite(result.history[0]["loss"])


def test_flip_labels_reverses_the_candidates_and_negates_scores():
    batch = dict(pixels=torch.arange(6.0).reshape(1, 3, 2), scores=torch.tensor([[3.0, 2.0, 1.0]]), index=[0])
    flipped = step_module.flip_preferences(batch)
    assert flipped["pixels"].tolist() == [[[4.0, 5.0], [2.0, 3.0], [0.0, 1.0]]]
    assert flipped["scores"].tolist() == [[-1.0, -2.0, -3.0]]  # the old worst is now first and ranked best
    assert flipped["index"] == [0]


def test_an_online_method_is_rolled_out_before_its_loss(tmp_path, pairs_dir, monkeypatch):
    monkeypatch.setitem(METHODS, "fake_online", FakeOnline)
    monkeypatch.setattr(FakeOnline, "events", [])
    train(small(tmp_path, pairs_dir, "online", method="fake_online", max_train_steps=1))
    assert [kind for kind, _ in FakeOnline.events] == ["rollout", "loss"]
    request, inputs = FakeOnline.events[0][1], FakeOnline.events[1][1]
    assert request.latent_shape == (4, 2, 1, 8, 8) and request.batch["index"].shape == (4,)
    assert isinstance(inputs.rollout, Rollout)
    torch.testing.assert_close(inputs.latents, inputs.rollout.latents[:, :, -1])  # the rollout's samples are trained
    torch.testing.assert_close(inputs.batch["scores"], inputs.rollout.rewards)
    x = torch.zeros(8, 1, 8, 8)  # K B candidates
    assert request.unet(x, torch.full((8,), 10)).shape == (8, 1, 8, 8)  # the policy, conditioning bound in
    assert request.decode(x).min() == 0.5  # pixel space: [-1, 1] -> [0, 1]


def test_rollout_shapes_are_checked():
    with pytest.raises(ValueError, match=r"Rollout.log_probs has shape \(2, 3, 4\).*must be \(2, 3, 5\)"):
        Rollout(torch.zeros(2, 3, 6, 1, 8, 8), torch.zeros(2, 3, 5), torch.zeros(2, 3, 4), torch.zeros(2, 3))


def test_dpo_reduces_unreduced_errors_per_candidate_and_is_log2_at_init():
    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(3, 2, 1, 4, 4, generator=generator)  # (B, K, c, h, w)
    inputs = MethodInputs({}, errors, torch.zeros(3, 2), errors, errors, errors.clone())
    loss, metrics = DiffusionDPO(DPOOptions(beta=500.0)).loss(inputs)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    gap = errors[:, 0].flatten(1).mean(1) - errors[:, 1].flatten(1).mean(1)
    torch.testing.assert_close(metrics["policy_mse_gap"], gap.mean())
    with pytest.raises(ValueError, match="K = 3"):
        DiffusionDPO(DPOOptions()).loss(MethodInputs({}, errors, None, None, torch.rand(3, 3, 1, 4, 4), None))
