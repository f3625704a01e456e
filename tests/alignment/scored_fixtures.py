"""Scored K-candidate data of digits-cond made by `diffalign pairs`, and a copy of a pair table with new scores."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.alignment.candidate_pairs import split_candidates
from diffalign.alignment.pairs import PairsConfig, make_pairs


def make_scored_digits(folder: Path) -> tuple[Path, Path]:
    """(K = 4 folder: ten digit prompts x 4 candidates scored by the digits reward, its pairs folder: 60 pairs)."""
    candidates = make_pairs(PairsConfig(out=str(folder / "k4"), num_candidates=4), progress=False)
    return candidates, split_candidates(candidates, folder / "k2", mode="all")


def with_scores(pairs: Path, out: Path, scores: list[float]) -> Path:
    """A copy of ``pairs``/pairs.parquet in ``out`` whose every record has the scores ``scores``."""
    table = pq.read_table(pairs / "pairs.parquet")
    column = pa.array([scores] * table.num_rows, pa.list_(pa.float32()))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.set_column(table.schema.get_field_index("scores"), "scores", column), out / "pairs.parquet")
    return out
