"""PatchDPO with an IP-Adapter on the tiny SD pipeline: a tiny random CLIP image encoder and IP-Adapter weight file
(the ``image_proj`` / ``ip_adapter`` layout of h94/IP-Adapter) built here and loaded through the real
``pipe.load_ip_adapter``; the reference image conditions the UNet, the first loss is the one computed by hand, and
the gradient reaches LoRA adapters on the IP-Adapter's own projections."""

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_pipelines as tiny
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from diffalign.alignment.config import parse_config
from diffalign.alignment.data import load_preferences
from diffalign.alignment.dense_methods import PatchDPO, PatchDPOOptions
from diffalign.alignment.models import load_backbone
from diffalign.alignment.noise import NoiseRequest, shared_noise
from diffalign.alignment.trainer import train

CLIP_EMBED = 16
"""Projection width of the tiny CLIP image encoder (the IP-Adapter's image embedding)."""
WEIGHT_NAME = "ip-adapter_tiny.safetensors"
IMAGE_SIZE = 64
"""The tiny SD pipeline's native resolution (32 x 32 latents, VAE factor 2)."""


def tiny_ip_adapter(folder: Path, unet) -> Path:
    """``folder/models/`` with a random CLIP image encoder and an IP-Adapter file for ``unet``'s attention widths:
    ``image_proj.proj`` (4 tokens x cross-attention width) + ``norm``, and ``ip_adapter.<1, 3, ...>.to_{k,v}_ip`` for
    each cross-attention layer in ``unet.attn_processors`` order, as diffusers' ``_load_ip_adapter_weights`` reads."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=CLIP_EMBED,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    CLIPVisionModelWithProjection(vision).save_pretrained(folder / "models" / "image_encoder")
    cross = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(1)
    weights = {
        "image_proj.proj.weight": torch.randn(4 * cross, CLIP_EMBED, generator=generator) * 0.5,
        "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    cross_attention = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for key_id, name in zip(range(1, 2 * len(cross_attention), 2), cross_attention, strict=True):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{key_id}.{projection}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.5
    save_file(weights, str(folder / "models" / WEIGHT_NAME))
    return folder


def reference_pairs(folder: Path, quality: float, num_records: int = 2) -> Path:
    """``pairs.jsonl`` records {prompt, images: [reference, generated], weight_maps} with uniform maps q."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(num_records):
        images, maps = [f"images/{i}_{k}.png" for k in range(2)], [f"images/{i}_{k}.npy" for k in range(2)]
        for image, weight_map in zip(images, maps, strict=True):
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / image)
            np.save(folder / weight_map, np.full((IMAGE_SIZE, IMAGE_SIZE), quality, dtype=np.float32))
        lines.append(json.dumps({"prompt": f"a photo of thing {i}", "images": images, "weight_maps": maps}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny SD pipeline folder and a tiny IP-Adapter folder for it."""
    root = tmp_path_factory.mktemp("ip_adapter")
    pipe = tiny.make_sd_pipeline(root)
    return root / "sd", tiny_ip_adapter(root / "adapter", pipe.unet)


def argv(pipeline: Path, adapter: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(pipeline),
        "--method",
        "patchdpo",
        "--patchdpo_ip_adapter",
        str(adapter),
        "--patchdpo_ip_adapter_subfolder",
        "models",
        "--patchdpo_ip_adapter_weight_name",
        WEIGHT_NAME,
        *extra,
    ]


def loaded_backbone(pipeline: Path, adapter: Path, scale: float = 1.0):
    config = parse_config(argv(pipeline, adapter, "--patchdpo_ip_adapter_scale", str(scale)))
    backbone = load_backbone(config.pretrained_model_name_or_path)
    PatchDPO(
        PatchDPOOptions(**{k: getattr(config, k) for k in PatchDPOOptions.__dataclass_fields__})
    ).prepare_backbone(backbone, config)
    return backbone


def test_the_reference_image_conditions_the_unet_and_scale_zero_ignores_it(assets):
    generator = torch.Generator().manual_seed(0)
    references = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1  # two reference images
    x = torch.randn(1, 4, 32, 32, generator=generator).expand(2, -1, -1, -1)  # one noisy latent for both
    t = torch.tensor([500, 500])
    outputs = {}
    for scale in (1.0, 0.0):
        backbone = loaded_backbone(*assets, scale=scale)
        assert backbone.image_conditioned and backbone.pipeline.image_encoder is not None
        cond = backbone.encode_prompts(["a photo", "a photo"], torch.device("cpu"))
        cond["image_embeds"] = backbone.encode_reference_images(references, torch.device("cpu"))
        assert cond["image_embeds"].shape == (2, 1, CLIP_EMBED)
        with torch.no_grad():
            outputs[scale] = backbone.unet(x, t, **backbone.unet_kwargs(cond, None, torch.float32)).sample
    changed = (outputs[1.0][0] - outputs[1.0][1]).abs().max().item()
    assert changed > 1e-3  # another reference image, another prediction
    torch.testing.assert_close(outputs[0.0][0], outputs[0.0][1], atol=1e-5, rtol=0)  # scale 0: the image is unused


def test_one_step_loss_matches_the_hand_computed_weighted_mse_and_reaches_ip_lora(assets, tmp_path):
    pipeline, adapter = assets
    quality = 0.25
    data = reference_pairs(tmp_path / "data", quality)
    targets = "to_k,to_q,to_v,to_out.0,to_k_ip.0,to_v_ip.0"
    extra = ["--dataset", str(data), "--output_dir", str(tmp_path / "run"), "--train_batch_size", "2"]
    extra += ["--max_train_steps", "1", "--learning_rate", "1e-3", "--lora_target_modules", targets]
    extra += ["--checkpointing_steps", "0", "--progress_bar", "false"]
    result = train(parse_config(argv(pipeline, adapter, *extra)))

    # by hand: the base UNet (LoRA B = 0 at the start) with each record's reference image, the shared noise
    backbone = loaded_backbone(pipeline, adapter)
    device = torch.device("cpu")
    records = load_preferences(str(data), IMAGE_SIZE, 3)
    pixels = torch.stack([records[i]["pixels"] for i in range(len(records))])  # (B, K, 3, H, W)
    latents = backbone.encode_images(pixels.flatten(0, 1)).unflatten(0, (2, 2))  # (B, K, 4, 32, 32)
    scheduler = backbone.noise_scheduler
    timesteps, noise = shared_noise(NoiseRequest(latents, torch.arange(2), 0, 0, scheduler))  # (B, K), (B, K, ...)
    cond = backbone.encode_prompts([f"a photo of thing {i}" for i in range(2)], device)
    cond["image_embeds"] = backbone.encode_reference_images(pixels[:, 0], device)  # (B, 1, D)
    errors = []
    for k in range(2):
        noisy = scheduler.add_noise(latents[:, k], noise[:, k], timesteps[:, k])
        with torch.no_grad():
            output = backbone.unet(noisy, timesteps[:, k], **backbone.unet_kwargs(cond, None, torch.float32)).sample
        errors.append(((output - noise[:, k]) ** 2).mean())
    expected = (1 - quality) * errors[0] / 2 + quality * errors[1] / 2  # reference weight 1 - q, generated q
    assert result.history[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)

    lora_b = {n: p for n, p in result.unet.named_parameters() if "lora_B" in n}
    ip_lora = [p for n, p in lora_b.items() if "to_k_ip" in n or "to_v_ip" in n]
    cross_attention = [name for name in backbone.unet.attn_processors if name.endswith("attn2.processor")]
    assert len(ip_lora) == 2 * len(cross_attention)  # to_k_ip / to_v_ip of every cross-attention layer
    assert min(p.abs().max().item() for p in ip_lora) > 0  # Adam moved every one of them off 0 in one step
    # the saved LoRA loads back into the pipeline once it has the same IP-Adapter (the documented recipe)
    pipe = DiffusionPipeline.from_pretrained(str(pipeline))
    pipe.load_ip_adapter(str(adapter), subfolder="models", weight_name=WEIGHT_NAME)
    pipe.load_lora_weights(str(tmp_path / "run"))
    reloaded = {n.replace("default_0", "default"): p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert reloaded.keys() == lora_b.keys()
    for name, weight in lora_b.items():
        torch.testing.assert_close(reloaded[name], weight, atol=0, rtol=0)


def test_sdxl_gets_the_image_embeds_beside_its_text_embeds_and_time_ids(tmp_path):
    pipe = tiny.make_sdxl_pipeline(tmp_path)
    backbone = loaded_backbone(tmp_path / "sdxl", tiny_ip_adapter(tmp_path / "adapter", pipe.unet))
    generator = torch.Generator().manual_seed(0)
    references = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1  # (2, 3, H, W)
    cond = backbone.encode_prompts(["a photo", "a photo"], torch.device("cpu"))
    cond["image_embeds"] = backbone.encode_reference_images(references, torch.device("cpu"))  # (2, 1, D)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]] * 2, dtype=torch.float32)
    kwargs = backbone.unet_kwargs(cond, time_ids, torch.float32)
    assert sorted(kwargs["added_cond_kwargs"]) == ["image_embeds", "text_embeds", "time_ids"]
    x = torch.randn(1, 4, 32, 32, generator=generator).expand(2, -1, -1, -1)
    with torch.no_grad():
        output = backbone.unet(x, torch.tensor([500, 500]), **kwargs).sample  # (2, 4, 32, 32)
    assert (output[0] - output[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cache_dir", "cache"], "latent cache holds no reference-image"),
        (["--finetune", "full"], "trains LoRA adapters"),
        (["--eval_steps", "5"], "needs a reference image"),
    ],
)
def test_unsupported_combinations_are_refused(assets, extra, message):
    config = parse_config(argv(*assets, *extra))
    method = PatchDPO(PatchDPOOptions(patchdpo_ip_adapter=config.patchdpo_ip_adapter))
    with pytest.raises(ValueError, match=message):
        method.prepare_backbone(None, config)


def test_the_digits_model_has_no_image_attention():
    config = parse_config(["--method", "patchdpo", "--patchdpo_ip_adapter", "x"])
    backbone = load_backbone("digits-cond")
    with pytest.raises(ValueError, match="needs a Stable Diffusion"):
        PatchDPO(PatchDPOOptions(patchdpo_ip_adapter="x")).prepare_backbone(backbone, config)
