"""``diffalign pairs``: K candidates per prompt from per-(prompt, candidate) seeds, scored, written as parquet and
read back by the data loader as (B, K, ...) with the scores in the stored order."""

import io
import json

import numpy as np
import pytest
import tiny_pipelines as tiny
import torch
from PIL import Image

from diffalign.alignment.data import collate_preferences, load_preferences
from diffalign.alignment.pairs import PairsConfig, candidate_seed, make_pairs
from diffalign.commands import pairs as pairs_command
from diffalign.evaluation.rewards import load_reward
from diffalign.options import parse_args

PROMPTS = ["a handwritten 3", "a handwritten 7", "a handwritten 1", "a handwritten 8"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def written(prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "out"
    config = PairsConfig(prompts=str(prompt_file), num_candidates=3, batch_size=5, shard_size=3, out=str(out))
    return make_pairs(config, progress=False), config


def test_round_trip_gives_k3_batches_with_the_scores_in_stored_order(written):
    out, _ = written
    dataset = load_preferences(str(out), resolution=8, channels=1)
    assert len(dataset) == 4 and dataset.num_candidates == 3
    batch = collate_preferences([dataset[i] for i in range(4)])
    assert batch["prompt"] == PROMPTS and batch["pixels"].shape == (4, 3, 1, 8, 8)
    assert batch["scores"].shape == (4, 3)
    rescored = load_reward("digits").score(
        ((batch["pixels"] + 1) / 2).flatten(0, 1), [p for p in PROMPTS for _ in range(3)]
    )
    torch.testing.assert_close(batch["scores"].flatten(), rescored, atol=1e-5, rtol=0)  # candidate order kept
    assert (batch["scores"] <= 0).all() and batch["scores"].std() > 1e-3  # log-probabilities that differ
    info = json.loads((out / "generation.json").read_text())
    assert info["reward"] == "digits" and info["reward_version"].startswith("embedded:digits/classifier#sha256:")
    assert (info["sampler"], info["nfe"], info["guidance_scale"], info["num_candidates"]) == (
        "DDIMScheduler",
        2,
        1.0,
        3,
    )
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "data-00000-of-00002.parquet",
        "data-00001-of-00002.parquet",
    ]


def test_a_candidate_depends_only_on_its_seed(written, tmp_path):
    import pyarrow.parquet as pq

    out, _ = written
    (tmp_path / "two.txt").write_text("\n".join(PROMPTS[:2]))  # the first two prompts, one image per call
    alone = PairsConfig(prompts=str(tmp_path / "two.txt"), num_candidates=3, batch_size=1, out=str(tmp_path / "alone"))
    tables = [
        pq.read_table(sorted(folder.glob("*.parquet"))[0]) for folder in (out, make_pairs(alone, progress=False))
    ]
    first, second = (table.slice(0, 2).to_pydict() for table in tables)
    assert first["seeds"] == second["seeds"] == [[candidate_seed(0, p, k) for k in range(3)] for p in range(2)]
    for row_a, row_b in zip(first["images"], second["images"], strict=True):
        for a, b in zip(row_a, row_b, strict=True):  # batch of 5 vs batch of 1: the same 8-bit image (to 1 level)
            pixels_a, pixels_b = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in (a, b))
            assert np.abs(pixels_a - pixels_b).max() <= 1
    torch.testing.assert_close(torch.tensor(first["scores"]), torch.tensor(second["scores"]), atol=1e-3, rtol=0)


def test_a_rerun_resumes_and_other_settings_are_refused(written, prompt_file):
    out, config = written
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    make_pairs(config, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == stamps  # nothing sampled again
    other = PairsConfig(prompts=str(prompt_file), num_candidates=3, shard_size=3, out=str(out), nfe=3)
    with pytest.raises(ValueError, match="generated with nfe=2; this run has nfe=3"):
        make_pairs(other, progress=False)


def test_the_command_parses_its_options_and_reports(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("seven\n")
    argv = ["--prompts", str(tmp_path / "one.txt"), "--num-candidates", "2", "--nfe", "1"]
    argv += ["--out", str(tmp_path / "cli")]
    config = parse_args(PairsConfig, argv)
    assert pairs_command.NAME == "pairs" and pairs_command.CONFIG is PairsConfig
    assert pairs_command.run(config) == 0
    assert "prompts: 1, candidates each: 2, mean best - worst digits reward:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="num_candidates must be >= 2"):
        PairsConfig(num_candidates=1)
    with pytest.raises(ValueError, match="pass a prompt file"):
        make_pairs(PairsConfig(pipeline=str(tmp_path), out=str(tmp_path / "x")), progress=False)


def tiny_pickscore(folder):
    """A random-weight CLIP model with its tokenizer and 32-pixel image processor, saved as a PickScore folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    tokenizer = tiny.make_tokenizer(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    vision.image_size, vision.patch_size = 32, 8
    config = CLIPConfig(text_config=tiny.text_config(tokenizer).to_dict(), vision_config=vision.to_dict())
    config.projection_dim = 16
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return f"pickscore:{folder}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_pairs_from_a_tiny_pipeline_with_a_tiny_local_reward(tmp_path, kind):
    make, size = (tiny.make_sd_pipeline, tiny.SD_SIZE) if kind == "sd" else (tiny.make_sdxl_pipeline, tiny.SDXL_SIZE)
    make(tmp_path)
    reward = tiny_pickscore(tmp_path / "reward")
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    config = PairsConfig(
        pipeline=str(tmp_path / kind), prompts=str(tmp_path / "prompts.txt"), reward=reward, num_candidates=2, nfe=2
    )
    config.out = str(tmp_path / "out")
    out = make_pairs(config, progress=False)
    batch = collate_preferences([load_preferences(str(out), resolution=size, channels=3)[i] for i in (0, 1)])
    assert batch["pixels"].shape == (2, 2, 3, size, size) and batch["scores"].shape == (2, 2)
    prompts = ["a red cube"] * 2 + ["a blue ball"] * 2
    rescored = load_reward(reward).score(((batch["pixels"] + 1) / 2).flatten(0, 1), prompts)
    torch.testing.assert_close(batch["scores"].flatten(), rescored, atol=1e-4, rtol=0)
    info = json.loads((out / "generation.json").read_text())
    assert info["reward"] == "pickscore" and "#sha256:" in info["reward_version"]
    assert info["sampler"] == info["scheduler_config"]["_class_name"]  # the pipeline's own scheduler
