"""The trainer on tiny random SD / SDXL pipelines from a local Pick-a-Pic parquet file with real PNG bytes."""

import math

import pytest
import tiny_pipelines as tiny
import torch
from data_fixtures import write_pickapic

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.trainer import train


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    tiny.make_sdxl_pipeline(tmp)
    return tmp / "sdxl"


def test_one_sdxl_step_from_parquet_and_the_lora_loads_into_the_pipeline(tmp_path, sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    dataset = write_pickapic(tmp_path / "data.parquet")
    config = TrainConfig(
        pretrained_model_name_or_path=str(sdxl_dir),
        dataset=str(dataset),
        output_dir=str(tmp_path / "out"),
        train_batch_size=2,
        max_train_steps=2,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        checkpointing_steps=0,
        progress_bar=False,
    )
    result = train(config)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(h["loss"]) for h in result.history)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo", num_inference_steps=2, output_type="latent", guidance_scale=1.0)
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(tmp_path / "out"))
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (after - before).abs().max() > 1e-4  # the trained adapter changes the samples
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    cond = dict(encoder_hidden_states=torch.randn(1, 77, 64))
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        loaded = pipe.unet(x, t, added_cond_kwargs=added, **cond).sample
        trained = result.unet.eval()(x, t, added_cond_kwargs=added, **cond).sample
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_sd15_full_finetune_step_saves_a_loadable_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    tiny.make_sd_pipeline(tmp_path)
    config = TrainConfig(
        pretrained_model_name_or_path=str(tmp_path / "sd"),
        dataset=str(write_pickapic(tmp_path / "data.parquet")),
        output_dir=str(tmp_path / "out"),
        finetune="full",
        train_batch_size=2,
        max_train_steps=1,
        checkpointing_steps=0,
        progress_bar=False,
    )
    result = train(config)
    # the frozen copy runs under no_grad, the policy with autograd: float32 kernels round differently (with 2 threads
    # the errors differ by ~1e-8, times beta / 2 = 2500 in the loss: measured log 2 - 7.5e-5)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=5e-4)
    reloaded = DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    for (name, a), b in zip(reloaded.unet.state_dict().items(), result.unet.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
