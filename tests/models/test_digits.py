"""Tests for the embedded digits models, their pipeline, FD-digits and the script that retrains them."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from diffalign.evaluation.frechet import digits_fd_floor, fd_digits, frechet_distance
from diffalign.models.digits import (
    ASSETS_DIR,
    NULL_LABEL,
    DigitsPipeline,
    load_digits_classifier,
    load_digits_data,
    load_digits_pipeline,
    load_digits_unet,
    prompt_to_label,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


@pytest.fixture(scope="module")
def cond_pipe():
    pipe = load_digits_pipeline(conditional=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_assets_are_safetensors_and_json_only():
    files = [p for p in ASSETS_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    # a few MB per model: 8.7 MB in all (digits, digits-cond and the classifier 4.7 MB, digits-clips 3.5 MB, grids)
    assert sum(p.stat().st_size for p in files) < 9_500_000
    for path in files:
        if path.suffix == ".safetensors":
            assert load_file(path)  # readable without pickle
    assert isinstance(load_digits_unet(), UNet2DModel)
    assert isinstance(load_digits_unet(conditional=True), UNet2DConditionModel)
    assert load_digits_unet().dtype == torch.float32


def test_scheduler_config_is_standard_ddpm():
    scheduler = DDPMScheduler.from_pretrained(ASSETS_DIR / "digits", subfolder="scheduler")
    config = scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("linear", 0.0001, 0.02)
    assert (config.num_train_timesteps, config.prediction_type) == (1000, "epsilon")


def test_classifier_held_out_accuracy(classifier):
    images, labels = load_digits_data("test")
    assert len(labels) == 360
    with torch.no_grad():
        logits = classifier(images)  # (N, 10)
        features = classifier.features(images)  # (N, 64)
    assert features.shape == (360, 64)
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.98  # measured 0.997 (359 / 360) on the shipped weights


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    mu1, sigma1, mu2, sigma2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)


def test_fd_digits_real_data_and_noise():
    images, _ = load_digits_data("all")
    assert fd_digits(images) == pytest.approx(0.0, abs=1e-6)  # the real statistics themselves
    floor = digits_fd_floor(seed=0)
    noise = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert 0.0 < floor < 10.0
    assert fd_digits(noise) > 20 * floor


def test_prompt_to_label():
    assert prompt_to_label("a handwritten 7") == 7
    assert prompt_to_label("Seven") == 7
    assert prompt_to_label("the digit zero.") == 0
    assert prompt_to_label("") == NULL_LABEL
    for prompt in ("someone", "a 1 or a 2", "17"):
        with pytest.raises(ValueError):
            prompt_to_label(prompt)


def test_conditional_samples_follow_the_prompt(cond_pipe, classifier):
    digits = torch.arange(64) % 10
    cond_pipe.scheduler = DPMSolverMultistepScheduler.from_config(cond_pipe.scheduler.config)
    images = cond_pipe(
        [f"a handwritten {d}" for d in digits.tolist()],
        num_inference_steps=20,
        guidance_scale=2.5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images  # (64, 1, 8, 8) in [0, 1]
    assert images.shape == (64, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        predicted = classifier(images * 2 - 1).argmax(dim=1)
    assert (predicted == digits).float().mean().item() >= 0.9  # measured 1.0 (and 1.0 over 1,000 samples)


def test_unconditional_pipeline_outputs_and_scheduler_swap():
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    images = pipe(num_images_per_prompt=3, num_inference_steps=8, generator=generator, output_type="np").images
    assert images.shape == (3, 8, 8, 1)
    pil = pipe(num_inference_steps=8, output_type="pil").images
    assert pil[0].size == (8, 8) and pil[0].mode == "L"
    with pytest.raises(ValueError, match="unconditional"):
        pipe("a handwritten 7", num_inference_steps=2)


def test_pipeline_save_pretrained_round_trip(cond_pipe, tmp_path):
    cond_pipe.scheduler = DDIMScheduler.from_config(cond_pipe.scheduler.config)
    cond_pipe.save_pretrained(tmp_path)
    reloaded = DigitsPipeline.from_pretrained(tmp_path, use_safetensors=True)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.scheduler, DDIMScheduler)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_inference_steps=8, guidance_scale=2.0, latents=latents, output_type="latent")
    expected = cond_pipe(["a handwritten 7", "three"], **kwargs).images
    assert torch.allclose(reloaded(["a handwritten 7", "three"], **kwargs).images, expected)


def test_train_script_runs_one_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train_embedded.py"), "--quick", "--out", str(tmp_path)]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=120)
    assert load_digits_classifier(tmp_path / "classifier").config.feature_dim == 64
    pipe = load_digits_pipeline(conditional=True, path=tmp_path / "digits-cond")
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a handwritten 7", num_inference_steps=2, output_type="pt").images.shape == (1, 1, 8, 8)
