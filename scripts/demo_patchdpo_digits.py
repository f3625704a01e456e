"""PatchDPO on the embedded digits-cond model with reference digits, against Diffusion-DPO on the same records.

Data (``diffalign.alignment.patch_quality.make_digit_reference_pairs``): per digit, samples of the hard demo sampler
(DDIM 2 steps, no guidance), each with its reference, the closest real training digit of the prompted class, and
patch quality maps from the digits classifier's convolutional features. PatchDPO trains on the reference image
(weight 1 - q) and the generated image (weight q); Diffusion-DPO on the same records as pairs, the reference
preferred. Both LoRAs are evaluated against the base with the eval harness's sampler and paired bootstrap intervals
on held-out seeds: the digits classifier reward log p(prompted digit) and the patch similarity to the closest
reference (``PatchSimilarityReward``). Prints the statistics of the quality maps and a Markdown table. Both methods
train at ``--learning_rate`` (3e-5); ``--maps minmax | zero`` runs the ablations of docs/methods/patchdpo.md.

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

from diffalign.alignment.config import TrainConfig
from diffalign.alignment.digits_pairs import EVAL_SEED_OFFSET
from diffalign.alignment.patch_quality import PatchSimilarityReward, make_digit_reference_pairs
from diffalign.alignment.trainer import train
from diffalign.evaluation.bootstrap import compare_scores
from diffalign.evaluation.harness import load_lora, score_pipeline
from diffalign.evaluation.rewards import load_reward
from diffalign.models.digits import load_digits_pipeline

DEMO_CONFIG = dict(
    train_batch_size=16,
    lora_rank=8,
    lora_target_modules="to_v,to_out.0,conv1,conv2",
    checkpointing_steps=0,
    progress_bar=False,
)
BETA = 500.0


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
    """A copy of the data whose quality maps are replaced (the ablations of the docs): ``minmax``, each map rescaled
    to [0, 1] by its own min and max (more contrast); ``zero``, q = 0 everywhere (the loss is then the denoising MSE
    of the reference images alone)."""
    target = folder.with_name(f"{folder.name}_{maps}")
    if (target / "pairs.jsonl").is_file():
        return target
    shutil.copytree(folder, target, dirs_exist_ok=True)
    for line in (target / "pairs.jsonl").read_text().splitlines():
        for name in json.loads(line)["weight_maps"]:
            quality = np.load(target / name)  # (H, W)
            span = max(quality.max() - quality.min(), 1e-6)
            new = (quality - quality.min()) / span if maps == "minmax" else np.zeros_like(quality)
            np.save(target / name, new.astype(np.float32))
    return target


def fmt(values: torch.Tensor) -> str:
    return " / ".join(f"{v:.2f}" for v in values.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_patchdpo")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--samples_per_digit", type=int, default=32)
    parser.add_argument("--num_seeds", type=int, default=20)
    parser.add_argument("--learning_rate", type=float, default=3e-5, help="both methods' learning rate")
    parser.add_argument("--seed", type=int, default=0, help="training seed (data order, timesteps, noise, LoRA init)")
    parser.add_argument("--maps", choices=("digits", "minmax", "zero"), default="digits", help="ablated_maps")
    parser.add_argument("--patchdpo_lr", type=float, default=None, help="PatchDPO's own learning rate (default: same)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    data = out / "reference_pairs"
    start = time.time()
    if not (data / "pairs.jsonl").is_file():
        make_digit_reference_pairs(data, load_digits_pipeline(conditional=True), args.samples_per_digit)
    print(f"data: {time.time() - start:.0f} s")
    if args.maps != "digits":
        data = ablated_maps(data, args.maps)
    print(map_statistics(data))
    rewards = {"digits": load_reward("digits"), "patch_similarity": PatchSimilarityReward()}
    prompts = [f"a handwritten {d}" for d in range(10)]
    seeds = list(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + args.num_seeds))
    base = score_pipeline(load_digits_pipeline(conditional=True), prompts, seeds, rewards)
    rows = []
    for method, options in (("patchdpo", {}), ("dpo", dict(beta=BETA))):
        start = time.time()
        run = out / (method if args.maps == "digits" else f"{method}_{args.maps}")
        config = TrainConfig(
            **DEMO_CONFIG,
            **options,
            method=method,
            learning_rate=args.patchdpo_lr if method == "patchdpo" and args.patchdpo_lr else args.learning_rate,
            dataset=str(data),
            output_dir=str(run),
            max_train_steps=args.steps,
            seed=args.seed,
        )
        train(config)
        seconds = time.time() - start
        pipeline = load_digits_pipeline(conditional=True)
        load_lora(pipeline, str(run))
        tuned = score_pipeline(pipeline, prompts, seeds, rewards)
        report = {name: compare_scores(tuned[name], base[name], group_size=len(seeds)) for name in rewards}
        (run / "eval.json").write_text(json.dumps(report, indent=2))
        rows.append((method, seconds, report))
    print(
        f"\n{len(prompts)} prompts x {len(seeds)} held-out seeds (from {EVAL_SEED_OFFSET}), DDIM 2 steps, no guidance;"
        " [95% cluster-bootstrap interval over prompts]"
    )
    print("| model | train s | digits reward (diff vs base) | patch similarity (diff vs base) | digits win-rate |")
    print("|---|---|---|---|---|")
    first = rows[0][2]
    print(
        f"| base | - | {first['digits']['base']['mean']:.4f} | {first['patch_similarity']['base']['mean']:.4f} | - |"
    )
    for method, seconds, report in rows:
        cells = [
            f"{report[k]['tuned']['mean']:.4f} ({report[k]['mean_difference']:+.4f} "
            f"[{report[k]['mean_difference_ci'][0]:+.4f}, {report[k]['mean_difference_ci'][1]:+.4f}])"
            for k in ("digits", "patch_similarity")
        ]
        win = report["digits"]
        cells.append(f"{win['win_rate']:.3f} [{win['win_rate_ci'][0]:.3f}, {win['win_rate_ci'][1]:.3f}]")
        print(f"| {method} | {seconds:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
