"""Files written whole or not at all, and the settings file that keeps a folder from being reused by another run.

A folder that a long job fills (a latent cache, generated preference data) records first what it is being filled
with; a later run compares its own settings with that record and refuses the folder when they differ, naming every
differing key.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, value) -> Path:
    """Write ``value`` as indented JSON atomically (temporary file, then rename)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path


def settings_difference(recorded: dict, wanted: dict) -> tuple[str, str] | None:
    """``("key=recorded value, ...", "key=wanted value, ...")`` over the keys whose values differ (a key missing on
    one side differs), in key order; None when the two agree."""
    differ = sorted(key for key in set(recorded) | set(wanted) if recorded.get(key) != wanted.get(key))
    if not differ:
        return None
    return tuple(", ".join(f"{key}={side.get(key)!r}" for key in differ) for side in (recorded, wanted))
