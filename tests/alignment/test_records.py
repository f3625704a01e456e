"""Generalised records: K images, scores, weight maps (PNG / NPY / safetensors), labels, from JSONL and from every
kind of table; clear errors for malformed data."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_fixtures import decoded, png_bytes, write_ranked_parquet
from PIL import Image
from safetensors.numpy import save_file

from diffalign.alignment.data import ImageTransform, collate_preferences, load_preferences
from diffalign.alignment.records import DatasetError, open_weight_map
from diffalign.alignment.sources import load_source


def transformed(data: bytes, resolution: int = 8) -> torch.Tensor:
    return ImageTransform(resolution, 3)(Image.fromarray(decoded(data)))[0]


def write_ranked_jsonl(folder, k=3, rows=2):
    """K images per prompt with scores, one weight map per image in each format, and 4 per-segment labels."""
    (folder / "images").mkdir(parents=True)
    half = np.zeros((10, 12), dtype=np.float32)
    half[:, :6] = 1.0  # left half weighted
    Image.fromarray((half * 255).astype(np.uint8)).save(folder / "map.png")
    np.save(folder / "map.npy", 0.5 * half)
    save_file({"weight_map": 2 * half[None]}, str(folder / "map.safetensors"))
    lines = []
    for r in range(rows):
        for j in range(k):
            (folder / "images" / f"{r}_{j}.png").write_bytes(png_bytes(10 * r + j, (12, 10)))
        maps = ["map.png", "map.npy", "map.safetensors"][:k]
        record = dict(prompt=f"prompt {r}", images=[f"images/{r}_{j}.png" for j in range(k)], weight_maps=maps)
        record.update(scores=[0.1 * j + r for j in range(k)], labels=[1, -1, 0, 1])
        lines.append(json.dumps(record))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_jsonl_with_k3_scores_weight_maps_and_labels(tmp_path):
    folder = write_ranked_jsonl(tmp_path / "ranked")
    dataset = load_preferences(str(folder), resolution=8, channels=3)
    batch = collate_preferences([dataset[1], dataset[0]])
    assert batch["pixels"].shape == (2, 3, 3, 8, 8) and batch["time_ids"].shape == (2, 3, 6)
    torch.testing.assert_close(batch["pixels"][0, 2], transformed(png_bytes(12, (12, 10))), atol=0, rtol=0)
    torch.testing.assert_close(batch["scores"], torch.tensor([[1.0, 1.1, 1.2], [0.0, 0.1, 0.2]]))
    assert batch["labels"].tolist() == [[1, -1, 0, 1]] * 2 and batch["labels"].dtype == torch.float32
    # (B, K, 1, H, W): the map follows its image, 12x10 -> 10x8, crop left 1: the edge at column 6 of 12 -> 5 of 10
    # -> 4 of 8, so columns 0..3 weighted (column 3 / 4 at 0.93 / 0.07 from the antialiased bilinear resize)
    maps = batch["weight_maps"]
    assert maps.shape == (2, 3, 1, 8, 8)
    expected = torch.zeros(8, 8)
    expected[:, :4] = 1.0
    for j, scale in enumerate((1.0, 0.5, 2.0)):  # PNG / 255, NPY raw, safetensors raw
        torch.testing.assert_close(maps[0, j, 0], scale * expected, atol=0.07 * scale, rtol=0)
        assert maps[0, j, 0, :, :3].min() == pytest.approx(scale, abs=1e-6) and maps[0, j, 0, :, 5:].max() == 0


def test_ranked_parquet_keeps_the_stored_order_and_scores(tmp_path):
    path = write_ranked_parquet(tmp_path / "ranked.parquet", num_rows=3, k=3)
    batch = collate_preferences([load_preferences(str(path), 8, 3)[i] for i in range(3)])
    assert batch["pixels"].shape == (3, 3, 3, 8, 8) and batch["prompt"] == ["prompt 0", "prompt 1", "prompt 2"]
    torch.testing.assert_close(batch["scores"][2], torch.tensor([2.0, 1.9, 1.8]))
    torch.testing.assert_close(batch["pixels"][2, 1], transformed(png_bytes(21, (12, 10))), atol=0, rtol=0)


def test_every_table_kind_gives_the_same_records(tmp_path):
    import datasets

    rows = write_ranked_parquet(tmp_path / "all.parquet", num_rows=4, k=3)
    table = pq.read_table(rows)
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "shards" / "train-00000.parquet")
    pq.write_table(table.slice(2, 2), tmp_path / "shards" / "train-00001.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub" / "data").mkdir(parents=True)  # a hub-style repository folder, read by load_dataset offline
    pq.write_table(table, tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    reference = collate_preferences([load_preferences(str(rows), 8, 3)[i] for i in range(4)])
    for name in ("shards", "saved", "hub"):
        dataset = load_preferences(str(tmp_path / name), 8, 3)
        batch = collate_preferences([dataset[i] for i in range(4)])
        assert batch["prompt"] == reference["prompt"], name
        for key in ("pixels", "scores", "time_ids"):
            torch.testing.assert_close(batch[key], reference[key], atol=0, rtol=0, msg=name)


def test_a_datasets_image_list_column_is_decoded_lazily_by_us(tmp_path):
    import datasets

    images = [[{"bytes": png_bytes(j + 2 * r, (12, 10)), "path": None} for j in range(2)] for r in range(2)]
    data = datasets.Dataset.from_dict({"caption": ["a", "b"], "images": images})
    data.cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(str(tmp_path / "saved"))
    item = load_preferences(str(tmp_path / "saved"), 8, 3)[1]
    torch.testing.assert_close(item["pixels"][1], transformed(png_bytes(3, (12, 10))), atol=0, rtol=0)


def test_weight_map_readers_agree(tmp_path):
    array = np.random.default_rng(0).random((6, 5)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array)
    from safetensors.numpy import save

    for value in (buffer.getvalue(), save({"m": array}), array.tolist()):
        np.testing.assert_allclose(open_weight_map(value), array, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one tensor"):
        open_weight_map(save({"a": array, "b": array}))


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"images": ["a.png", "b.png"]}], "lacks the key 'prompt'"),
        ([{"prompt": "p", "chosen": "a.png"}], "neither 'images' nor 'chosen' \\+ 'rejected'"),
        ([{"prompt": "p", "images": []}], "K >= 1 images"),
        ([{"prompt": "p", "images": ["a.png", "b.png"], "scores": [1.0]}], "2 images but 1 scores"),
        ([{"prompt": "p", "images": ["a.png", "b.png"], "weight_maps": ["a.png"] * 3}], "2 images but 3 weight_maps"),
        ([{"prompt": "p", "images": ["a.png", "b.png"], "labels": [2]}], "must be \\+1"),
        (
            [{"prompt": "p", "images": ["a.png", "b.png"]}, {"prompt": "q", "images": ["a.png"] * 3}],
            "record 1 has 3 images but record 0 has 2",
        ),
    ],
)
def test_malformed_jsonl_is_refused_with_the_line(tmp_path, lines, message):
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_source(str(tmp_path))


def test_malformed_tables_are_refused(tmp_path):
    def write(name, **columns):
        pq.write_table(pa.table(columns), tmp_path / name)
        return str(tmp_path / name)

    images = [[b"x", b"y"], [b"x", b"y", b"z"]]
    with pytest.raises(DatasetError, match="record 1 has 3 images but record 0 has 2"):
        load_source(write("k.parquet", prompt=["a", "b"], images=images))
    with pytest.raises(DatasetError, match="record 1 has 1 scores for 2 images"):
        load_source(write("s.parquet", prompt=["a", "b"], images=[[b"x", b"y"]] * 2, scores=[[1.0, 2.0], [1.0]]))
    with pytest.raises(DatasetError, match="a prompt column"):
        load_source(write("p.parquet", text=["a"], jpg_0=[b"x"], jpg_1=[b"y"]))
    with pytest.raises(DatasetError, match="image columns"):
        load_source(write("i.parquet", prompt=["a"], jpg_0=[b"x"]))


def test_numbered_image_columns_give_k_candidates(tmp_path):
    columns = {f"jpg_{j}": [png_bytes(j, (12, 10))] for j in range(3)}
    pq.write_table(pa.table(dict(caption=["c"], scores=[[0.5, 0.25, 1.0]], **columns)), tmp_path / "three.parquet")
    item = load_preferences(str(tmp_path / "three.parquet"), 8, 3)[0]
    assert item["pixels"].shape == (3, 3, 8, 8) and item["scores"].tolist() == [0.5, 0.25, 1.0]
    torch.testing.assert_close(item["pixels"][2], transformed(png_bytes(2, (12, 10))), atol=0, rtol=0)
