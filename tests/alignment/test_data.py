"""Preference data: sources -> records -> decoded items -> the (B, K, ...) batch of layout_contract.md."""

import json

import numpy as np
import pytest
import torch
from data_fixtures import decoded, png_bytes, write_jsonl_pairs, write_pickapic
from PIL import Image

from diffalign.alignment.data import ImageTransform, PreferenceDataset, collate_preferences, load_source


def test_jsonl_pairs_collate_to_k2_with_the_chosen_image_first(tmp_path):
    folder = write_jsonl_pairs(tmp_path / "pairs", num_pairs=3, size=(12, 10))
    dataset = PreferenceDataset(load_source(str(folder)), ImageTransform(8, 3))
    batch = collate_preferences([dataset[2], dataset[0]])
    assert batch["prompt"] == ["prompt 2", "prompt 0"]
    assert batch["pixels"].shape == (2, 2, 3, 8, 8) and batch["pixels"].dtype == torch.float32
    assert batch["time_ids"].shape == (2, 2, 6)
    assert batch["index"].tolist() == [2, 0] and batch["index"].dtype == torch.int64
    assert batch["skipped"] == 0 and "scores" not in batch
    # 12x10 -> short side 10 to 8: 10x8 (w x h), centre crop left 1: time ids (orig h, w, top, left, 8, 8)
    assert batch["time_ids"][0, 0].tolist() == [10.0, 12.0, 0.0, 1.0, 8.0, 8.0]
    chosen = ImageTransform(8, 3)(Image.open(folder / "images" / "4.png"))[0]
    torch.testing.assert_close(batch["pixels"][0, 0], chosen, atol=0, rtol=0)  # candidate 0 = chosen
    assert batch["pixels"].min() >= -1.0 and batch["pixels"].max() <= 1.0


def test_pickapic_records_put_the_winner_first_and_drop_ties(tmp_path):
    source = load_source(str(write_pickapic(tmp_path / "data.parquet")))
    assert len(source) == 4 and source.num_ties == 2
    record = source[0]  # row 0: label_0 = 0 -> jpg_1 wins
    assert record.prompt == "a photo of thing 0" and record.num_candidates == 2
    dataset = PreferenceDataset(source, ImageTransform(16, 3))
    item = dataset[0]
    winner = ImageTransform(16, 3)(Image.fromarray(decoded(png_bytes(1, (80, 72)))))[0]
    torch.testing.assert_close(item["pixels"][0], winner, atol=0, rtol=0)
    item = dataset[1]  # row 1: label_0 = 1 -> jpg_0 wins
    winner = ImageTransform(16, 3)(Image.fromarray(decoded(png_bytes(2, (80, 72)))))[0]
    torch.testing.assert_close(item["pixels"][0], winner, atol=0, rtol=0)
    assert collate_preferences([dataset[i] for i in range(4)])["pixels"].shape == (4, 2, 3, 16, 16)


def test_missing_pickapic_columns_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"lacks the Pick-a-Pic column\(s\) \['jpg_1', 'label_1'\]"):
        load_source(str(write_pickapic(tmp_path / "bad.parquet", drop=("jpg_1", "label_1"))))


def test_collate_refuses_records_with_different_k():
    item = dict(index=0, prompt="p", pixels=torch.zeros(2, 1, 4, 4), time_ids=torch.zeros(2, 6), skipped=0)
    other = dict(item, pixels=torch.zeros(3, 1, 4, 4), time_ids=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="same\\s+number of candidates K"):
        collate_preferences([item, other])
    with pytest.raises(ValueError, match="different fields"):
        collate_preferences([item, dict(item, scores=torch.zeros(2))])


def test_greyscale_transform_keeps_one_channel(tmp_path):
    folder = write_jsonl_pairs(tmp_path / "pairs", num_pairs=1)
    batch = collate_preferences([PreferenceDataset(load_source(str(folder)), ImageTransform(8, 1))[0]])
    assert batch["pixels"].shape == (1, 2, 1, 8, 8)
    assert np.isfinite(batch["pixels"].numpy()).all()


class EOFImage(Image.Image):
    """A PIL image whose lazy load fails the way a PIL plugin fails on a frame cut short."""

    def load(self):
        raise EOFError("no more data in the frame")


