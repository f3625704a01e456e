"""Diffusion-DRO on the shared trainer: the online samples and their targets, the perturbed grids, prompt dropping,
the lagged copy, EMA, clipping, resume, full fine-tuning and a one-step run on the tiny SDXL pipeline."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_experts import EXPERTS_JSONL, make_digits_experts
from diffalign.alignment.dro import (
    DROOptions,
    DROState,
    drop_prompts,
    perturbed_grids,
    record_draws,
    sample_online,
)
from diffalign.alignment.trainer import train
from diffalign.models.digits import build_scheduler
from diffalign.samplers import DPMSolverPPScheduler


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    return make_digits_experts(tmp_path_factory.mktemp("experts"), max_images=32)


def config(tmp_path, experts_dir, name: str, **overrides) -> TrainConfig:
    options = dict(
        method="dro",
        dataset=str(experts_dir),
        jsonl_name=EXPERTS_JSONL,
        output_dir=str(tmp_path / name),
        train_batch_size=4,
        max_train_steps=2,
        learning_rate=1e-2,
        dro_sample_steps=4,
        checkpointing_steps=0,
        progress_bar=False,
    )
    return TrainConfig(**(options | overrides))


def trajectory(unet, scheduler_config, x_T, timesteps=None, num_steps=5):
    """The whole DPM-Solver++ trajectory by hand: latents before each step, outputs, latents after, the grid."""
    scheduler = DPMSolverPPScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps) if timesteps is None else scheduler.set_timesteps(timesteps=timesteps)
    x, before, after, outputs = x_T, [], [], []
    for t in scheduler.timesteps:
        before.append(x), outputs.append(unet(x, t.expand(len(x))))
        x = scheduler.step(outputs[-1], t, x).prev_sample
        after.append(x)
    return before, outputs, after, scheduler.timesteps


def toy_unet(x, t):
    return 0.3 * x + t.float()[:, None, None, None] / 1000


def test_sample_online_keeps_the_latent_before_the_drawn_step_as_the_official_buffer():
    scheduler_config = build_scheduler().config
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before, outputs, after, timesteps = trajectory(toy_unet, scheduler_config, x_T)
    # the official buffer: train.py pushes x_T to "xt", callback_on_step_end then the latent after each step, and
    # commit() keeps stack(...)[:, :T]; sample() draws one step per trajectory beside its t and noise_pred
    official_xt = torch.stack([x_T, *after], 1)[:, :5]  # (B, T, c, h, w)
    steps = torch.tensor([4, 0, 2])
    x, t, out = sample_online(toy_unet, scheduler_config, x_T, steps, 5)
    for b, j in enumerate(steps.tolist()):
        torch.testing.assert_close(x[b], official_xt[b, j], rtol=0, atol=0)
        torch.testing.assert_close(x[b], before[j][b], rtol=0, atol=0)
        torch.testing.assert_close(out[b], outputs[j][b], rtol=0, atol=0)
        assert t[b] == timesteps[j]
        assert (x[b] - after[j][b]).abs().max() > 1e-2  # not the latent after the step
    assert t[1] == t.max()  # step 0 is at the largest timestep


def test_perturbed_grids_follow_the_official_formula_and_each_sample_solves_its_own():
    grids = perturbed_grids(torch.tensor([0, 17, 49]), 20, 50)  # (3, 20)
    assert grids[:, 0].tolist() == [950, 967, 999] and grids[:, -1].tolist() == [0, 17, 49]
    assert (grids[:, :-1] - grids[:, 1:] == 50).all()
    scheduler_config = build_scheduler().config
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = torch.tensor([19, 7, 12])
    x, t, out = sample_online(toy_unet, scheduler_config, x_T, steps, 20, grids)
    for b, j in enumerate(steps.tolist()):  # the same as sample b alone on its own grid
        before, outputs, _, timesteps = trajectory(toy_unet, scheduler_config, x_T[b, None], grids[b].tolist(), 20)
        torch.testing.assert_close(x[b], before[j][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[b], outputs[j][0], rtol=1e-6, atol=1e-6)
        assert t[b] == timesteps[j] == grids[b, j]
    # sample 1 on sample 0's noise levels (the official patch's sigmas) would reach another latent
    before_0, *_ = trajectory(toy_unet, scheduler_config, x_T[1, None], grids[0].tolist(), 20)
    assert (x[1] - before_0[7][0]).abs().max() > 1e-3


def test_record_draws_are_per_record_and_drop_at_the_given_rate():
    index = torch.arange(4000)
    draws = record_draws(index, 0, 0, (1, 2, 2), 20, 50)
    assert draws.offsets.min() == 0 and draws.offsets.max() == 49
    assert draws.offsets.float().mean() == pytest.approx(24.5, abs=1.0)  # uniform on 0..49: sd of the mean 0.23
    assert (draws.drop < 0.2).float().mean() == pytest.approx(0.2, abs=0.02)  # binomial sd 0.0063
    again = record_draws(index[[7, 3]], 0, 0, (1, 2, 2), 20, 50)  # a record's draws do not depend on its batch
    for field in ("x_T", "steps", "noise", "offsets", "drop"):
        assert torch.equal(getattr(again, field), getattr(draws, field)[[7, 3]])


def test_drop_prompts_replaces_the_dropped_rows_by_the_empty_prompt():
    cond = {"encoder_hidden_states": torch.arange(12.0).view(3, 2, 2), "text_embeds": torch.ones(3, 4)}
    empty = {"encoder_hidden_states": torch.full((3, 2, 2), -1.0), "text_embeds": torch.zeros(3, 4)}
    dropped = drop_prompts(cond, empty, torch.tensor([False, True, False]))
    assert torch.equal(dropped["encoder_hidden_states"][1], empty["encoder_hidden_states"][1])
    assert torch.equal(dropped["encoder_hidden_states"][[0, 2]], cond["encoder_hidden_states"][[0, 2]])
    assert dropped["text_embeds"].sum(1).tolist() == [4.0, 0.0, 4.0]


def test_dropping_every_prompt_trains_as_on_empty_prompts(tmp_path, experts_dir):
    empty_dir = tmp_path / "empty_prompts"
    shutil.copytree(experts_dir, empty_dir)
    lines = (empty_dir / EXPERTS_JSONL).read_text().splitlines()
    (empty_dir / EXPERTS_JSONL).write_text(
        "".join(json.dumps(json.loads(line) | {"prompt": ""}) + "\n" for line in lines)
    )
    common = dict(max_train_steps=2, dro_refresh_steps=100)
    dropped = train(config(tmp_path, experts_dir, "dropped", dro_drop_prompt_probability=1.0, **common)).history
    empty = train(config(tmp_path, empty_dir, "empty", dro_drop_prompt_probability=0.0, **common)).history
    kept = train(config(tmp_path, experts_dir, "kept", dro_drop_prompt_probability=0.0, max_train_steps=1)).history
    for key in ("loss", "expert_error", "online_error"):
        assert [h[key] for h in dropped] == pytest.approx([h[key] for h in empty], rel=1e-6, abs=1e-12)
    assert kept[0]["expert_error"] != pytest.approx(dropped[0]["expert_error"], rel=1e-3)


def test_lagged_weights_swap_in_and_restore():
    unet = torch.nn.Linear(3, 2)
    state = DROState(DROOptions(dro_refresh_steps=2, dro_ema_decay=0.5), unet)
    before = [p.detach().clone() for p in unet.parameters()]
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    with state.lagged_weights():
        assert all(torch.equal(p, b) for p, b in zip(unet.parameters(), before, strict=True))
    assert all(torch.equal(p, b + 1) for p, b in zip(unet.parameters(), before, strict=True))
    for _ in range(3):  # micro-steps 0, 1, 2: the refresh before micro-step 2 copies the policy
        state.start_micro_step()
    assert all(torch.equal(lag, b + 1) for lag, b in zip(state.lagged, before, strict=True))


def test_first_step_is_the_margin_and_the_online_error_is_zero_right_after_a_refresh(tmp_path, experts_dir):
    result = train(config(tmp_path, experts_dir, "first", max_train_steps=3, dro_refresh_steps=1))
    first = result.history[0]
    # LoRA starts as the reference (B = 0): every excess is 0 and the hinge gives the margin
    assert first["loss"] == pytest.approx(1e-3, abs=1e-9) and first["active_fraction"] == 1.0
    assert first["expert_error"] > 1e-3
    # refreshed before every micro-step, the policy is the lagged copy, and the online target is the copy's own output
    # at the online latent: the online error is 0 (it would be ~1e-2 with the latent after the solver step)
    assert all(h["online_error"] < 1e-10 for h in result.history)
    lagged = train(config(tmp_path, experts_dir, "lagged", max_train_steps=3, dro_refresh_steps=100))
    assert lagged.history[0]["online_error"] < 1e-10 and lagged.history[2]["online_error"] > 1e-8


def test_swapped_roles_put_the_online_samples_in_the_experts_place(tmp_path, experts_dir):
    normal = train(config(tmp_path, experts_dir, "normal", max_train_steps=1)).history[0]
    swapped = train(config(tmp_path, experts_dir, "swapped", max_train_steps=1, dro_swap_roles=True)).history[0]
    # the same draws at step 1 (policy = reference = lagged copy): the two sides trade places in the hinge, whose
    # direction (expert side pulled down, online side pushed up) test_online_losses checks
    assert swapped["online_error"] == pytest.approx(normal["expert_error"], rel=1e-6)
    assert swapped["expert_error"] == pytest.approx(normal["online_error"], rel=1e-6, abs=1e-12)
    assert normal["expert_error"] > 1e-3 and normal["online_error"] < 1e-10


def test_clipping_bounds_the_total_gradient_norm(tmp_path, experts_dir, monkeypatch):
    from accelerate import Accelerator

    norms = {"before": [], "after": []}
    clip, step = Accelerator.clip_grad_norm_, torch.optim.AdamW.step

    def recording_clip(self, parameters, max_norm, norm_type=2):
        norms["before"].append(float(clip(self, parameters, max_norm, norm_type)))

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms["after"].append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    max_norm = 1e-6
    train(config(tmp_path, experts_dir, "clip", max_train_steps=3, max_grad_norm=max_norm))
    assert len(norms["after"]) == 3 and min(norms["before"]) > 10 * max_norm  # the clip had work to do
    assert max(norms["after"]) <= max_norm * (1 + 1e-4)


def test_resume_continues_the_same_run_with_the_lagged_copy_and_ema(tmp_path, experts_dir):
    common = dict(max_train_steps=5, dro_refresh_steps=2, dro_ema_decay=0.9, checkpointing_steps=3)
    whole = train(config(tmp_path, experts_dir, "whole", **common))
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    state = load_file(str(checkpoint / "dro_state.safetensors"))
    assert {k.split(".")[0] for k in state} == {"lagged", "ema"}
    train(config(tmp_path, experts_dir, "resumed", **(common | {"max_train_steps": 3})))
    resumed = train(config(tmp_path, experts_dir, "resumed", **common, resume_from_checkpoint="latest"))
    assert [h["step"] for h in resumed.history] == [4, 5]
    for a, b in zip(whole.history[3:], resumed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-9)
        assert a["online_error"] == pytest.approx(b["online_error"], rel=1e-4, abs=1e-12)
    for folder in ("", "ema"):
        final_a = load_file(str(tmp_path / "whole" / folder / "pytorch_lora_weights.safetensors"))
        final_b = load_file(str(tmp_path / "resumed" / folder / "pytorch_lora_weights.safetensors"))
        for key in final_a:
            torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-5, atol=1e-7)
    ema = load_file(str(tmp_path / "whole" / "ema" / "pytorch_lora_weights.safetensors"))
    raw = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    assert any((ema[k] - raw[k]).abs().max() > 1e-6 for k in raw)  # the EMA lags behind the policy


def test_full_finetuning_keeps_a_lagged_copy_of_every_weight(tmp_path, experts_dir):
    result = train(config(tmp_path, experts_dir, "full", finetune="full", learning_rate=1e-4, checkpointing_steps=2))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    state = load_file(str(tmp_path / "full" / "checkpoint-2" / "dro_state.safetensors"))
    num_weights = sum(1 for p in result.unet.parameters())
    assert sum(k.startswith("lagged.") for k in state) == num_weights == sum(k.startswith("ema.") for k in state)
    assert (tmp_path / "full" / "ema" / "model_index.json").is_file()


def test_pair_methods_refuse_single_image_records(tmp_path, experts_dir):
    with pytest.raises(ValueError, match="needs K >= 2 candidates"):
        train(config(tmp_path, experts_dir, "dpo", method="dpo", max_train_steps=1))


def test_one_dro_step_on_the_tiny_sdxl_pipeline(tmp_path):
    spec = importlib.util.spec_from_file_location("sd_tests", Path(__file__).with_name("test_trainer_sd.py"))
    sd_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_tests)
    sd_tests.tiny.make_sdxl_pipeline(tmp_path)
    dataset = sd_tests.write_pickapic(tmp_path / "data.parquet")  # pairs: the preferred image is the expert
    result = train(
        TrainConfig(
            method="dro",
            pretrained_model_name_or_path=str(tmp_path / "sdxl"),
            dataset=str(dataset),
            output_dir=str(tmp_path / "out"),
            train_batch_size=2,
            max_train_steps=1,
            dro_sample_steps=2,
            checkpointing_steps=1,
            progress_bar=False,
        )
    )
    assert result.history[0]["loss"] == pytest.approx(1e-3, abs=1e-9)
    assert (tmp_path / "out" / "checkpoint-1" / "dro_state.safetensors").is_file()
    assert (tmp_path / "out" / "ema" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, experts_dir):
    """Global batch 8 on 2 processes and on 1: the same losses and the same final EMA (each process draws its
    records' x_T, step and noise from the records' seeds; the lagged copy and EMA are the same on both)."""
    import sys

    spec = importlib.util.spec_from_file_location("mp_tests", Path(__file__).with_name("test_multiprocess.py"))
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    args = ["-m", "diffalign.train", "--method", "dro", "--dataset", str(experts_dir), "--jsonl_name", EXPERTS_JSONL]
    args += ["--dro_sample_steps", "4", "--dro_refresh_steps", "2", "--dro_ema_decay", "0.9", "--max_train_steps", "4"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    mp.run([sys.executable, *args, "--train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    mp.run(launcher + [str(mp.free_port()), *args, "--train_batch_size", "4", "--output_dir", str(tmp_path / "two")])
    assert mp.history(tmp_path / "two") == pytest.approx(mp.history(tmp_path / "one"), rel=1e-4, abs=1e-8)
    ema_one = load_file(str(tmp_path / "one" / "ema" / "pytorch_lora_weights.safetensors"))
    ema_two = load_file(str(tmp_path / "two" / "ema" / "pytorch_lora_weights.safetensors"))
    for key in ema_one:  # Adam magnifies the all-reduce's rounding on tiny gradients: measured max 1.9e-5
        torch.testing.assert_close(ema_two[key], ema_one[key], rtol=1e-4, atol=1e-4)
