"""``accelerate launch -m diffalign.train --method dpo ...``: the preference trainer as a launchable module."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``TrainConfig`` options from ``argv`` and train; print where the weights went."""
    from .alignment.config import parse_config
    from .alignment.trainer import train

    config = parse_config(sys.argv[1:] if argv is None else argv, prog="python -m diffalign.train")
    result = train(config)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    print(summary_line(result, config))
    return 0


def summary_line(result, config) -> str:
    """'step N: loss x, <the method's displayed metrics>; wrote <folder>' for the end of a run."""
    from .alignment.methods import get_method

    if not result.history:
        return f"wrote {result.output_dir}"
    last = result.history[-1]
    shown = [key for key in ("loss", *get_method(config.method).display) if key in last]
    metrics = ", ".join(f"{key.replace('_', ' ')} {last[key]:.4f}" for key in shown)
    return f"step {result.global_step}: {metrics}; wrote {result.output_dir}"


if __name__ == "__main__":
    sys.exit(main())
