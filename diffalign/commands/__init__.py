"""One thin module per ``diffalign`` subcommand (``NAME``, ``HELP``, ``DESCRIPTION``, ``CONFIG``, ``run``);
``diffalign.cli`` builds the parser from them."""

from __future__ import annotations

import dataclasses
import shlex

__all__ = ["command_line"]


def command_line(name: str, config, always: tuple[str, ...] = ("model",)) -> str:
    """The ``diffalign name ...`` command that gives ``config``: ``--field value`` for each field not at its default
    (and for the ``always`` fields), in declaration order, so that a run's recorded command reproduces it."""
    words = ["diffalign", name]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if (value == default and f.name not in always) or value is None:
            continue
        if isinstance(value, bool):
            words += [f"--{f.name}"] if value else [f"--{f.name}", "false"]
        else:
            words += [f"--{f.name}", *map(str, value if isinstance(value, list | tuple) else [value])]
    return shlex.join(words)
