"""PatchDPO on the embedded digits-cond model with reference digits, against Diffusion-DPO on the same records.

Data (``diffalign.alignment.patch_quality.make_digit_reference_pairs``): per digit, samples of the model's regular
sampler (DPM-Solver++ 20 steps, training seeds), each with its reference, the closest real training digit of the
prompted class, and patch quality maps from the digits classifier's convolutional features (by default their
quantiles among real same-class pairs, ``SameClassCalibration``). Two data settings: ``clean`` (the samples as
drawn) and ``wrong_details`` (a copy in which 30% of the generated images get one 4x4 quadrant from a real digit of
another class, maps recomputed: the paper's "mostly faithful, a few bad patches"). PatchDPO trains on the reference
image (weight 1 - q) and the generated image (weight q); its ablations on uniform maps (each map replaced by its
mean) and on q = 0 (reference term only); Diffusion-DPO on the same records as pairs, the reference preferred; all at
``--learning_rate`` and ``--steps`` for each training seed. Every LoRA is evaluated against the base with the eval
harness's sampler (DDIM 2 steps, no guidance: the hard one, not the data's) and paired bootstrap intervals on
held-out seeds: the digits classifier reward log p(prompted digit) and the patch similarity to the closest reference
(``PatchSimilarityReward``). Prints the statistics of the quality maps and a Markdown table.

    python scripts/demo_patchdpo_digits.py --out demo_patchdpo
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_pairs import EVAL_SEED_OFFSET
from diffalign.alignment.patch_quality import (
    DATA_SAMPLING,
    DigitsPatchFeatures,
    PatchSimilarityReward,
    SameClassCalibration,
    make_digit_reference_pairs,
    to_tensor,
    write_quality_maps,
)
from diffalign.alignment.records import open_image
from diffalign.alignment.trainer import train
from diffalign.evaluation.bootstrap import compare_scores
from diffalign.evaluation.harness import load_lora, score_pipeline
from diffalign.evaluation.rewards import load_reward
from diffalign.models.digits import load_digits_data, load_digits_pipeline, prompt_to_label

DEMO_CONFIG = dict(
    train_batch_size=16,
    lora_rank=8,
    lora_target_modules="to_v,to_out.0,conv1,conv2",
    checkpointing_steps=0,
    progress_bar=False,
)
BETA = 500.0
RUNS = ("patchdpo", "patchdpo:mean", "patchdpo:zero", "dpo")
"""The default runs, ``method[:maps]``: PatchDPO, its ablations (uniform maps, reference term only) and
Diffusion-DPO on the same records."""
LABELS = {
    "patchdpo": "PatchDPO",
    "patchdpo:mean": "PatchDPO, uniform maps (each map its mean)",
    "patchdpo:zero": "PatchDPO, q = 0 (reference term only)",
    "dpo": "Diffusion-DPO (reference preferred)",
}


def map_statistics(folder: Path) -> str:
    """The generated images' quality maps q (candidate 1 of each record) at their 4x4 patch grid: how much the
    patches differ in quality, within an image and across images."""
    records = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    maps = torch.stack([torch.from_numpy(np.load(folder / r["weight_maps"][1])) for r in records])  # (N, 8, 8)
    patches = F.avg_pool2d(maps[:, None], 2).flatten(1)  # (N, 16)
    image_mean = patches.mean(dim=1)  # (N,)
    spread = patches.max(dim=1).values - patches.min(dim=1).values  # (N,)
    quantiles = torch.tensor([0.1, 0.5, 0.9])
    return (
        f"quality maps of {len(records)} generated images: patch q mean {patches.mean():.3f} std {patches.std():.3f}, "
        f"patch q 10/50/90% {fmt(patches.flatten().quantile(quantiles))}, fraction of patches q < 0.5 "
        f"{(patches < 0.5).float().mean():.3f}; per-image mean q 10/50/90% {fmt(image_mean.quantile(quantiles))}; "
        f"per-image max - min patch q 10/50/90% {fmt(spread.quantile(quantiles))}"
    )


def ablated_maps(folder: Path, maps: str) -> Path:
    """A copy of the data whose quality maps are replaced (the ablations of the docs): ``mean``, each map replaced
    by its own mean (uniform maps: the image-level loss with the same per-image weights, no patch weighting);
    ``zero``, q = 0 everywhere (the loss is then the denoising MSE of the reference images alone)."""
    target = folder.with_name(f"{folder.name}_{maps}")
    if (target / "pairs.jsonl").is_file():
        return target
    shutil.copytree(folder, target, dirs_exist_ok=True)
    for line in (target / "pairs.jsonl").read_text().splitlines():
        for name in json.loads(line)["weight_maps"]:
            quality = np.load(target / name)  # (H, W)
            new = np.full_like(quality, quality.mean() if maps == "mean" else 0.0)
            np.save(target / name, new.astype(np.float32))
    return target


def add_wrong_details(folder: Path, calibration, fraction: float = 0.3, seed: int = 0) -> Path:
    """A copy of the data in which ``fraction`` of the generated images get one random 4x4 quadrant (a quarter of
    the image) from the same place of a random real digit of another class, with their quality maps recomputed:
    mostly faithful samples with a few wrong patches, the paper's setting."""
    target = folder.with_name(f"{folder.name}_wrong_details")
    if (target / "pairs.jsonl").is_file():
        return target
    shutil.copytree(folder, target, dirs_exist_ok=True)
    digits, labels = load_digits_data("train")  # (M, 1, 8, 8) in [-1, 1], (M,)
    rng = np.random.default_rng(seed)
    for line in (target / "pairs.jsonl").read_text().splitlines():
        record = json.loads(line)
        if rng.random() >= fraction:
            continue
        others = torch.nonzero(labels != prompt_to_label(record["prompt"])).flatten()
        donor = ((digits[others[rng.integers(len(others))], 0] + 1) * 127.5).round().to(torch.uint8).numpy()
        image = np.array(Image.open(target / record["images"][1]))  # (8, 8) uint8
        top, left = rng.integers(0, 2, size=2) * 4
        image[top : top + 4, left : left + 4] = donor[top : top + 4, left : left + 4]
        Image.fromarray(image, mode="L").save(target / record["images"][1])
    write_quality_maps(target, DigitsPatchFeatures(), channels=1, calibration=calibration)
    return target


