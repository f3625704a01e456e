"""AdjointDPM uses on the embedded digits-cond model: noise optimisation and LoRA reward fine-tuning.

Measured with exactly these settings (weak guidance 0.3, CPU, float32):

| use                                | metric (mean log p of the prompted digit) | before | after |
|------------------------------------|-------------------------------------------|--------|-------|
| optimise x_T, 8 images, 5 steps    | same images, NFE 6 (p: 0.50 -> 0.87)      | -7.18  | -1.54 |
| LoRA, 10 iterations of 8 images    | 32 held-out images, NFE 5                 | -8.05  | -4.78 |

The short LoRA run lowers confident mistakes (the log-prob reward) before it raises accuracy; the script's longer run
is in the README ("Uses on the embedded digits-cond model").
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from adjoint_digits import add_lora, digits_setup, draw, finetune_lora, optimize_noise  # noqa: E402


def test_noise_optimisation_draws_the_prompted_digit():
    setup = digits_setup()
    labels = torch.arange(8)
    x_T, _ = draw(8, 20_000)
    before = setup.score(x_T, labels, 6)
    x_opt = optimize_noise(setup, x_T, labels, steps=5, nfe=6, lr=0.1)
    after = setup.score(x_opt, labels, 6)
    assert after["log_prob"] > before["log_prob"] + 3.0, (before, after)
    assert after["prob"] > before["prob"] + 0.2, (before, after)
    torch.testing.assert_close(x_opt.flatten(1).norm(dim=1), x_T.flatten(1).norm(dim=1))


def test_lora_reward_finetuning_raises_the_held_out_reward():
    setup = digits_setup()
    params = add_lora(setup.unet)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in setup.unet.named_parameters() if "lora" not in n)
    x_eval, labels_eval = draw(32, 10_000)
    before = setup.score(x_eval, labels_eval, 5)
    rewards = finetune_lora(setup, params, iterations=10, batch=8, nfe=5, lr=3e-3)
    after = setup.score(x_eval, labels_eval, 5)
    assert len(rewards) == 10
    assert after["log_prob"] > before["log_prob"] + 1.5, (before, after)
