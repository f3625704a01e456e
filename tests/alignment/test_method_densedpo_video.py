"""DenseDPO on latent video pipelines: a tiny random ``TextToVideoSDPipeline`` (image VAE + CLIP text encoder +
``UNet3DConditionModel``) and a tiny ``AnimateDiffPipeline`` (``UNetMotionModel``), built and saved locally."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tiny_pipelines as tiny
import torch
import torch.nn.functional as F
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    MotionAdapter,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from transformers import CLIPTextModel

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.models import load_backbone
from diffalign.alignment.noise import record_generator
from diffalign.alignment.trainer import train
from diffalign.alignment.video import load_video_pipeline

BETA = 5000.0
SEED = 0
FRAMES, SIZE = 4, 16  # clips (3, 4, 16, 16); VAE factor 2 -> latents (4, 4, 8, 8)
LABELS = [[1, -1], [1, 0], [-1, -1], [0, 1]]  # S = 2 segments of 2 latent frames each
PROMPTS = ["a red ball", "a blue car", "a dog runs", "rain"]
LORA_FILE = "pytorch_lora_weights.safetensors"


UNET_SIZES = dict(
    sample_size=SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=tiny.TEXT_HIDDEN,
    attention_head_dim=4,
)
"""The tiny video UNets' sizes (UNet3DConditionModel and the SD UNet under AnimateDiff's motion adapter)."""


def tiny_vae() -> AutoencoderKL:
    return tiny.tiny_vae(block_out_channels=(8, 8), norm_num_groups=2)


def text_parts(tmp: Path) -> dict:
    tokenizer = tiny.make_tokenizer(tmp / "tokenizer_src")
    torch.manual_seed(0)
    return dict(text_encoder=CLIPTextModel(tiny.text_config(tokenizer)), tokenizer=tokenizer)


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(**tiny.BETAS, clip_sample=False, set_alpha_to_one=False)


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory) -> Path:
    """A tiny random TextToVideoSDPipeline saved with save_pretrained (the layout of ali-vilab/text-to-video-ms)."""
    tmp = tmp_path_factory.mktemp("t2v")
    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        **UNET_SIZES,
    )
    torch.manual_seed(1)
    pipeline = TextToVideoSDPipeline(unet=unet, vae=tiny_vae(), scheduler=scheduler(), **text_parts(tmp))
    pipeline.save_pretrained(tmp / "t2v")
    return tmp / "t2v"


def write_clip_pairs(folder: Path, frames: int = FRAMES, size: int = SIZE, channels: int = 3) -> Path:
    (folder / "clips").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (prompt, labels) in enumerate(zip(PROMPTS, LABELS, strict=True)):
        names = [f"clips/{i}_{k}.npy" for k in range(2)]
        for name in names:
            np.save(folder / name, rng.uniform(-1, 1, size=(channels, frames, size, size)).astype(np.float32))
        lines.append(json.dumps({"prompt": prompt, "clips": names, "labels": labels}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_options(model: Path, data: Path, out: Path, **extra) -> dict:
    defaults = dict(
        pretrained_model_name_or_path=str(model),
        dataset=str(data),
        method="densedpo",
        densedpo_beta=BETA,
        output_dir=str(out),
        train_batch_size=len(PROMPTS),  # one batch = every record: the loss does not depend on the data order
        max_train_steps=1,
        checkpointing_steps=1,
        learning_rate=1e-2,
        seed=SEED,
        progress_bar=False,
    )
    return {**defaults, **extra}


@pytest.fixture(scope="module")
def first_run(t2v_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    data = write_clip_pairs(tmp / "data")
    options = run_options(t2v_dir, data, tmp / "out")
    result = train(TrainConfig(**options))
    lora = tmp / "first_lora"  # the LoRA after step 1 (a resumed run in the same folder overwrites the output)
    lora.mkdir()
    (lora / LORA_FILE).write_bytes((tmp / "out" / LORA_FILE).read_bytes())
    return options, result, lora


@torch.no_grad()
def hand_loss(model: Path, data: Path, lora: Path, epoch: int, labels: torch.Tensor) -> float:
    """DenseDPO's loss written out for one batch of every record: each frame through the image VAE, the policy =
    a fresh pipeline + the saved LoRA (``pipe.load_lora_weights``), the reference = a fresh base pipeline, one t and
    eps per record from ``record_generator``, per-segment mean squared errors, -log sigmoid per labelled segment."""
    policy_pipe, reference_pipe = load_video_pipeline(str(model)), load_video_pipeline(str(model))
    policy_pipe.load_lora_weights(str(lora))
    vae = reference_pipe.vae
    noise_scheduler = DDPMScheduler.from_config(reference_pipe.scheduler.config)
    records = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    clips = torch.stack(
        [torch.stack([torch.from_numpy(np.load(data / name)) for name in r["clips"]]) for r in records]
    )  # (B, 2, 3, F, H, W)
    num_records = len(records)
    frames = [vae.encode(clips[:, :, :, f].flatten(0, 1)).latent_dist.mode() for f in range(FRAMES)]  # (2B, 4, h, w)
    latents = (
        torch.stack(frames, dim=2).unflatten(0, (num_records, 2)) * vae.config.scaling_factor
    )  # (B, 2, 4, F, h, w)
    draws = [record_generator(SEED, epoch, index) for index in range(num_records)]
    t = torch.cat([torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g) for g in draws])
    eps = torch.stack([torch.randn(latents.shape[2:], generator=g) for g in draws])  # (B, 4, F, h, w)
    # candidate-major (2B, ...) as the trainer stacks them: all candidates 0, then all candidates 1
    x0 = latents.transpose(0, 1).flatten(0, 1)  # (2B, 4, F, h, w)
    noise, steps = eps.repeat(2, 1, 1, 1, 1), t.repeat(2)
    noisy = noise_scheduler.add_noise(x0, noise, steps)
    hidden, _ = reference_pipe.encode_prompt([r["prompt"] for r in records], "cpu", 1, False)  # (B, 77, D)
    segment_errors = []
    for pipe in (policy_pipe, reference_pipe):
        output = pipe.unet(noisy, steps, encoder_hidden_states=hidden.repeat(2, 1, 1)).sample  # (2B, 4, F, h, w)
        per_frame = (output - noise).pow(2).mean(dim=(1, 3, 4))  # (2B, F)
        per_segment = per_frame.view(2, num_records, 2, FRAMES // 2).mean(dim=3)  # (2, B, S): frames [0, 1], [2, 3]
        segment_errors.append(per_segment)
    (policy_0, policy_1), (reference_0, reference_1) = segment_errors  # each (B, S)
    margin = (policy_0 - policy_1) - (reference_0 - reference_1)  # (B, S)
    terms = -F.logsigmoid(-BETA / 2 * labels * margin)  # (B, S)
    return (terms * (labels != 0)).sum().item() / (labels != 0).sum().item()


def test_first_step_is_log2_and_the_lora_moves_and_reloads_into_a_fresh_pipeline(first_run, t2v_dir):
    _, result, lora = first_run
    assert len(result.history) == 1
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0: policy = reference
    assert result.history[0]["labelled_fraction"] == pytest.approx(6 / 8)
    lora_b = [p for name, p in result.unet.named_parameters() if "lora_B" in name]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 1e-3  # the adapters moved (lr 1e-2)
    pipe = load_video_pipeline(str(t2v_dir))
    x = torch.randn(2, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(1))
    t, hidden = torch.tensor([300, 700]), torch.randn(2, 77, tiny.TEXT_HIDDEN, generator=torch.Generator())
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(str(lora))
        loaded = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        trained = result.unet.eval()(x, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)
    assert (loaded - base).abs().max().item() > 1e-3
    frames = pipe("a red ball", num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2).frames
    assert np.asarray(frames).shape[-4:] == (FRAMES, SIZE, SIZE, 3)


def test_resume_reproduces_the_run_and_its_second_step_equals_the_hand_computed_dense_loss(first_run, t2v_dir):
    options, _, lora = first_run
    data = Path(options["dataset"])
    resumed = train(TrainConfig(**dict(options, max_train_steps=3, resume_from_checkpoint="latest")))
    assert [line["step"] for line in resumed.history] == [2, 3]
    straight = train(TrainConfig(**dict(options, max_train_steps=3, output_dir=str(lora.parent / "straight"))))
    for a, b in zip(resumed.history, straight.history[1:], strict=True):  # the same weights and Adam state
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    loss = resumed.history[0]["loss"]
    labels = torch.tensor(LABELS, dtype=torch.float32)
    # step 2 = epoch 1 (one batch per epoch), policy = the LoRA after step 1 (the first run's saved weights)
    expected = hand_loss(t2v_dir, data, lora, epoch=1, labels=labels)
    # float32 rounding of the per-segment errors (~1e-8, it differs with the thread count) times beta / 2 = 2500
    # moves the loss by up to ~1e-4; the labels move it by > 1e-2 (below)
    assert loss == pytest.approx(expected, abs=5e-4)
    clip_level = hand_loss(t2v_dir, data, lora, epoch=1, labels=torch.ones_like(labels))
    print(f"step-2 loss {loss:.6f}, hand {expected:.6f}, hand with every label +1 {clip_level:.6f}")
    assert abs(expected - math.log(2)) > 1e-2 and abs(clip_level - expected) > 1e-2  # the segment labels matter


def test_full_finetune_saves_a_pipeline_stock_diffusers_loads(t2v_dir, tmp_path):
    data = write_clip_pairs(tmp_path / "data")
    options = run_options(t2v_dir, data, tmp_path / "out", finetune="full", checkpointing_steps=0)
    result = train(TrainConfig(**options))
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=5e-4)
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet3DConditionModel"]
    reloaded = DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert type(reloaded) is TextToVideoSDPipeline
    for (name, a), b in zip(reloaded.unet.state_dict().items(), result.unet.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_clips_the_vae_cannot_take_get_clear_errors(t2v_dir):
    backbone = load_backbone(str(t2v_dir))
    assert backbone.kind == "video" and backbone.is_video and backbone.resolution == SIZE
    with pytest.raises(ValueError, match="multiples of its downsampling factor 2"):
        backbone.encode_images(torch.zeros(1, 3, FRAMES, 15, 16))
    with pytest.raises(ValueError, match="C = 3"):
        backbone.encode_images(torch.zeros(1, 1, FRAMES, 16, 16))
    clips = torch.rand(2, 3, 9, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 18 frames: 2 chunks
    latents = backbone.encode_images(clips)  # any frame count: frames are images
    with torch.no_grad():
        vae = backbone.vae
        frame_7 = vae.encode(clips[:, :, 7]).latent_dist.mode() * vae.config.scaling_factor  # (2, 4, 8, 8)
    assert latents.shape == (2, 4, 9, 8, 8)
    torch.testing.assert_close(latents[:, :, 7], frame_7, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--dataset is required"):
        from diffalign.alignment.dense_pairs import build_clip_dataset

        build_clip_dataset(TrainConfig(pretrained_model_name_or_path=str(t2v_dir), method="densedpo"), backbone, None)
    with pytest.raises(ValueError, match="Drop --eval_steps"):
        build_clip_dataset(TrainConfig(dataset="clips", method="densedpo", eval_steps=5), backbone, None)


@pytest.fixture(scope="module")
def animatediff_dir(tmp_path_factory) -> Path:
    """A tiny random AnimateDiffPipeline (SD UNet + MotionAdapter -> UNetMotionModel) saved with save_pretrained."""
    tmp = tmp_path_factory.mktemp("animatediff")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **UNET_SIZES,
    )
    torch.manual_seed(1)
    motion_adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    )
    torch.manual_seed(2)
    pipeline = AnimateDiffPipeline(
        unet=unet, motion_adapter=motion_adapter, vae=tiny_vae(), scheduler=scheduler(), **text_parts(tmp)
    )
    pipeline.save_pretrained(tmp / "animatediff")
    return tmp / "animatediff"


def test_one_densedpo_step_on_a_tiny_animatediff_pipeline_and_its_lora_reloads(animatediff_dir, tmp_path):
    data = write_clip_pairs(tmp_path / "data")
    result = train(TrainConfig(**run_options(animatediff_dir, data, tmp_path / "out", checkpointing_steps=0)))
    assert type(result.unet).__name__ == "UNetMotionModel"
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.history[0]["labelled_fraction"] == pytest.approx(6 / 8)
    motion_lora = [p for name, p in result.unet.named_parameters() if "motion_modules" in name and "lora_B" in name]
    assert motion_lora and max(p.abs().max().item() for p in motion_lora) > 1e-3  # temporal attention trains too
    pipe = DiffusionPipeline.from_pretrained(str(animatediff_dir))  # stock diffusers
    pipe.load_lora_weights(str(tmp_path / "out"))
    x = torch.randn(2, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(1))
    t, hidden = torch.tensor([300, 700]), torch.randn(2, 77, tiny.TEXT_HIDDEN, generator=torch.Generator())
    per_frame = hidden.repeat_interleave(FRAMES, dim=0)  # (2 F, 77, D): UNetMotionModel's layout
    with torch.no_grad():
        loaded = pipe.unet(x, t, encoder_hidden_states=per_frame).sample
        trained = result.unet.eval()(x, t, encoder_hidden_states=per_frame).sample
        per_clip = result.unet(x, t, encoder_hidden_states=hidden).sample  # the trainer's hook repeats them
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(per_clip, trained, rtol=0, atol=0)
    backbone = load_backbone(str(animatediff_dir))
    with pytest.raises(ValueError, match="motion_max_seq_length = 8"):
        backbone.encode_images(torch.zeros(1, 3, 9, SIZE, SIZE))
