"""``diffalign pairs``: K samples per prompt from a pipeline, scored by a reward model, written as parquet."""

from __future__ import annotations

from ..alignment.pairs import PairsConfig, make_pairs, summary

NAME = "pairs"
HELP = "make preference data: K samples per prompt from fixed seeds, scored by a reward model, as parquet shards"
DESCRIPTION = (
    "Sample every prompt of a prompt file K times with a pipeline, candidate k of prompt p from its own seed "
    "(seed, p, k), score each candidate with a reward model (diffalign.evaluation.rewards), and write parquet shards "
    "(prompt, images = K PNG bytes, scores = K floats, seeds) with generation.json (sampler, NFE, guidance, prompt-"
    "file sha256, reward version) into --out. `diffalign train --dataset OUT` reads the folder back as K-candidate "
    "records with scores. Default: the embedded digits-cond model, its ten digit prompts and the digits classifier "
    "reward (no download, seconds on a CPU). A rerun with the same options resumes after the written shards."
)
CONFIG = PairsConfig


def run(config: PairsConfig) -> int:
    """Make the data, print the record count, the mean best-minus-worst reward gap and the folder; exit code 0."""
    out = make_pairs(config)
    stats = summary(config)
    print(
        f"prompts: {stats['records']}, candidates each: {config.num_candidates}, mean best - worst {config.reward} "
        f"reward: {stats['mean_gap']:.4f}"
    )
    print(f"wrote {out}")
    return 0
