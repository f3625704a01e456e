"""Regenerate the tables of docs/benchmarks.md: run `diffalign bench` on the embedded models and splice the results in.

    python scripts/update_readme_benchmarks.py                  # rerun both embedded models, default settings
    python scripts/update_readme_benchmarks.py --models gmm     # rerun gmm only; digits keeps its last run
    python scripts/update_readme_benchmarks.py --render_only    # rebuild the page from docs/bench/, no sampling

Outputs (CSV, JSON, Markdown, PNG) go to docs/bench/; each run's wall time is added to its JSON (`meta.wall_minutes`).
The text of docs/benchmarks.md between the `bench:start` / `bench:end` markers is rebuilt from those files alone:
per model the exact command and wall time (JSON), the Markdown tables and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
PAGE_MODELS = ("digits", "gmm")  # the runs shown on the page, in this order
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def run_bench(model: str, out: Path) -> None:
    """Run `diffalign bench` on one embedded model and record its wall time in the JSON it wrote."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "diffalign", "bench", "--model", model, "--out", os.path.relpath(out, ROOT)]
    subprocess.run([*command, "--quiet"], cwd=ROOT, check=True, capture_output=True)
    minutes = (time.perf_counter() - start) / 60
    path = out / f"bench_{model}.json"
    results = json.loads(path.read_text())
    results["meta"]["wall_minutes"] = round(minutes, 2)
    path.write_text(json.dumps(results, indent=1))


def model_section(model: str, out: Path) -> str:
    """One model's part of the page: command and wall time, the tables of bench_<model>.md, the plot."""
    json_path, tables_path = out / f"bench_{model}.json", out / f"bench_{model}.md"
    for path in (json_path, tables_path):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `python scripts/update_readme_benchmarks.py --models {model}`.")
    meta = json.loads(json_path.read_text())["meta"]
    if "wall_minutes" not in meta:
        raise SystemExit(f"{json_path} has no meta.wall_minutes: rerun it with this script (--models {model}).")
    tables = tables_path.read_text().strip()
    plot = os.path.relpath(out / f"bench_{model}.png", PAGE.parent)
    return (
        f"`{meta['command']}` ({meta['wall_minutes']:.1f} min on this machine)\n\n{tables}\n\n"
        f"![{model} benchmark]({plot})\n"
    )


def splice(page: str, out: Path) -> str:
    """``page`` with the text between the markers rebuilt from the bench outputs in ``out``."""
    if START not in page or END not in page:
        raise SystemExit(f"{PAGE} lacks the {START} / {END} markers.")
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    sections = "\n".join(model_section(model, out) for model in PAGE_MODELS)
    return f"{head}{START}\n{sections}{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PAGE_MODELS), choices=PAGE_MODELS, help="models to rerun")
    parser.add_argument("--out", default="docs/bench", help="folder of the bench outputs (default: %(default)s)")
    parser.add_argument(
        "--render_only", "--render-only", action="store_true", help="rebuild the page from --out without rerunning"
    )
    args = parser.parse_args()
    out = ROOT / args.out
    if not args.render_only:
        for model in args.models:
            run_bench(model, out)
    PAGE.write_text(splice(PAGE.read_text(), out))
    print(f"updated {PAGE.relative_to(ROOT)} from {args.out} ({', '.join(PAGE_MODELS)})")


if __name__ == "__main__":
    main()