def fmt(values: torch.Tensor) -> str:
    return " / ".join(f"{v:.2f}" for v in values.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_patchdpo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--samples_per_digit", type=int, default=32)
    parser.add_argument("--num_seeds", type=int, default=20, help="held-out eval seeds per prompt")
    parser.add_argument("--learning_rate", type=float, default=3e-5, help="every run's learning rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (order, noise, init)")
    parser.add_argument("--runs", nargs="+", choices=tuple(LABELS), default=RUNS, help="method[:ablated_maps]")
    parser.add_argument("--data", nargs="+", choices=("clean", "wrong_details"), default=("clean", "wrong_details"))
    parser.add_argument("--quality", choices=("calibrated", "cosine"), default="calibrated", help="q of the maps")
    parser.add_argument("--data_sampler", default=DATA_SAMPLING["sampler"], help="sampler of the generated images")
    parser.add_argument("--data_nfe", type=int, default=DATA_SAMPLING["nfe"])
    parser.add_argument("--data_guidance", type=float, default=DATA_SAMPLING["guidance_scale"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    sampling = {"sampler": args.data_sampler, "nfe": args.data_nfe, "guidance_scale": args.data_guidance}
    calibration = SameClassCalibration() if args.quality == "calibrated" else None
    clean = out / f"reference_pairs_{args.data_sampler}_{args.data_nfe}_{args.data_guidance:g}_{args.quality}"
    if not (clean / "pairs.jsonl").is_file():
        pipeline = load_digits_pipeline(conditional=True)
        make_digit_reference_pairs(clean, pipeline, args.samples_per_digit, 0, sampling, calibration)
    rewards = {"digits": load_reward("digits"), "patch_similarity": PatchSimilarityReward()}
    prompts = [f"a handwritten {d}" for d in range(10)]
    seeds = list(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + args.num_seeds))
    base = score_pipeline(load_digits_pipeline(conditional=True), prompts, seeds, rewards)
    rows, scores = [], {}
    for setting in args.data:
        data = clean if setting == "clean" else add_wrong_details(clean, calibration)
        print(f"{setting} data ({sampling}, q {args.quality}): {map_statistics(data)}")
        print(f"  its generated images: {score_images(data, rewards)}")
        for run_name in args.runs:
            method, _, maps = run_name.partition(":")
            for seed in args.seeds:
                start = time.time()
                run = out / f"{data.name}_{run_name.replace(':', '_')}_lr{args.learning_rate:g}_seed{seed}"
                config = TrainConfig(
                    **DEMO_CONFIG,
                    **(dict(beta=BETA) if method == "dpo" else {}),
                    method=method,
                    learning_rate=args.learning_rate,
                    dataset=str(ablated_maps(data, maps) if maps else data),
                    output_dir=str(run),
                    max_train_steps=args.steps,
                    seed=seed,
                )
                train(config)
                seconds = time.time() - start
                pipeline = load_digits_pipeline(conditional=True)
                load_lora(pipeline, str(run))
                tuned = score_pipeline(pipeline, prompts, seeds, rewards)
                report = {name: compare_scores(tuned[name], base[name], group_size=len(seeds)) for name in rewards}
                (run / "eval.json").write_text(json.dumps(report, indent=2))
                rows.append((f"{setting}: {LABELS[run_name]}, seed {seed}", seconds, report))
                scores[setting, run_name, seed] = tuned
    print(
        f"\n{len(prompts)} prompts x {len(seeds)} held-out seeds (from {EVAL_SEED_OFFSET}), DDIM 2 steps, no guidance;"
        f" lr {args.learning_rate:g}, {args.steps} steps; [95% cluster-bootstrap interval over prompts]"
    )
    print(
        "| data: model | train s | digits reward (diff vs base) | patch similarity (diff vs base) | digits win-rate |"
    )
    print("|---|---|---|---|---|")
    first = rows[0][2]
    print(
        f"| base | - | {first['digits']['base']['mean']:.4f} | {first['patch_similarity']['base']['mean']:.4f} | - |"
    )
    for label, seconds, report in rows:
        cells = [
            f"{report[k]['tuned']['mean']:.4f} ({report[k]['mean_difference']:+.4f} "
            f"[{report[k]['mean_difference_ci'][0]:+.4f}, {report[k]['mean_difference_ci'][1]:+.4f}])"
            for k in ("digits", "patch_similarity")
        ]
        win = report["digits"]
        cells.append(f"{win['win_rate']:.3f} [{win['win_rate_ci'][0]:.3f}, {win['win_rate_ci'][1]:.3f}]")
        print(f"| {label} | {seconds:.0f} | " + " | ".join(cells) + " |")
    print_paired(scores, len(seeds))


def print_paired(scores: dict, group_size: int) -> None:
    """PatchDPO minus each other run of the same data and training seed, paired on the same eval cells."""
    print("\n| data, seed: PatchDPO minus | digits reward | patch similarity |")
    print("|---|---|---|")
    for (setting, run_name, seed), other in scores.items():
        if run_name == "patchdpo" or (setting, "patchdpo", seed) not in scores:
            continue
        mine = scores[setting, "patchdpo", seed]
        report = {name: compare_scores(mine[name], other[name], group_size=group_size) for name in mine}
        cells = [
            f"{r['mean_difference']:+.4f} [{r['mean_difference_ci'][0]:+.4f}, {r['mean_difference_ci'][1]:+.4f}]"
            for r in (report["digits"], report["patch_similarity"])
        ]
        print(f"| {setting}, seed {seed}: {LABELS[run_name]} | " + " | ".join(cells) + " |")


def score_images(data: Path, rewards: dict) -> str:
    """The mean rewards of the training data's generated images (candidate 1 of each record)."""
    records = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    images = torch.stack([to_tensor(open_image(r["images"][1], data), 1) for r in records])  # (N, 1, 8, 8)
    prompts = [r["prompt"] for r in records]
    return ", ".join(f"{name} {model.score_batch(images, prompts).mean():.4f}" for name, model in rewards.items())


if __name__ == "__main__":
    main()
