"""Preference data: sources -> records -> decoded items -> the (B, K, ...) batch of layout_contract.md."""

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
