"""PatchDPO: the method on hand-made errors, patch quality maps (digits features, a tiny random DINOv2) and a
one-step run on the tiny SDXL pipeline from a JSONL folder with weight maps."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tiny_pipelines as tiny
import torch
from PIL import Image

from diffalign.alignment.config import TrainConfig, parse_config
from diffalign.alignment.data import load_preferences
from diffalign.alignment.dense_methods import PatchDPO, PatchDPOOptions
from diffalign.alignment.methods import MethodInputs
from diffalign.alignment.patch_quality import (
    DigitsPatchFeatures,
    SameClassCalibration,
    TransformersPatchFeatures,
    candidate_maps,
    write_quality_maps,
)
from diffalign.alignment.trainer import train


def method_loss(policy_errors, weight_maps):
    shape = policy_errors.shape
    inputs = MethodInputs(
        {"weight_maps": weight_maps}, torch.zeros(shape), torch.zeros(shape[:2]), None, policy_errors, None
    )
    return PatchDPO(PatchDPOOptions()).loss(inputs)


def test_a_uniform_map_gives_the_image_level_loss():
    errors = torch.rand(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    maps = torch.cat([torch.zeros(3, 1, 1, 16, 16), torch.ones(3, 1, 1, 16, 16)], dim=1)  # q_0 = 0, q_1 = 1
    loss, metrics = method_loss(errors, maps)
    assert loss.item() == pytest.approx(errors.mean().item(), rel=1e-12)
    assert metrics["reference_weight"].item() == 1.0 and metrics["generated_weight"].item() == 1.0
    # a uniform q on both: reference weighted 1 - q, generated q
    half, _ = method_loss(errors, torch.full((3, 2, 1, 16, 16), 0.25))
    expected = (0.75 * errors[:, 0].sum() + 0.25 * errors[:, 1].sum()) / errors.numel()
    assert half.item() == pytest.approx(expected.item(), rel=1e-12)


def test_zero_weight_patches_get_zero_gradient():
    errors = torch.rand(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    maps = torch.full((2, 2, 1, 8, 8), 0.5)
    maps[:, 0, :, :4] = 1.0  # reference weight 1 - 1 = 0 on the top half
    maps[:, 1, :, :, 4:] = 0.0  # generated weight 0 on the right half
    method_loss(errors, maps)[0].backward()
    assert errors.grad[:, 0, :, :4].abs().max().item() == 0.0
    assert errors.grad[:, 1, :, :, 4:].abs().max().item() == 0.0
    assert errors.grad[:, 0, :, 4:].min().item() == pytest.approx(0.5 / errors.numel())
    assert errors.grad[:, 1, :, :, :4].min().item() == pytest.approx(0.5 / errors.numel())


def test_patchdpo_needs_weight_maps_and_the_cli_parses_it():
    errors = torch.rand(1, 2, 1, 4, 4)
    with pytest.raises(ValueError, match="patch quality maps"):
        PatchDPO(PatchDPOOptions()).loss(MethodInputs({}, errors, errors, errors, errors, None))
    config = parse_config(["--method", "patchdpo", "--max_train_steps", "3"])
    assert config.method == "patchdpo" and not PatchDPO.needs_reference


def test_digits_features_give_quality_one_for_the_reference_itself_and_less_for_another_digit():
    from diffalign.models.digits import load_digits_data

    images, labels = load_digits_data("train")
    zero, one = images[labels == 0][0], images[labels == 1][0]  # (1, 8, 8) in [-1, 1]
    maps = candidate_maps([(zero + 1) / 2, (zero + 1) / 2, (one + 1) / 2], DigitsPatchFeatures())  # (3, 1, 8, 8)
    assert maps.shape == (3, 1, 8, 8)
    torch.testing.assert_close(maps[1], torch.ones(1, 8, 8), atol=1e-5, rtol=0)
    assert maps[2].mean().item() < 0.9
    torch.testing.assert_close(maps[0], (maps[1] + maps[2]) / 2)  # the reference gets the generated maps' mean


def test_same_class_calibration_spreads_the_quality_and_finds_a_wrong_quadrant():
    from diffalign.models.digits import load_digits_data

    calibration = SameClassCalibration()
    for label, cosines in calibration.cosines.items():  # the real pairs against themselves: quantiles ~ uniform
        quantiles = calibration(cosines[:, None], f"a handwritten {label}")  # (m, 1, 4, 4)
        assert quantiles.mean().item() == pytest.approx(0.495, abs=0.005)
    images, labels = load_digits_data("train")
    zero, one = (images[labels == 0][0] + 1) / 2, (images[labels == 1][0] + 1) / 2  # (1, 8, 8) in [0, 1]
    wrong = zero.clone()
    wrong[:, :4, :4] = one[:, :4, :4]  # the top-left quadrant of a 1 on a 0
    features = DigitsPatchFeatures()
    raw = candidate_maps([zero, zero, wrong], features)  # (3, 1, 8, 8)
    calibrated = candidate_maps([zero, zero, wrong], features, calibration, "a handwritten 0")
    torch.testing.assert_close(calibrated[1], torch.ones(1, 8, 8))  # more faithful than every real pair
    assert raw[2, 0, :4, :4].mean().item() > 0.45  # the raw cosine barely marks the wrong quadrant (measured 0.56)
    assert calibrated[2, 0, :4, :4].mean().item() < 0.05  # its quantile does (measured 0.011)
    assert calibrated[2, 0, 6:, 6:].min().item() > 0.9  # the far corner stays faithful (1.0)


def tiny_dinov2(path: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(path)
    return path


def write_images(folder: Path, num_records: int = 4, size: int = 64) -> Path:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(num_records):
        names = [f"images/{i}_{k}.png" for k in range(2)]
        for name in names:
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        lines.append(json.dumps({"prompt": f"a photo of thing {i}", "chosen": names[0], "rejected": names[1]}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_dinov2_patch_tokens_make_maps_the_dataset_reads(tmp_path):
    features = TransformersPatchFeatures(str(tiny_dinov2(tmp_path / "dinov2")))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert features(image).shape == (1, 16, 2, 2)  # CLS token dropped, 28 / 14 = 2 patches a side
    folder = write_images(tmp_path / "data", num_records=2)
    write_quality_maps(folder, features)
    records = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(records[0]["images"]) == 2 and len(records[0]["weight_maps"]) == 2
    maps = [np.load(folder / name) for name in records[0]["weight_maps"]]
    assert maps[1].shape == (64, 64) and 0.0 <= maps[1].min() and maps[1].max() <= 1.0
    np.testing.assert_allclose(maps[0], maps[1])  # K = 2: the reference gets the generated image's map
    item = load_preferences(str(folder), 64, 3)[0]
    assert item["weight_maps"].shape == (2, 1, 64, 64)


def test_one_patchdpo_step_on_the_tiny_sdxl_pipeline_with_checkpoint_and_resume(tmp_path):
    tiny.make_sdxl_pipeline(tmp_path)
    folder = write_images(tmp_path / "data")
    write_quality_maps(folder, PooledPixelFeatures())
    options = dict(
        pretrained_model_name_or_path=str(tmp_path / "sdxl"),
        dataset=str(folder),
        method="patchdpo",
        output_dir=str(tmp_path / "run"),
        train_batch_size=2,
        max_train_steps=1,
        checkpointing_steps=1,
        learning_rate=1e-3,
        progress_bar=False,
    )
    result = train(TrainConfig(**options))
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])
    assert 0.0 < result.history[0]["generated_weight"] < 1.0
    resumed = train(TrainConfig(**dict(options, max_train_steps=2, resume_from_checkpoint="latest")))
    assert [line["step"] for line in resumed.history] == [2]
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


class PooledPixelFeatures:
    """4x4 average-pooled pixels minus their mean as patch features: a stand-in feature model for the trainer test."""

    def __call__(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 4)  # (N, 3, 4, 4)
        return pooled - pooled.mean(dim=(2, 3), keepdim=True)
