"""The eval harness: bootstrap statistics on known data, and tuned-vs-base runs on digits-cond, tiny SD and SDXL."""

import hashlib
import json
from pathlib import Path

import pytest
import tiny_pipelines as tiny
import torch
from diffusers import DDIMScheduler
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from diffalign.evaluation.bootstrap import bootstrap_indices, compare_scores, percentile_interval, win_rate
from diffalign.evaluation.harness import (
    DIGITS_PROMPTS,
    EvalConfig,
    cell_seed,
    eval_metrics,
    load_rewards,
    run_eval,
    sample_images,
    score_pipeline,
)
from diffalign.evaluation.rewards import load_reward
from diffalign.models.digits import load_digits_classifier, load_digits_pipeline


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is many times faster than two on a shared machine (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_random_lora(pipeline, folder: Path, scale: float = 0.05, targets=("to_v", "to_out.0", "conv1")) -> Path:
    """Add a rank-4 LoRA with random (non-zero) A and B to the pipeline's UNet and save it as diffalign train does."""
    unet = pipeline.unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(targets)))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, scale)
    saver = type(pipeline) if hasattr(pipeline, "save_lora_weights") else StableDiffusionLoraLoaderMixin
    saver.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return folder


@pytest.fixture(scope="module")
def digits_lora(tmp_path_factory):
    return save_random_lora(load_digits_pipeline(True), tmp_path_factory.mktemp("digits_lora"))


