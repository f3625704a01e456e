"""Streaming: parquet shards read lazily, split over processes, shuffled per epoch; the cache built from the
streamed shares by concurrent processes (threads standing in for processes)."""

import threading

import pyarrow.parquet as pq
import pytest
import torch
from data_fixtures import write_pickapic, write_ranked_parquet

from diffalign.alignment import cache as cache_module
from diffalign.alignment.cache import CachedPreferences, build_streaming_cache
from diffalign.alignment.data import collate_preferences, load_preferences

META = dict(model="fake", revision=None, resolution=8, vae_dtype="float32", dataset="shards")


@pytest.fixture
def shards(tmp_path):
    """Two parquet shards of 3 ranked records each (K = 3, with scores)."""
    table = pq.read_table(write_ranked_parquet(tmp_path / "all.parquet", num_rows=6, k=3))
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 3), tmp_path / "shards" / "train-00000.parquet")
    pq.write_table(table.slice(3, 3), tmp_path / "shards" / "train-00001.parquet")
    return tmp_path / "shards"


def stream(path, rank=0, world=1, seed=None):
    return load_preferences(str(path), 8, 3, streaming=True, process_index=rank, num_processes=world, seed=seed)


def test_processes_read_disjoint_shares_that_cover_the_data(shards):
    whole = {item["prompt"]: item for item in stream(shards)}
    assert sorted(whole) == [f"prompt {r}" for r in range(6)]
    shares = [list(stream(shards, rank, 2)) for rank in range(2)]
    prompts = [item["prompt"] for share in shares for item in share]
    assert sorted(prompts) == sorted(whole) and all(len(share) == 3 for share in shares)
    indices = [item["index"] for share in shares for item in share]
    assert sorted(indices) == list(range(6))  # rank + 2 x position: unique
    for item in shares[1]:
        torch.testing.assert_close(item["pixels"], whole[item["prompt"]]["pixels"], atol=0, rtol=0)
        torch.testing.assert_close(item["scores"], whole[item["prompt"]]["scores"], atol=0, rtol=0)


def test_shuffled_epochs_differ_and_repeat(shards, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # a 5 s wait after each shuffled pass
    dataset = stream(shards, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append([item["prompt"] for item in dataset])
    assert orders[0] == orders[2] and orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_a_streamed_pickapic_drops_ties_and_batches_through_a_dataloader(tmp_path):
    write_pickapic(tmp_path / "pickapic.parquet", num_rows=6)
    loader = torch.utils.data.DataLoader(
        stream(tmp_path / "pickapic.parquet"), batch_size=2, collate_fn=collate_preferences
    )
    batches = list(loader)
    assert [batch["pixels"].shape for batch in batches] == [(2, 2, 3, 8, 8)] * 2  # 6 rows, 2 ties
    assert [p for batch in batches for p in batch["prompt"]] == [f"a photo of thing {i}" for i in (0, 1, 3, 4)]


def test_an_unreadable_streamed_record_is_skipped_and_counted(tmp_path):
    import pyarrow as pa

    table = pq.read_table(write_ranked_parquet(tmp_path / "all.parquet", num_rows=3, k=2)).to_pydict()
    table["images"][1][0] = b"not an image"
    pq.write_table(pa.table(table), tmp_path / "broken.parquet")
    items = list(stream(tmp_path / "broken.parquet"))
    assert [item["prompt"] for item in items] == ["prompt 0", "prompt 2"] and [i["skipped"] for i in items] == [0, 1]


class ThreadAccelerator:
    """The collective part of accelerate's Accelerator, for processes played by threads."""

    def __init__(self, rank, world, barrier):
        self.process_index, self.num_processes, self.barrier = rank, world, barrier
        self.is_main_process, self.device = rank == 0, torch.device("cpu")

    def wait_for_everyone(self):
        self.barrier.wait()


class FakeBackbone:
    def __init__(self):
        self.images = 0

    def encode_images(self, pixels):
        self.images += len(pixels)
        return 2 * torch.nn.functional.avg_pool2d(pixels, 2)

    def encode_prompts(self, prompts, device):
        return {"encoder_hidden_states": torch.tensor([[float(len(p))] for p in prompts])}


def build_with_threads(shards, cache_dir, world=2):
    barrier, errors, backbones = threading.Barrier(world), [], [FakeBackbone() for _ in range(world)]

    def process(rank):
        try:
            dataset = stream(shards, rank, world)
            build_streaming_cache(dataset, backbones[rank], cache_dir, META, ThreadAccelerator(rank, world, barrier))
        except BaseException as error:  # re-raised below, after the other thread stops
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return backbones


def test_the_cache_of_a_stream_is_built_by_every_process_from_its_share(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_SIZE", 2)  # each process: shards of 2 and 1 records
    backbones = build_with_threads(shards, tmp_path / "cache")
    assert [b.images for b in backbones] == [9, 9]  # 3 records x K = 3 each
    names = sorted(p.name for p in (tmp_path / "cache").glob("shard_*"))
    assert names == [f"shard_p00{r}_0000{n}.safetensors" for r in (0, 1) for n in (0, 1)]
    cached = CachedPreferences(tmp_path / "cache")
    assert len(cached) == 6 and sorted(cached[i]["index"] for i in range(6)) == list(range(6))
    assert cached.num_candidates == 3
    whole = {item["prompt"]: item for item in stream(shards)}
    for i in range(6):
        item = cached[i]
        expected = whole[item["prompt"]]
        torch.testing.assert_close(item["latents"], 2 * torch.nn.functional.avg_pool2d(expected["pixels"], 2))
        torch.testing.assert_close(item["scores"], expected["scores"])
    batch = collate_preferences([cached[0], cached[5]])
    assert batch["latents"].shape == (2, 3, 3, 4, 4) and batch["scores"].shape == (2, 3)
    backbones = build_with_threads(shards, tmp_path / "cache")  # complete: nothing encoded again
    assert [b.images for b in backbones] == [0, 0]
    with pytest.raises(ValueError, match="num_processes=2; this run needs num_processes=1"):
        build_streaming_cache(stream(shards), FakeBackbone(), tmp_path / "cache", META, ThreadAccelerator(0, 1, None))


def test_an_interrupted_streamed_cache_resumes_after_its_last_shard(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_SIZE", 2)
    (tmp_path / "cache").mkdir()
    build_with_threads(shards, tmp_path / "cache")
    (tmp_path / "cache" / "shards.json").unlink()  # as if interrupted before the end:
    (tmp_path / "cache" / "shard_p001_00001.safetensors").unlink()  # process 1's last shard missing
    backbones = build_with_threads(shards, tmp_path / "cache")
    assert [b.images for b in backbones] == [0, 3]  # only process 1's last record (K = 3 images) again
    assert len(CachedPreferences(tmp_path / "cache")) == 6


def test_dataloader_workers_read_their_own_shards_with_unique_indices(shards):
    loader = torch.utils.data.DataLoader(stream(shards), batch_size=1, num_workers=2, collate_fn=collate_preferences)
    items = list(loader)
    assert sorted(p for batch in items for p in batch["prompt"]) == [f"prompt {r}" for r in range(6)]
    assert sorted(int(batch["index"]) for batch in items) == list(range(6))  # worker + 2 x position
