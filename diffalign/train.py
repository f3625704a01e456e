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
    if result.history:
        last = result.history[-1]
        print(f"step {result.global_step}: loss {last['loss']:.4f}, implicit accuracy {last['implicit_accuracy']:.3f}")
    print(f"wrote {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