def write_prompts(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# bootstrap statistics ---------------------------------------------------------------------------------------------


def test_constant_shift_wins_every_pair_and_the_intervals_hold_the_true_means():
    base = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # N(0, 1)
    result = compare_scores(base + 1.0, base, resamples=2000, seed=0)
    assert result["win_rate"] == 1.0 and result["win_rate_ci"] == [1.0, 1.0]
    assert result["mean_difference"] == pytest.approx(1.0, abs=1e-12)
    assert result["mean_difference_ci"] == pytest.approx([1.0, 1.0], abs=1e-12)
    for model, true_mean in (("base", 0.0), ("tuned", 1.0)):
        low, high = result[model]["mean_ci"]
        assert low < true_mean < high, (model, low, high)
        assert 0.1 < high - low < 0.3  # about 2 * 1.96 / sqrt(400) = 0.196 wide
        low, high = result[model]["median_ci"]
        assert low < true_mean < high, (model, low, high)
    assert result["tuned"]["mean"] - result["base"]["mean"] == pytest.approx(1.0, abs=1e-12)
    assert result["num_samples"] == 400


def test_percentile_interval_of_the_mean_covers_about_95_percent():
    """400 data sets of 100 N(0, 1) draws: the 95% interval holds the true mean 0 in 93-98% of them (95.8% here)."""
    data = torch.randn(400, 100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # (T, N)
    means = data[:, bootstrap_indices(100, 500, seed=0)].mean(dim=-1)  # (T, R)
    covered = [low <= 0.0 <= high for low, high in map(percentile_interval, means)]
    assert 0.93 <= sum(covered) / len(covered) <= 0.98


def test_identical_models_give_win_rate_one_half_exactly_and_ties_count_half():
    scores = torch.randn(50, generator=torch.Generator().manual_seed(2))
    result = compare_scores(scores, scores.clone(), resamples=200, seed=3)
    assert result["win_rate"] == 0.5 and result["win_rate_ci"] == [0.5, 0.5]
    assert result["mean_difference"] == 0.0 and result["tuned"] == result["base"]
    tuned, base = torch.tensor([2.0, 2.0, 0.0, 5.0]), torch.tensor([1.0, 2.0, 1.0, 5.0])
    assert win_rate(tuned, base).item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4, abs=0)


def test_prompt_bootstrap_draws_whole_groups_and_covers_the_spread_between_prompts():
    indices = bootstrap_indices(12, 50, seed=0, group_size=4).view(50, 3, 4)  # (R, groups, k)
    assert (indices % 4 == torch.arange(4)).all() and (indices[..., 1:] - indices[..., :-1] == 1).all()
    # 20 prompts whose 25 seeds score alike: drawing cells sees 500 samples, drawing prompts sees the 20 that exist
    base = torch.randn(20, generator=torch.Generator().manual_seed(7)).repeat_interleave(25)  # (500,)
    tuned = base + torch.randn(20, generator=torch.Generator().manual_seed(8)).repeat_interleave(25)
    cell, prompt = compare_scores(tuned, base, 2000, seed=0), compare_scores(tuned, base, 2000, seed=0, group_size=25)
    widths = [result["mean_difference_ci"][1] - result["mean_difference_ci"][0] for result in (cell, prompt)]
    assert 3.5 < widths[1] / widths[0] < 6.5  # sqrt(25) = 5
    assert cell["mean_difference"] == prompt["mean_difference"]
    with pytest.raises(ValueError, match="does not divide"):
        bootstrap_indices(10, 5, seed=0, group_size=4)


def test_bootstrap_is_seeded():
    tuned, base = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    first, again = compare_scores(tuned, base, 300, seed=5), compare_scores(tuned, base, 300, seed=5)
    other = compare_scores(tuned, base, 300, seed=6)
    assert first == again
    assert first["tuned"]["mean_ci"] != other["tuned"]["mean_ci"]
    assert first["tuned"]["mean"] == other["tuned"]["mean"]


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="one score per sample each"):
        compare_scores(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        compare_scores(torch.tensor([0.0, float("nan")]), torch.zeros(2))


# sampling and scoring ---------------------------------------------------------------------------------------------


def test_each_cell_starts_from_its_own_noise_whatever_the_batching_and_the_other_prompts():
    """Cell (prompt, seed) equals a lone pipeline call from randn(cell_seed(prompt, seed)), in batches of 1 and 16."""
    pipeline = load_digits_pipeline(True)
    prompts, seeds = ["a handwritten 3", "a handwritten 8"], [5, 7, 9]
    batched = sample_images(pipeline, prompts, seeds, "DDIMScheduler", nfe=3, guidance_scale=1.5, batch_size=16)
    single = sample_images(pipeline, prompts, seeds, "DDIMScheduler", nfe=3, guidance_scale=1.5, batch_size=1)
    alone = sample_images(pipeline, prompts[1:], seeds[1:2], "DDIMScheduler", nfe=3, guidance_scale=1.5)
    assert batched.shape == (6, 1, 8, 8) and 0.0 <= batched.min() and batched.max() <= 1.0
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[4:5], alone, atol=1e-5, rtol=0)  # prompt 1, seed 7
    scheduler = pipeline.scheduler
    pipeline.scheduler = DDIMScheduler.from_config(scheduler.config)
    noise = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(cell_seed("a handwritten 8", 7)))
    lone = pipeline("a handwritten 8", num_inference_steps=3, guidance_scale=1.5, latents=noise, output_type="pt")
    torch.testing.assert_close(batched[4], lone.images[0], atol=1e-5, rtol=0)
    pipeline.scheduler = scheduler
    assert len({cell_seed(p, s) for p in prompts for s in seeds}) == 6 and cell_seed("a", 0) < 2**63


def test_score_pipeline_gives_one_score_per_cell_and_leaves_the_scheduler_alone():
    pipeline = load_digits_pipeline(True)
    scheduler = pipeline.scheduler
    scores = score_pipeline(pipeline, DIGITS_PROMPTS[:3], [0, 1], load_rewards(["digits"]))
    assert pipeline.scheduler is scheduler
    assert list(scores) == ["digits"] and scores["digits"].shape == (6,) and scores["digits"].dtype == torch.float32
    assert (scores["digits"] <= 0).all()  # log-probabilities


# full runs --------------------------------------------------------------------------------------------------------


