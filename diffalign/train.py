"""``accelerate launch -m diffalign.train --method dpo ...``: the preference trainer as a launchable module."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``TrainConfig`` options from ``argv`` and train; print where the weights went."""
    from .alignment.config import parse_config
    from .commands import train

    return train.run(parse_config(sys.argv[1:] if argv is None else argv, prog="python -m diffalign.train"))


if __name__ == "__main__":
    sys.exit(main())
