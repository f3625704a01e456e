"""Regenerate the README's benchmark section: run `diffalign bench` on the embedded models and splice the tables in.

    python scripts/update_readme_benchmarks.py            # both embedded models, default settings
    python scripts/update_readme_benchmarks.py --models gmm

Outputs (CSV, JSON, Markdown, PNG) go to docs/bench/; the README text between the `bench:start` / `bench:end`
markers is replaced by each run's exact command, its Markdown tables and its plot.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "gmm"])
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    sections = []
    for model in args.models:
        command = ["diffalign", "bench", "--model", model, "--out", args.out, "--quiet"]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "diffalign", *command[1:]], cwd=ROOT, check=True, capture_output=True)
        minutes = (time.perf_counter() - start) / 60
        tables = (ROOT / args.out / f"bench_{model}.md").read_text().strip()
        sections.append(
            f"`{shlex.join(command)}` ({minutes:.1f} min on this machine)\n\n{tables}\n\n"
            f"![{model} benchmark]({args.out}/bench_{model}.png)\n"
        )
    readme = (ROOT / "README.md").read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the {START} / {END} markers.")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    (ROOT / "README.md").write_text(f"{head}{START}\n{chr(10).join(sections)}{END}{tail}")
    print(f"updated README.md with {', '.join(args.models)}")


if __name__ == "__main__":
    main()