class ListSource:
    """Records from a list, images as PIL objects or bytes (no folder)."""

    base = root = None
    num_ties = 0

    def __init__(self, records):
        self.records, self.num_candidates = records, 2

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def test_bombs_eof_and_truncated_images_are_skipped_counted_and_logged(monkeypatch, caplog):
    from diffalign.alignment.records import PreferenceRecord

    good = [png_bytes(i, (12, 10)) for i in range(8)]
    truncated = png_bytes(100, (12, 10))[:60]
    bomb = png_bytes(101, (40, 40))  # 1600 pixels > 2 x MAX_IMAGE_PIXELS below: PIL's DecompressionBombError
    records = [
        PreferenceRecord("ok 0", [good[0], good[1]]),
        PreferenceRecord("truncated", [good[2], truncated]),
        PreferenceRecord("bomb", [bomb, good[3]]),
        PreferenceRecord("eof", [good[4], EOFImage()]),
        PreferenceRecord("ok 4", [good[5], good[6]]),
    ]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # the 12x10 = 120-pixel images stay below it
    dataset = PreferenceDataset(ListSource(records), ImageTransform(8, 3))
    with caplog.at_level("WARNING", logger="diffalign.alignment.data"):
        items = [dataset[i] for i in range(len(dataset))]
    assert [item["prompt"] for item in items] == ["ok 0", "ok 4", "ok 4", "ok 4", "ok 4"]
    assert [item["skipped"] for item in items] == [0, 3, 2, 1, 0]
    assert collate_preferences(items)["skipped"] == 6
    logged = caplog.text
    for reason in ("truncated", "DecompressionBombError", "EOFError"):
        assert reason in logged, (reason, logged)
    assert len(dataset.errors) == 5  # the first MAX_LOGGED_ERRORS reasons are kept, although other records load


def test_a_path_leaving_the_jsonl_folder_is_refused_unless_a_root_allows_it(tmp_path):
    from diffalign.alignment.records import ImagePathError

    folder = write_jsonl_pairs(tmp_path / "data" / "pairs", num_pairs=2)
    outside = tmp_path / "data" / "elsewhere.png"
    outside.write_bytes(png_bytes(7, (12, 10)))
    lines = (folder / "pairs.jsonl").read_text().splitlines()
    for path in ("../elsewhere.png", str(outside)):
        bad = {"prompt": "p", "chosen": path, "rejected": "images/0.png"}
        (folder / "pairs.jsonl").write_text("\n".join([*lines, json.dumps(bad)]) + "\n")
        with pytest.raises(ImagePathError, match=r"outside .*pairs.*--image_root"):
            load_source(str(folder))
        source = load_source(str(folder), image_root=str(tmp_path / "data"))  # the user allows the parent folder
        item = PreferenceDataset(source, ImageTransform(8, 3))[2]
        expected = ImageTransform(8, 3)(Image.open(outside))[0]
        torch.testing.assert_close(item["pixels"][0], expected, atol=0, rtol=0)
        with pytest.raises(ImagePathError, match="outside"):
            load_source(str(folder), image_root=str(folder / "images"))  # a root that does not contain it


def test_a_parquet_path_entry_is_refused_without_an_image_root(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.alignment.records import ImagePathError

    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    image.write_bytes(png_bytes(3, (12, 10)))
    entry = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "caption": ["p"],
            "jpg_0": pa.array([{"bytes": None, "path": str(image)}], type=entry),
            "jpg_1": pa.array([{"bytes": png_bytes(4, (12, 10)), "path": None}], type=entry),
        }
    )
    pq.write_table(table, tmp_path / "data.parquet")
    dataset = PreferenceDataset(load_source(str(tmp_path / "data.parquet")), ImageTransform(8, 3))
    with pytest.raises(ImagePathError, match="image_root"):
        dataset[0]  # refused, not skipped as unreadable
    source = load_source(str(tmp_path / "data.parquet"), image_root=str(tmp_path / "images"))
    item = PreferenceDataset(source, ImageTransform(8, 3))[0]
    torch.testing.assert_close(item["pixels"][0], ImageTransform(8, 3)(Image.open(image))[0], atol=0, rtol=0)
    source = load_source(str(tmp_path / "data.parquet"), image_root=str(tmp_path / "other"))
    with pytest.raises(ImagePathError, match="outside"):
        PreferenceDataset(source, ImageTransform(8, 3))[0]
