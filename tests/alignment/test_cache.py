"""The latent / text cache: (B, K, c, h, w) latents and the prompt conditioning, read back as the batch format;
``meta.json`` written first, a cache built for anything else refused."""

import json

import pytest
import torch
from accelerate import Accelerator
from data_fixtures import write_jsonl_pairs

from diffalign.alignment import cache as cache_module
from diffalign.alignment.cache import CachedPreferences, build_cache
from diffalign.alignment.data import ImageTransform, PreferenceDataset, collate_preferences, load_source

META = dict(model="fake", revision=None, resolution=8, vae_dtype="float32", dataset="pairs")


class FakeBackbone:
    """A 'VAE' that halves the resolution by average pooling and scales by 2; prompts -> their length, (B, 3).
    ``fail_after``: raise on that many-th image batch (an interrupted build)."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("interrupted")
        return 2 * torch.nn.functional.avg_pool2d(pixels, 2)

    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": torch.tensor([[len(p), 1.0, 2.0] for p in prompts])}


@pytest.fixture
def dataset(tmp_path):
    folder = write_jsonl_pairs(tmp_path / "pairs", num_pairs=5)
    return PreferenceDataset(load_source(str(folder)), ImageTransform(8, 3))


def test_cache_reads_back_the_batch_format(tmp_path, dataset):
    build_cache(dataset, FakeBackbone(), tmp_path / "cache", META, Accelerator(cpu=True), batch_size=2)
    cached = CachedPreferences(tmp_path / "cache")
    assert len(cached) == 5 and cached.num_candidates == 2
    batch = collate_preferences([cached[3], cached[1]])
    assert batch["latents"].shape == (2, 2, 3, 4, 4) and "pixels" not in batch
    expected = collate_preferences([dataset[3], dataset[1]])
    latents = FakeBackbone().encode_images(expected["pixels"].flatten(0, 1)).unflatten(0, (2, 2))
    torch.testing.assert_close(batch["latents"], latents)
    torch.testing.assert_close(batch["time_ids"], expected["time_ids"])
    assert batch["prompt"] == ["prompt 3", "prompt 1"] and batch["index"].tolist() == [3, 1]
    assert batch["cond"]["encoder_hidden_states"].tolist() == [[8.0, 1.0, 2.0], [8.0, 1.0, 2.0]]
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["num_records"] == 5 and meta["num_candidates"] == 2 and meta["resolution"] == 8


def test_a_cache_built_for_another_resolution_is_refused(tmp_path, dataset):
    build_cache(dataset, FakeBackbone(), tmp_path / "cache", META, Accelerator(cpu=True))
    with pytest.raises(ValueError, match=r"built for resolution=8; this run needs resolution=16\. Delete"):
        build_cache(dataset, FakeBackbone(), tmp_path / "cache", dict(META, resolution=16), Accelerator(cpu=True))


def test_an_interrupted_build_is_refused_under_another_model_and_resumed_under_its_own(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_SIZE", 2)  # 3 shards of 2, 2, 1 records
    accelerator = Accelerator(cpu=True)
    with pytest.raises(KeyboardInterrupt):
        build_cache(dataset, FakeBackbone(fail_after=1), tmp_path / "cache", META, accelerator, batch_size=2)
    assert (tmp_path / "cache" / "meta.json").is_file()  # written first
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["meta.json", "shard_00000.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        CachedPreferences(tmp_path / "cache")
    for change in (dict(model="other"), dict(vae_dtype="float16"), dict(revision="abc")):
        with pytest.raises(ValueError, match="was built for"):
            build_cache(dataset, FakeBackbone(), tmp_path / "cache", dict(META, **change), accelerator)
    backbone = FakeBackbone()
    build_cache(dataset, backbone, tmp_path / "cache", META, accelerator, batch_size=2)
    assert backbone.calls == 2  # the two missing shards only
    cached = CachedPreferences(tmp_path / "cache")
    assert [cached[i]["prompt"] for i in range(5)] == [f"prompt {i}" for i in range(5)]


def test_shards_without_meta_are_refused(tmp_path, dataset):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shard_00000.safetensors").write_bytes(b"old")
    with pytest.raises(ValueError, match="no meta.json"):
        build_cache(dataset, FakeBackbone(), tmp_path / "cache", META, Accelerator(cpu=True))
    with pytest.raises(ValueError, match=r"lacks \['vae_dtype'\]"):
        meta = {key: value for key, value in META.items() if key != "vae_dtype"}
        build_cache(dataset, FakeBackbone(), tmp_path / "c2", meta, Accelerator(cpu=True))
