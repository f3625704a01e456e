"""The latent / text cache: (B, K, c, h, w) latents and the prompt conditioning, read back as the batch format."""

import json

import pytest
import torch
from accelerate import Accelerator
from data_fixtures import write_jsonl_pairs

from diffalign.alignment.cache import CachedPreferences, build_cache
from diffalign.alignment.data import ImageTransform, PreferenceDataset, collate_preferences, load_source


class FakeBackbone:
    """A 'VAE' that halves the resolution by average pooling and scales by 2; prompts -> their length, (B, 3)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return 2 * torch.nn.functional.avg_pool2d(pixels, 2)

    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": torch.tensor([[len(p), 1.0, 2.0] for p in prompts])}


@pytest.fixture
def dataset(tmp_path):
    return PreferenceDataset(
        load_source(str(write_jsonl_pairs(tmp_path / "pairs", num_pairs=5))), ImageTransform(8, 3)
    )


def test_cache_reads_back_the_batch_format(tmp_path, dataset):
    meta = dict(model="fake", dataset="pairs", resolution=8)
    build_cache(dataset, FakeBackbone(), tmp_path / "cache", meta, Accelerator(cpu=True), batch_size=2)
    cached = CachedPreferences(tmp_path / "cache")
    assert len(cached) == 5
    batch = collate_preferences([cached[3], cached[1]])
    assert batch["latents"].shape == (2, 2, 3, 4, 4) and "pixels" not in batch
    expected = collate_preferences([dataset[3], dataset[1]])
    torch.testing.assert_close(
        batch["latents"], FakeBackbone().encode_images(expected["pixels"].flatten(0, 1)).unflatten(0, (2, 2))
    )
    torch.testing.assert_close(batch["time_ids"], expected["time_ids"])
    assert batch["prompt"] == ["prompt 3", "prompt 1"] and batch["index"].tolist() == [3, 1]
    assert batch["cond"]["encoder_hidden_states"].tolist() == [[8.0, 1.0, 2.0], [8.0, 1.0, 2.0]]
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["num_records"] == 5
