"""Tests for the reward models: the digits reward on real digits, and the registry's errors."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import importlib.util
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipTextConfig,
    BlipVisionConfig,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
)

from diffalign.evaluation.rewards import REWARDS, RewardModel, load_reward
from diffalign.evaluation.rewards.aesthetic import AestheticMLP
from diffalign.evaluation.rewards.base import to_pil_images
from diffalign.evaluation.rewards.convert import HPS_PREPROCESS, VIT_H_14
from diffalign.evaluation.rewards.hps import CLIP_MEAN as HPS_CLIP_MEAN
from diffalign.evaluation.rewards.hps import CLIP_STD as HPS_CLIP_STD
from diffalign.evaluation.rewards.hps import IMAGE_SIZE as HPS_IMAGE_SIZE
from diffalign.evaluation.rewards.hps import hps_preprocess
from diffalign.evaluation.rewards.imagereward import ImageRewardModel
from diffalign.models.digits import load_digits_data

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_reward_checkpoint.py"

# ---------------------------------------------------------------------------------------------------------------------
# digits: log p(prompted digit)


@pytest.fixture(scope="module")
def digits_reward():
    return load_reward("digits")


@pytest.fixture(scope="module")
def held_out_digits():
    images, labels = load_digits_data("test")  # (N, 1, 8, 8) in [-1, 1], (N,)
    return (images[:200] + 1) / 2, labels[:200]  # the reward takes images in [0, 1]


def test_digits_reward_prefers_the_prompted_digit(digits_reward, held_out_digits):
    images, labels = held_out_digits
    right = digits_reward.score(images, [f"a handwritten {int(y)}" for y in labels])  # (N,)
    wrong = digits_reward.score(images, [f"a handwritten {(int(y) + 1) % 10}" for y in labels])
    assert isinstance(digits_reward, RewardModel) and right.shape == (200,) and right.dtype == torch.float32
    assert (right <= 0).all()  # log-probabilities
    assert (right > wrong).float().mean() > 0.95  # the classifier's held-out accuracy is about 0.98
    assert right.mean() > -0.2 and wrong.mean() < -5.0


def test_digits_reward_pil_matches_tensor_and_batches(digits_reward, held_out_digits):
    images, labels = held_out_digits
    prompts = [str(int(y)) for y in labels[:8]]
    quantised = (images[:8] * 255).round() / 255  # what an 8-bit PIL image holds
    from_tensor = digits_reward.score(quantised, prompts)
    from_pil = digits_reward.score(to_pil_images(images[:8]), prompts)
    one_by_one = torch.cat([digits_reward.score(quantised[i : i + 1], prompts[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(from_pil, from_tensor, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one, from_tensor, atol=1e-5, rtol=0)
    assert digits_reward.version.startswith("embedded:digits/classifier#sha256:")


def test_digits_reward_rejects_bad_input(digits_reward, held_out_digits):
    images, _ = held_out_digits
    with pytest.raises(ValueError, match="one prompt per image"):
        digits_reward.score(images[:3], ["1", "2"])
    with pytest.raises(ValueError, match="needs a digit"):
        digits_reward.score(images[:1], [""])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        digits_reward.score(images[:1] * 2 - 1.5, ["1"])
    with pytest.raises(ValueError, match="8x8"):
        digits_reward.score(torch.zeros(1, 1, 16, 16), ["1"])


def test_load_reward_errors(tmp_path):
    assert set(REWARDS) == {"digits", "clip", "pickscore", "hpsv2.1", "imagereward", "aesthetic"}
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        load_reward("nope")
    with pytest.raises(FileNotFoundError, match="no digits model folder"):
        load_reward(f"digits:{tmp_path / 'missing'}")
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    checkpoint.write_bytes(b"not read")
    for name in (str(checkpoint), f"digits:{checkpoint}"):
        with pytest.raises(ValueError, match="convert_reward_checkpoint.py"):
            load_reward(name)
    with pytest.raises(ValueError, match="'pickscore:"):
        load_reward(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# tiny random-weight hub rewards, built offline


def write_tiny_clip_tokenizer(folder: Path) -> int:
    """A byte-level BPE vocabulary of printable ASCII (+ "</w>" forms) and no merges; returns its size."""
    chars = [chr(code) for code in range(ord("!"), ord("~") + 1)]  # byte-level BPE maps these bytes to themselves
    tokens = chars + [char + "</w>" for char in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


# openai/clip-vit-large-patch14 preprocessor_config.json as published (legacy CLIPFeatureExtractor format)
OPENAI_CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    vocab_size = write_tiny_clip_tokenizer(folder)
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    text = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    text.update(max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    config = CLIPConfig(text_config=text, vision_config={**vision, "num_attention_heads": 4}, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(OPENAI_CLIP_PREPROCESSOR_CONFIG))
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("rewards") / "tiny_clip")


def sample_images(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 40, 56, generator=generator)  # (N, 3, H, W) in [0, 1], not square
    prompts = ["a red cube", "two dogs", "x", "a very long prompt " * 20][:n]  # the last one is truncated
    return images, prompts


def assert_reward_contract(reward, images, prompts):
    """(N,) float32 scores; scored one at a time in reverse order they are the batched scores reversed: batching does
    not change a score and image i is scored with prompt i."""
    scores = reward.score(images, prompts)
    assert scores.shape == (len(prompts),) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    order = list(range(len(prompts)))[::-1]
    batch_size, reward.batch_size = reward.batch_size, 1
    one_by_one = reward.score(
        images[order] if isinstance(images, torch.Tensor) else [images[i] for i in order], [prompts[i] for i in order]
    )
    reward.batch_size = batch_size
    torch.testing.assert_close(one_by_one, scores[order], atol=1e-5, rtol=1e-5)
    return scores


# Published CLIP preprocessing (openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K
# preprocessor_config.json; OpenAI CLIP `_transform`; ImageReward `_transform(224)`; open_clip OPENAI_DATASET_MEAN/STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def published_clip_transform(image: Image.Image) -> torch.Tensor:
    """Shortest side to 224 (PIL bicubic; the long side truncated, as torchvision ``Resize(224)``), centre-crop 224,
    scale to [0, 1], normalise with the CLIP mean/std: (3, 224, 224)."""
    width, height = image.size
    scale = CLIP_SIZE / min(width, height)
    resized = image.resize((int(width * scale), int(height * scale)), Image.BICUBIC)
    left, top = (resized.width - CLIP_SIZE) // 2, (resized.height - CLIP_SIZE) // 2
    pixels = np.asarray(resized.crop((left, top, left + CLIP_SIZE, top + CLIP_SIZE)), dtype=np.float32) / 255.0
    return (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(
        CLIP_STD
    )[:, None, None]


def test_clip_score_and_pickscore_on_tiny_clip(tiny_clip):
    images, prompts = sample_images()
    clip = load_reward(f"clip:{tiny_clip}")
    pick = load_reward(f"pickscore:{tiny_clip}")
    assert clip.version == pick.version and clip.version.startswith(f"{tiny_clip.resolve()}#sha256:")
    clip_scores = assert_reward_contract(clip, images, prompts)
    pick_scores = assert_reward_contract(pick, to_pil_images(images), prompts)

    # against CLIPModel's own forward: logits_per_image = exp(logit_scale) * cos(image, text)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = torch.stack([published_clip_transform(image) for image in to_pil_images(images)])  # (N, 3, 224, 224)
    tokens = clip.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=pixels, **tokens).logits_per_image.diagonal()  # (N,)
    torch.testing.assert_close(pick_scores, logits, atol=1e-4, rtol=1e-4)  # PickScore = exp(s) cos
    cosine = logits / model.logit_scale.exp()
    torch.testing.assert_close(clip_scores, (100 * cosine).clamp(min=0), atol=1e-3, rtol=1e-4)  # 100 max(cos, 0)
    # prompt i belongs to image i: rolling the prompts changes the scores
    assert not torch.allclose(clip.score(images, prompts[1:] + prompts[:1]), clip_scores, atol=1e-3)


def test_clip_preprocessing_matches_the_published_constants(tiny_clip):
    clip = load_reward(f"clip:{tiny_clip}")
    processor = clip.image_processor
    assert processor.size["shortest_edge"] == CLIP_SIZE
    assert (processor.crop_size["height"], processor.crop_size["width"]) == (CLIP_SIZE, CLIP_SIZE)
    assert processor.resample == Image.BICUBIC and processor.do_center_crop and processor.do_normalize
    np.testing.assert_allclose(processor.image_mean, CLIP_MEAN, rtol=0, atol=1e-8)
    np.testing.assert_allclose(processor.image_std, CLIP_STD, rtol=0, atol=1e-8)
    image = to_pil_images(sample_images(1)[0])[0]
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0]  # (3, 224, 224)
    torch.testing.assert_close(pixels, published_clip_transform(image), atol=1e-5, rtol=0)


def test_pickscore_takes_a_separate_processor(tiny_clip, tmp_path):
    model_only = tmp_path / "model_only"
    CLIPModel.from_pretrained(tiny_clip).save_pretrained(model_only)
    with pytest.raises(FileNotFoundError, match="processor=FOLDER_OR_HUB_ID"):
        load_reward(f"pickscore:{model_only}")
    reward = load_reward(f"pickscore:{model_only}", processor=str(tiny_clip))
    assert f"(processor {tiny_clip.resolve()}#sha256:" in reward.version
    assert reward.score(*sample_images(2)).shape == (2,)


def run_convert_script(*argv: str) -> int:
    spec = importlib.util.spec_from_file_location("convert_reward_checkpoint", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.main(list(argv))


def test_aesthetic_predictor_from_a_converted_pth(tiny_clip, tmp_path):
    torch.manual_seed(1)
    mlp = AestheticMLP(16)  # the tiny CLIP's projection_dim
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert run_convert_script(
        "--kind", "aesthetic", "--checkpoint", str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
        "--out", str(tmp_path / "aesthetic"),
    ) == 0  # fmt: skip
    reward = load_reward(f"aesthetic:{tmp_path / 'aesthetic'}", clip=str(tiny_clip))
    assert reward.version.startswith(f"mlp {(tmp_path / 'aesthetic').resolve()}#sha256:")
    assert reward.version.endswith(f"clip {tiny_clip.resolve()}#sha256:{reward.version.rsplit(':', 1)[-1]}")
    images, prompts = sample_images(4)
    scores = assert_reward_contract(reward, images, prompts)
    torch.testing.assert_close(reward.score(images, ["ignored"] * 4), scores, atol=0, rtol=0)  # prompts unused
    # MLP(E_I / |E_I|) with the projected CLIP image embedding
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = torch.stack([published_clip_transform(image) for image in to_pil_images(images)])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        expected = mlp.eval()(features / features.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="aesthetic_mlp.safetensors"):
        load_reward(f"aesthetic:{tmp_path}", clip=str(tiny_clip))
    mlp_768 = tmp_path / "mlp768"
    mlp_768.mkdir()
    save_file(AestheticMLP(768).state_dict(), mlp_768 / "aesthetic_mlp.safetensors")
    with pytest.raises(ValueError, match="768-D features"):
        load_reward(f"aesthetic:{mlp_768}", clip=str(tiny_clip))


def original_imagereward_state_dict(model: ImageRewardModel) -> dict[str, torch.Tensor]:
    """``model``'s weights under the names of the published ``ImageReward.pt`` (BLIP ``vit.py`` / ``med.py``)."""
    renames = [  # transformers BlipVisionModel -> Salesforce BLIP VisionTransformer
        (r"^embeddings\.class_embedding$", "cls_token"),
        (r"^embeddings\.position_embedding$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
        (r"^post_layernorm\.", "norm."),
    ]
    state = {}
    for key, value in model.vision_model.state_dict().items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        state[f"blip.visual_encoder.{key}"] = value.clone()
    state.update({f"blip.text_encoder.{key}": value.clone() for key, value in model.text_encoder.state_dict().items()})
    state.update({f"mlp.{key}": value.clone() for key, value in model.mlp.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # buffers and heads it drops
    state["blip.vision_proj.weight"] = torch.zeros(8, 64)
    return state


def test_imagereward_from_a_converted_checkpoint(tmp_path):
    words = ["a", "red", "cube", "two", "dogs", "handwritten", "7", "x", "very", "long", "prompt"]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    BertTokenizerFast(str(tmp_path / "bert" / "vocab.txt")).save_pretrained(tmp_path / "bert")
    med_config = {  # the published med_config.json's fields, tiny sizes; vocab = BERT + [DEC] + [ENC]
        "vocab_size": 5 + len(words) + 2, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 64, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 64,
    }  # fmt: skip
    (tmp_path / "med_config.json").write_text(json.dumps(med_config))
    vision = BlipVisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1, image_size=224, patch_size=32
    )
    text = BlipTextConfig(**{k: med_config[k] for k in list(med_config)[:8]}, encoder_hidden_size=64)
    torch.manual_seed(2)
    original = ImageRewardModel(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    torch.save({"state_dict": original_imagereward_state_dict(original)}, tmp_path / "ImageReward.pt")
    out = tmp_path / "imagereward"
    assert run_convert_script(
        "--kind", "imagereward", "--checkpoint", str(tmp_path / "ImageReward.pt"),
        "--med_config", str(tmp_path / "med_config.json"), "--tokenizer", str(tmp_path / "bert"), "--out", str(out),
    ) == 0  # fmt: skip
    source = json.loads((out / "reward_source.json").read_text())
    assert source["dropped_keys"] == ["blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight"]
    reward = load_reward(f"imagereward:{out}")
    assert reward.version.startswith(f"{out.resolve()}#sha256:")
    for key, value in original.state_dict().items():  # every tensor landed where transformers' BLIP reads it
        torch.testing.assert_close(reward.model.state_dict()[key], value, atol=0, rtol=0)
    vision_config = reward.model.vision_model.config
    assert (vision_config.num_attention_heads, vision_config.layer_norm_eps, vision_config.image_size) == (
        1,
        1e-6,
        224,
    )
    images, prompts = sample_images(4)
    scores = assert_reward_contract(reward, images, prompts)
    assert not torch.allclose(reward.score(images, prompts[1:] + prompts[:1]), scores, atol=1e-4)
    # ImageReward.score: (MLP(h_[CLS]) - mean) / std, prompt tokens padded to 35 with [CLS] first
    tokens = reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (4, 35) and (tokens["input_ids"][:, 0] == 2).all()
    pixels = torch.stack([published_clip_transform(image) for image in to_pil_images(images)])
    with torch.no_grad():
        raw = original.eval()(pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(scores, (raw - 0.16717362830052426) / 1.0333394966054072, atol=1e-5, rtol=1e-5)
    # the preprocessing is ImageReward's _transform(224): the published CLIP constants
    processor = reward.image_processor
    assert (processor.size["shortest_edge"], processor.crop_size["height"], processor.resample) == (224, 224, 3)
    np.testing.assert_allclose(processor.image_mean, CLIP_MEAN, atol=1e-8, rtol=0)
    np.testing.assert_allclose(processor.image_std, CLIP_STD, atol=1e-8, rtol=0)


def test_conversion_reads_tensors_only(tmp_path):
    torch.save({"state_dict": {"layers.0.weight": torch.zeros(2, 2)}, "config": Path("/etc")}, tmp_path / "x.pth")
    with pytest.raises(pickle.UnpicklingError):  # torch.load(weights_only=True) refuses arbitrary objects
        run_convert_script(
            "--kind", "aesthetic", "--checkpoint", str(tmp_path / "x.pth"), "--out", str(tmp_path / "o")
        )
    assert not (tmp_path / "o").exists()


def test_hps_preprocess_is_the_published_resize_max_size():
    # hpsv2 create_model_and_transforms(light_augmentation=True): ToTensor, ResizeMaxSize(224, fill=0), Normalize
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    assert (HPS_IMAGE_SIZE, HPS_CLIP_MEAN, HPS_CLIP_STD) == (CLIP_SIZE, CLIP_MEAN, CLIP_STD)
    assert (HPS_PREPROCESS["mean"], HPS_PREPROCESS["std"]) == (list(CLIP_MEAN), list(CLIP_STD))
    grey = hps_preprocess(Image.new("RGB", (300, 150), (128, 128, 128)))  # W=300, H=150 -> 224 x 112, padded
    assert grey.shape == (3, 224, 224)
    torch.testing.assert_close(grey[:, 56:168], ((128 / 255 - mean) / std).expand(3, 112, 224), atol=1e-5, rtol=0)
    torch.testing.assert_close(grey[:, :56], (-mean / std).expand(3, 56, 224), atol=1e-6, rtol=0)  # fill 0
    torch.testing.assert_close(grey[:, 168:], (-mean / std).expand(3, 56, 224), atol=1e-6, rtol=0)
    square = to_pil_images(torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(3)))[0]
    exact = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(hps_preprocess(square), (exact - mean) / std, atol=1e-6, rtol=0)  # no resize at 224


def fake_hps_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"module.logit_scale": torch.tensor(4.6), "module.visual.proj": torch.ones(4, 2)}}, path)
    return path


