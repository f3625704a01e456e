"""DenseDPO: the method on hand-made errors, the clip pair builder and a one-step run on a tiny random video UNet."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet3DConditionModel

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.dense_methods import DenseDPO, DenseDPOOptions
from diffalign.alignment.dense_pairs import ClipPreferenceDataset, segment_labels
from diffalign.alignment.losses import candidate_errors, diffusion_dpo_loss
from diffalign.alignment.methods import MethodInputs
from diffalign.alignment.trainer import train
from diffalign.models.clips import DigitsClipPipeline
from diffalign.models.digits import DigitsPromptEncoder

BETA = 500.0


def inputs(policy, reference, labels) -> MethodInputs:
    batch = {"labels": labels}
    shape = policy.shape
    return MethodInputs(batch, torch.zeros(shape), torch.zeros(shape[:2]), torch.zeros(shape), policy, reference)


def video_errors(seed: int, batch: int = 3, frames: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    policy = torch.rand(batch, 2, 1, frames, 4, 4, generator=generator, dtype=torch.float64)
    reference = torch.rand(batch, 2, 1, frames, 4, 4, generator=generator, dtype=torch.float64)
    return policy, reference


def test_identical_labels_on_every_segment_give_the_clip_level_dpo_loss():
    # exact when every segment has the same margin (losses.densedpo_loss): errors differ across segments and
    # frames, but candidate 1 differs from candidate 0 by one constant per clip (float64: equality to 1e-12)
    method = DenseDPO(DenseDPOOptions(densedpo_beta=BETA))
    policy, reference = video_errors(0)
    segment_shift = torch.tensor([0.0, 0.3, -0.2]).repeat_interleave(2)  # (F,) same shift on both candidates
    policy = policy + segment_shift[None, None, None, :, None, None]
    reference = reference + segment_shift[None, None, None, :, None, None]
    policy[:, 1] = policy[:, 0] + torch.tensor([0.01, -0.02, 0.005])[:, None, None, None, None]
    reference[:, 1] = reference[:, 0]
    labels = torch.ones(3, 3)
    loss, _ = method.loss(inputs(policy, reference, labels))
    policy_w, policy_l = candidate_errors(policy).unbind(1)
    reference_w, reference_l = candidate_errors(reference).unbind(1)
    expected, _ = diffusion_dpo_loss(policy_w, policy_l, reference_w, reference_l, beta=BETA)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # all -1 labels: the clip-level loss with the candidates swapped
    swapped, _ = method.loss(inputs(policy, reference, -labels))
    expected, _ = diffusion_dpo_loss(policy_l, policy_w, reference_l, reference_w, beta=BETA)
    assert swapped.item() == pytest.approx(expected.item(), rel=1e-12)


def test_identical_labels_at_initialisation_give_log2_and_the_clip_level_gradient():
    method = DenseDPO(DenseDPOOptions(densedpo_beta=BETA))
    reference, _ = video_errors(1)
    policy = reference.clone().requires_grad_(True)
    loss, _ = method.loss(inputs(policy, reference, torch.ones(3, 3)))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    clip = reference.clone().requires_grad_(True)
    expected, _ = diffusion_dpo_loss(*candidate_errors(clip).unbind(1), *candidate_errors(reference).unbind(1), BETA)
    expected.backward()
    torch.testing.assert_close(policy.grad, clip.grad, rtol=1e-5, atol=1e-9)


def test_zero_labels_give_no_gradient_and_a_tied_segment_gets_none():
    method = DenseDPO(DenseDPOOptions(densedpo_beta=BETA))
    policy, reference = video_errors(2)
    policy.requires_grad_(True)
    loss, metrics = method.loss(inputs(policy, reference, torch.zeros(3, 3)))
    loss.backward()
    assert loss.item() == 0.0 and metrics["labelled_fraction"].item() == 0.0
    assert policy.grad.abs().max().item() == 0.0
    policy.grad = None
    labels = torch.tensor([[1.0, 0.0, -1.0]] * 3)  # segment 1 (frames 2, 3) tied
    method.loss(inputs(policy, reference, labels))[0].backward()
    assert policy.grad[:, :, :, 2:4].abs().max().item() == 0.0
    assert policy.grad[:, :, :, :2].abs().min().item() > 0.0 and policy.grad[:, :, :, 4:].abs().min().item() > 0.0


def test_densedpo_refuses_image_batches_and_missing_labels():
    method = DenseDPO(DenseDPOOptions())
    errors = torch.rand(2, 2, 1, 4, 4)
    with pytest.raises(ValueError, match="video UNet"):
        method.loss(inputs(errors, errors, torch.ones(2, 1)))
    with pytest.raises(ValueError, match="per-segment labels"):
        method.loss(MethodInputs({}, errors, errors, errors, errors, errors))
    with pytest.raises(ValueError, match="densedpo_beta"):
        TrainConfig(method="densedpo", densedpo_beta=0.0)


def test_segment_labels_use_the_tie_threshold():
    rewards_0 = torch.tensor([[0.0, -0.5, -0.04]])
    rewards_1 = torch.tensor([[-0.2, 0.0, 0.0]])
    assert segment_labels(rewards_0, rewards_1, tie_threshold=0.05).tolist() == [[1.0, -1.0, 0.0]]


def tiny_clip_pipeline(path):
    unet = UNet3DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    pipeline = DigitsClipPipeline(unet, DDPMScheduler(num_train_timesteps=1000), DigitsPromptEncoder(hidden_size=16))
    pipeline.save_pretrained(path)
    return path


def write_clip_pairs(folder, num_records: int = 4, frames: int = 4):
    (folder / "clips").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(num_records):
        names = []
        for k in range(2):
            names.append(f"clips/{i}_{k}.npy")
            np.save(folder / names[-1], rng.uniform(-1, 1, size=(1, frames, 8, 8)).astype(np.float32))
        lines.append(json.dumps({"prompt": f"a handwritten {i}", "clips": names, "labels": [1, -1]}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_clip_dataset_reads_pixels_with_a_frame_axis(tmp_path):
    folder = write_clip_pairs(tmp_path / "data")
    records = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    item = ClipPreferenceDataset(folder)[1]
    assert item["pixels"].shape == (2, 1, 4, 8, 8) and item["labels"].tolist() == [1.0, -1.0]
    records[0]["clips"][0] = "../outside.npy"
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="outside"):
        ClipPreferenceDataset(folder)[0]


def test_one_densedpo_step_on_a_tiny_video_unet_with_checkpoint_and_resume(tmp_path):
    from diffalign.alignment.video import load_digits_clips

    model = tiny_clip_pipeline(tmp_path / "tiny_clips")
    folder = write_clip_pairs(tmp_path / "data")
    options = dict(
        pretrained_model_name_or_path=str(model),
        dataset=str(folder),
        method="densedpo",
        densedpo_beta=BETA,
        output_dir=str(tmp_path / "run"),
        train_batch_size=2,
        max_train_steps=1,
        checkpointing_steps=1,
        learning_rate=1e-3,
        lora_target_modules="to_q,to_v",
        progress_bar=False,
    )
    result = train(TrainConfig(**options))
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts at the reference
    assert result.history[0]["labelled_fraction"] == 1.0
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
    resumed = train(TrainConfig(**dict(options, max_train_steps=2, resume_from_checkpoint="latest")))
    assert [line["step"] for line in resumed.history] == [2]
    pipeline = load_digits_clips(str(model))
    pipeline.unet.load_lora_adapter(
        str(tmp_path / "run"), prefix="unet", weight_name="pytorch_lora_weights.safetensors"
    )
    clips = pipeline("a handwritten 3", num_frames=4, num_inference_steps=2, output_type="latent").frames
    assert clips.shape == (1, 1, 4, 8, 8) and torch.isfinite(clips).all()


def test_make_clip_pairs_orders_by_clip_reward_and_labels_by_segment(tmp_path):
    from diffalign.alignment.dense_pairs import TIE_THRESHOLD, make_clip_pairs
    from diffalign.alignment.video import load_digits_clips

    pipeline = load_digits_clips(str(tiny_clip_pipeline(tmp_path / "tiny_clips")))
    folder = make_clip_pairs(tmp_path / "pairs", pipeline, num_pairs=4, strength=0.5, batch_size=4)
    records = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        rewards_0, rewards_1 = torch.tensor(record["segments"])  # (S,) each
        assert record["scores"][0] >= record["scores"][1]
        assert record["scores"][0] == pytest.approx(rewards_0.mean().item(), abs=1e-6)
        assert record["labels"] == segment_labels(rewards_0[None], rewards_1[None], TIE_THRESHOLD)[0].tolist()
        assert np.load(folder / record["clips"][0]).shape == (1, 6, 8, 8)
    assert ClipPreferenceDataset(folder)[0]["pixels"].shape == (2, 1, 6, 8, 8)


def test_loaded_clip_pipeline_samples_in_eval_mode_the_same_clips_from_the_same_noise(tmp_path):
    from diffalign.alignment.video import load_digits_clips
    from diffalign.evaluation.clip_segments import sample_segment_rewards

    pipeline = load_digits_clips(str(tiny_clip_pipeline(tmp_path / "tiny_clips")))
    assert not pipeline.unet.training  # UNet3D's temporal convolutions have dropout 0.1
    prompts, seeds = ["a handwritten 3", "a handwritten 7"], [0, 1]
    first = sample_segment_rewards(pipeline, prompts, seeds)  # (4, 3)
    torch.testing.assert_close(sample_segment_rewards(pipeline, prompts, seeds), first, rtol=0, atol=0)


def test_compare_segments_reports_each_segment_and_the_clip():
    from diffalign.evaluation.clip_segments import compare_segments

    base = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tuned = base + torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    report = compare_segments(tuned, base, group_size=4)
    assert report["segment_0"]["mean_difference"] == pytest.approx(0.5, abs=1e-9)
    assert report["segment_0"]["mean_difference_ci"] == pytest.approx([0.5, 0.5], abs=1e-9)
    assert report["segment_1"]["mean_difference"] == pytest.approx(0.0, abs=1e-12)
    assert report["clip"]["mean_difference"] == pytest.approx(0.5 / 3, abs=1e-9)
    assert report["segment_0"]["win_rate"] == 1.0


def test_full_finetune_of_the_video_unet_saves_a_pipeline_that_loads(tmp_path):
    from diffalign.alignment.video import load_digits_clips

    model = tiny_clip_pipeline(tmp_path / "tiny_clips")
    config = TrainConfig(
        pretrained_model_name_or_path=str(model),
        dataset=str(write_clip_pairs(tmp_path / "data")),
        method="densedpo",
        finetune="full",
        output_dir=str(tmp_path / "run"),
        train_batch_size=2,
        max_train_steps=1,
        checkpointing_steps=0,
        progress_bar=False,
    )
    result = train(config)
    loaded = load_digits_clips(str(tmp_path / "run")).unet
    for name, value in result.unet.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