def test_digits_run_writes_json_markdown_and_grid_with_hashes_and_versions(tmp_path, digits_lora):
    prompts_file = write_prompts(tmp_path / "prompts.txt", ["a handwritten 4", "", "a handwritten 7"])
    config = EvalConfig(lora=str(digits_lora), prompts=str(prompts_file), num_seeds=2, out=str(tmp_path / "out"))
    report = run_eval(config)

    out = tmp_path / "out"
    assert json.loads((out / "eval.json").read_text()) == report
    assert report["prompts"] == ["a handwritten 4", "a handwritten 7"]
    assert report["prompts_sha256"] == hashlib.sha256(prompts_file.read_bytes()).hexdigest()
    assert report["seeds"] == [0, 1] and report["sampler"] == "DDIMScheduler"
    assert report["nfe"] == 2 and report["guidance_scale"] == 1.0
    assert report["pipeline"] == "digits-cond" and report["lora"] == str(digits_lora) and report["weights"] is None
    digits = report["rewards"]["digits"]
    assert digits["version"] == load_reward("digits").version and digits["version"].startswith("embedded:digits")
    assert digits["num_samples"] == 4 and len(report["scores"]["digits"]["tuned"]) == 4
    assert report["bootstrap"] == {"resamples": 1000, "seed": 0, "unit": "cell", "confidence": 0.95}

    # the base scores are the digits classifier's log p(digit) of plain DDIM samples from randn(seed)
    pipeline = load_digits_pipeline(True)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    cells = [cell_seed(p, s) for p in report["prompts"] for s in (0, 1)]
    noise = torch.cat([torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(c)) for c in cells])
    samples = pipeline(report["prompts"], 2, 1.0, 2, latents=noise, output_type="latent").images  # (4, 1, 8, 8)
    log_probs = load_digits_classifier()(samples.clamp(-1, 1)).log_softmax(dim=1)[torch.arange(4), [4, 4, 7, 7]]
    torch.testing.assert_close(torch.tensor(report["scores"]["digits"]["base"]), log_probs, atol=1e-4, rtol=0)
    assert report["scores"]["digits"]["tuned"] != report["scores"]["digits"]["base"]

    table = (out / "eval.md").read_text()
    assert "| digits |" in table and report["prompts_sha256"][:12] in table and digits["version"] in table
    grid = Image.open(out / "grid.png")
    assert grid.size == (160 + 2 * 66, 2 * 2 * 66 + 2 * 2 * 2)  # 2 prompts x (base, tuned) rows, 2 seeds


def test_identical_tuned_and_base_give_win_rate_one_half(tmp_path):
    load_digits_pipeline(True).save_pretrained(tmp_path / "copy")
    report = run_eval(EvalConfig(weights=str(tmp_path / "copy"), num_seeds=2, out=str(tmp_path / "out")))
    digits = report["rewards"]["digits"]
    assert digits["win_rate"] == 0.5 and digits["win_rate_ci"] == [0.5, 0.5] and digits["mean_difference"] == 0.0
    assert digits["num_samples"] == 20 and report["prompts_file"] is None


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(prompts="missing.txt"), FileNotFoundError, "prompt file .*missing.txt does not exist"),
        (dict(prompts="empty.txt"), ValueError, "holds no prompt"),
        (dict(rewards=["digits", "no-such-reward"]), ValueError, "unknown reward 'no-such-reward'"),
        (dict(lora="nowhere"), FileNotFoundError, "no LoRA file or folder at nowhere"),
        (dict(lora="empty_folder"), FileNotFoundError, "has no pytorch_lora_weights.safetensors"),
        (dict(pipeline="not_a_pipeline"), ValueError, "has no model_index.json"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, monkeypatch, digits_lora, changes, error, match):
    monkeypatch.chdir(tmp_path)
    write_prompts(tmp_path / "prompts.txt", ["a handwritten 1"])
    write_prompts(tmp_path / "empty.txt", ["", "  "])
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "not_a_pipeline").mkdir()
    options = dict(lora=str(digits_lora), prompts="prompts.txt", num_seeds=1, out=str(tmp_path / "out")) | changes
    with pytest.raises(error, match=match):
        run_eval(EvalConfig(**options))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(lora=None), "no tuned model"),
        (dict(weights="w"), "either lora"),
        (dict(num_seeds=0), "num_seeds must be >= 1"),
        (dict(nfe=0), "nfe must be >= 1"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(rewards=[]), "rewards is empty"),
        (dict(dtype="float64"), "dtype='float64' is not allowed"),
    ],
)
def test_bad_options_are_refused_by_the_config(changes, match):
    with pytest.raises(ValueError, match=match):
        EvalConfig(**(dict(lora="x") | changes))


