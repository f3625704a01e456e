"""Pairs (K = 2) from K-candidate records with scores, for methods that train on pairs (SmPO, Diffusion-DPO).

``diffalign pairs`` writes K scored candidates per prompt; SmPO (Lu et al. 2025) trains on pairs with both scores,
Diffusion-DPO on a preferred / rejected pair. ``split_candidates`` writes one parquet file of K = 2 records with the
``prompt``, ``images`` and ``scores`` columns that ``sources.load_source`` reads:

- ``"all"``: every pair (i, j), i < j, of a prompt's candidates in their stored order, K (K - 1) / 2 pairs per
  prompt (SmPO's p decides which side is preferred, and how strongly);
- ``"best_worst"``: the highest- and the lowest-scored candidate, best first (Diffusion-DPO's hard pair).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Literal


def candidate_pairs(scores: list[float], mode: Literal["all", "best_worst"]) -> list[tuple[int, int]]:
    """Index pairs (first, second) of one record's K candidates for ``mode`` (see the module docstring)."""
    if mode == "all":
        return list(itertools.combinations(range(len(scores)), 2))
    if mode == "best_worst":
        order = sorted(range(len(scores)), key=lambda k: -scores[k])
        return [(order[0], order[-1])]
    raise ValueError(f"mode must be 'all' or 'best_worst', got {mode!r}.")


def split_candidates(source: str | Path, out: str | Path, mode: Literal["all", "best_worst"] = "all") -> Path:
    """Read the parquet shards of ``source`` (prompt, images, scores) and write ``out``/pairs.parquet of pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = sorted(Path(source).glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{source} holds no parquet shards; make K-candidate data with `diffalign pairs`.")
    columns = {"prompt": [], "images": [], "scores": []}
    for shard in shards:
        table = pq.read_table(shard, columns=["prompt", "images", "scores"]).to_pylist()
        for row in table:
            for first, second in candidate_pairs(row["scores"], mode):
                columns["prompt"].append(row["prompt"])
                columns["images"].append([row["images"][first], row["images"][second]])
                columns["scores"].append([row["scores"][first], row["scores"][second]])
    table = pa.table(
        {
            "prompt": pa.array(columns["prompt"], pa.string()),
            "images": pa.array(columns["images"], pa.list_(pa.binary())),
            "scores": pa.array(columns["scores"], pa.list_(pa.float32())),
        }
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / "pairs.parquet.tmp"
    pq.write_table(table, temporary)
    os.replace(temporary, out / "pairs.parquet")
    return out