def test_hps_conversion_and_the_missing_open_clip_error(tmp_path, monkeypatch):
    checkpoint = fake_hps_checkpoint(tmp_path / "HPS_v2.1_compressed.pt")
    out = tmp_path / "hps"
    assert run_convert_script("--kind", "hpsv2.1", "--checkpoint", str(checkpoint), "--out", str(out)) == 0
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == VIT_H_14 and config["preprocess_cfg"]["resize_mode"] == "longest"
    assert sorted(load_file(out / "open_clip_model.safetensors")) == ["logit_scale", "visual.proj"]
    source = json.loads((out / "reward_source.json").read_text())
    assert source["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as on a machine without open-clip-torch
    with pytest.raises(ImportError, match=r"pip install diffalign\[eval\]"):
        load_reward(f"hpsv2.1:{out}")


def test_hpsv21_on_a_tiny_open_clip_model(tmp_path):
    open_clip = pytest.importorskip("open_clip")  # open-clip-torch needs a torchvision built for the installed torch
    folder = tmp_path / "tiny_hps"
    folder.mkdir()
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(4)
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    save_file(
        {key: value.contiguous() for key, value in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    reward = load_reward(f"hpsv2.1:{folder}")
    images, prompts = sample_images(4)
    scores = assert_reward_contract(reward, images, prompts)
    pixels = torch.stack([hps_preprocess(image) for image in to_pil_images(images)])
    with torch.no_grad():  # hpsv2.img_score: diag(image_features @ text_features.T), no logit scale
        outputs = model(pixels, open_clip.get_tokenizer(f"local-dir:{folder}")(prompts))  # normalised features
        image_features, text_features = (
            (outputs["image_features"], outputs["text_features"]) if isinstance(outputs, dict) else outputs[:2]
        )
        expected = (image_features @ text_features.T).diagonal()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_hub_and_converted_defaults_fail_with_instructions(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no reward-model folder"):
        load_reward(f"pickscore:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="could not fetch nobody/no-such-reward@main"):
        load_reward("clip:nobody/no-such-reward")  # HF_HUB_OFFLINE=1 and not cached
    with pytest.raises(ValueError, match="applies to hub ids only"):
        load_reward(f"clip:{tmp_path}", revision="abc123")
    monkeypatch.setenv("DIFFALIGN_REWARDS_DIR", str(tmp_path))
    for name in ("hpsv2.1", "imagereward", "aesthetic"):
        with pytest.raises(FileNotFoundError, match=f"convert_reward_checkpoint.py --kind {re.escape(name)}"):
            load_reward(name)
    for name in (str(fake_hps_checkpoint(tmp_path / "HPS_v2.1_compressed.pt")), f"hpsv2.1:{tmp_path}/x.pth"):
        with pytest.raises(ValueError, match="pickled checkpoint"):
            load_reward(name)


def test_hub_ids_record_the_resolved_commit(tiny_clip, tmp_path, monkeypatch):
    # an offline hub cache holding "someone/tiny-clip" at two commits; main points at the second
    commits = ["a" * 40, "b" * 40]
    repo = tmp_path / "models--someone--tiny-clip"
    for commit in commits:
        shutil.copytree(tiny_clip, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[1])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert load_reward("clip:someone/tiny-clip").version == f"someone/tiny-clip@{commits[1]}"
    pinned = load_reward("pickscore:someone/tiny-clip", revision=commits[0])
    assert pinned.version == f"someone/tiny-clip@{commits[0]}"
