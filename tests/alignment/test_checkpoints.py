"""Checkpoint discovery, the resume config check, the appended history and the LoRA reference switch."""

import json

import pytest
import torch

from diffalign.alignment.checkpoints import RunHistory, find_checkpoint, numbered_checkpoints, read_checkpoint
from diffalign.alignment.step import adapters_disabled
from diffalign.models.digits import load_digits_pipeline


def write_state(folder, step, config=None):
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "config": config}))


def test_latest_ignores_folders_that_are_not_numbered_checkpoints(tmp_path):
    for name, step in (("checkpoint-2", 2), ("checkpoint-10", 10), ("checkpoint-best", 7), ("checkpoint-3-old", 3)):
        write_state(tmp_path / name, step)
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"  # 10 > 2 as numbers, not as text
    assert [p.name for p in numbered_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert find_checkpoint(tmp_path, str(tmp_path / "checkpoint-best")) == tmp_path / "checkpoint-best"


def test_resume_with_another_batch_or_method_is_refused_naming_the_keys(tmp_path):
    saved = dict(train_batch_size=8, gradient_accumulation_steps=2, num_processes=1, method="dpo", learning_rate=1e-3)
    write_state(tmp_path / "checkpoint-4", 4, saved)
    keys = ("train_batch_size", "gradient_accumulation_steps", "num_processes", "method")
    assert read_checkpoint(tmp_path / "checkpoint-4", dict(saved, learning_rate=1e-4), keys) == (4, None)
    changed = dict(saved, train_batch_size=4, num_processes=4)
    with pytest.raises(ValueError, match=r"train_batch_size: 8 -> 4, num_processes: 1 -> 4\)"):
        read_checkpoint(tmp_path / "checkpoint-4", changed, keys)
    with pytest.raises(ValueError, match=r"\(method: 'dpo' -> 'smpo'\)"):
        read_checkpoint(tmp_path / "checkpoint-4", dict(saved, method="smpo"), keys)
    # 2 processes x 4 records = 1 process x 8 records per micro-step: the same records, converted exactly
    step, note = read_checkpoint(tmp_path / "checkpoint-4", dict(saved, train_batch_size=4, num_processes=2), keys)
    assert step == 4 and note.startswith("converted train_batch_size 8 -> 4 and num_processes 1 -> 2 (same global")


def test_history_keeps_the_steps_up_to_the_resume_and_appends(tmp_path):
    history = RunHistory(tmp_path)
    history.start(0)
    for step in (1, 2, 3, 4):
        history.append({"step": step, "loss": 0.1 * step})
    history.start(2)  # resumed from checkpoint-2 after a crash at step 4
    history.append({"step": 3, "loss": 0.5})
    assert [(h["step"], h["loss"]) for h in history.read()] == [(1, 0.1), (2, 0.2), (3, 0.5)]


def test_adapters_come_back_when_the_reference_forward_fails():
    from peft import LoraConfig

    pipeline = load_digits_pipeline(True)
    unet = pipeline.unet
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_v"], init_lora_weights="gaussian"))
    for layer in (m for n, m in unet.named_modules() if n.endswith("to_v.lora_B.default")):
        torch.nn.init.normal_(layer.weight)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    cond = pipeline.text_encoder(torch.tensor([1, 2]))
    with torch.no_grad():
        tuned = unet(x, t, encoder_hidden_states=cond).sample
        with adapters_disabled(unet):
            base = unet(x, t, encoder_hidden_states=cond).sample
        assert (tuned - base).abs().max() > 1e-3  # the switch matters
        with pytest.raises(RuntimeError, match="out of memory"), adapters_disabled(unet):
            raise RuntimeError("out of memory")  # e.g. the reference forward
        after = unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(after, tuned, atol=0, rtol=0)