def test_a_pipeline_without_a_prompt_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pass a prompt file"):
        run_eval(EvalConfig(pipeline=str(tmp_path), lora="x", out=str(tmp_path / "out")))


# tiny SD / SDXL with a tiny local CLIP reward ---------------------------------------------------------------------


def save_tiny_clip(folder: Path) -> Path:
    """A random CLIP (32 px vision tower) with its tokenizer and image processor, saved as load_reward reads it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = tiny.make_tokenizer(folder / "tokenizer_src")
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=tiny.text_config(tokenizer).to_dict(),
        vision_config=dict(vision, num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "clip"
    )
    return folder / "clip"


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_tiny_pipeline_with_a_lora_and_a_local_clip_reward(tmp_path, kind):
    pipeline = tiny.make_sd_pipeline(tmp_path) if kind == "sd" else tiny.make_sdxl_pipeline(tmp_path)
    lora = save_random_lora(pipeline, tmp_path / "lora", scale=0.5, targets=("to_q", "to_k", "to_v", "to_out.0"))
    clip = save_tiny_clip(tmp_path)
    prompts = write_prompts(tmp_path / "prompts.txt", ["a red cube", "a photo of a corgi"])
    config = EvalConfig(
        pipeline=str(tmp_path / kind),
        lora=str(lora),
        prompts=str(prompts),
        num_seeds=2,
        nfe=2,
        rewards=[f"clip:{clip}", f"pickscore:{clip}"],
        bootstrap=200,
        out=str(tmp_path / "out"),
    )
    report = run_eval(config)
    own = "PNDMScheduler" if kind == "sd" else "EulerDiscreteScheduler"
    assert report["sampler"] == own and report["guidance_scale"] == (7.5 if kind == "sd" else 5.0)
    for name in config.rewards:
        result = report["rewards"][name]
        assert result["version"] == load_reward(name).version and str(clip.resolve()) in result["version"]
        assert result["num_samples"] == 4 and 0.0 <= result["win_rate"] <= 1.0
        low, high = result["tuned"]["mean_ci"]
        assert low <= result["tuned"]["mean"] <= high
    scores = report["scores"][f"pickscore:{clip}"]
    assert scores["tuned"] != scores["base"]  # the LoRA changes the images
    side = 64  # the UNet's sample_size 32 x the VAE factor 2
    assert Image.open(tmp_path / "out" / "grid.png").size == (160 + 2 * (side + 2), 2 * 2 * (side + 2) + 2 * 2 * 2)


def test_eval_metrics_flatten_the_comparison_for_a_training_log():
    tuned, base = {"digits": torch.tensor([0.0, -1.0, -0.5])}, {"digits": torch.tensor([-1.0, -1.0, -2.0])}
    metrics = eval_metrics(tuned, base, resamples=100, seed=0)
    result = compare_scores(tuned["digits"], base["digits"], 100, 0)
    assert metrics["eval/digits/win_rate"] == result["win_rate"] == pytest.approx(5 / 6, abs=1e-12)
    assert [metrics["eval/digits/win_rate_low"], metrics["eval/digits/win_rate_high"]] == result["win_rate_ci"]
    assert metrics["eval/digits/tuned_mean"] == pytest.approx(-0.5) and metrics["eval/digits/base_median"] == -1.0
    assert all(isinstance(value, float) for value in metrics.values()) and len(metrics) == 4 * 3 + 2 * 3
