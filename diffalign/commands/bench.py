"""``diffalign bench``: samplers x NFE on one model, written as CSV / JSON / Markdown / PNG."""

from __future__ import annotations

from ..evaluation.benchmark import BenchConfig, run_bench
from . import command_line

NAME = "bench"
HELP = "samplers x NFE: ODE error, Fréchet distance and wall time, as CSV / JSON / Markdown / PNG"
DESCRIPTION = (
    "Benchmark samplers against an accurate probability-flow ODE solution from the same starting noise (and "
    "FD-digits on the digits model) over a grid of NFE."
)
CONFIG = BenchConfig


def run(config: BenchConfig) -> int:
    paths = run_bench(config, command=command_line(NAME, config))
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
