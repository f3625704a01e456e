"""Options of every ``diffalign`` command as dataclasses whose fields carry their help text (TRL / HfArgumentParser
style); the command line is generated from them, so the Python API and the CLI share one source of defaults.

A field is declared with :func:`option`::

    @dataclass
    class BenchConfig:
        num_samples: int = option(400, "samples per seed", group="sampling")
        nfe: list[int] = option((5, 10), "NFE grid")          # a list: ``--nfe 5 10``
        fid: Literal["default", "inception"] = option("default", "Fréchet features")   # choices from the Literal

One flag style: ``--num_samples`` (underscores, as diffusers' and TRL's training scripts). The dashed spelling
``--num-samples`` is accepted as an alias everywhere, so scripts written for either keep working. Booleans take
``--flag`` (true), ``--flag true`` or ``--flag false``. ``Literal[...]`` types become argparse choices and are
checked again by :func:`validate_choices` (call it from ``__post_init__``), so a bad value fails the same way from
Python and from the shell.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

__all__ = ["option", "add_arguments", "from_args", "parse_args", "validate_choices", "parse_bool"]


def option(default: Any, help: str, group: str | None = None, aliases: Sequence[str] = ()) -> Any:
    """A dataclass field with help text, an optional ``--help`` group and extra flag spellings (``aliases``).

    A list or tuple default becomes a list default (through ``default_factory``), parsed with ``nargs="+"``.
    """
    metadata = {"help": help, "group": group, "aliases": tuple(aliases)}
    if isinstance(default, list | tuple):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_bool(text: str) -> bool:
    """'true' / 'false' (and 1/0, yes/no, on/off) -> bool; an argparse error otherwise."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _strip_optional(kind: Any) -> Any:
    args = [t for t in get_args(kind) if t is not type(None)]
    if get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return kind


def _field_kind(kind: Any) -> tuple[Any, tuple | None, bool]:
    """(element type, choices or None, is_list) of a field annotation."""
    kind = _strip_optional(kind)
    is_list = get_origin(kind) in (list, tuple, Sequence)
    if is_list:
        kind = _strip_optional(get_args(kind)[0])
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        return type(choices[0]), choices, is_list
    return kind, None, is_list


def _choices(config_cls: type) -> dict[str, tuple]:
    hints = typing.get_type_hints(config_cls)
    return {
        f.name: choices
        for f in dataclasses.fields(config_cls)
        if (choices := _field_kind(hints[f.name])[1]) is not None
    }


def validate_choices(config: Any) -> None:
    """Raise a ValueError naming the field and the allowed values when a ``Literal`` field holds another value."""
    for name, choices in _choices(type(config)).items():
        value = getattr(config, name)
        values = value if isinstance(value, list | tuple) else [value]
        if value is None and None in get_args(typing.get_type_hints(type(config))[name]):
            continue
        bad = [v for v in values if v not in choices]
        if bad:
            raise ValueError(f"{name}={value!r} is not allowed; choose from {list(choices)}.")


def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one ``--field`` option (plus its dashed alias and declared aliases) per field of ``config_cls``."""
    hints = typing.get_type_hints(config_cls)
    groups: dict[str | None, Any] = {None: parser}
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        group = f.metadata.get("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        base, choices, is_list = _field_kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = dict(
            default=default, dest=f.name, help=f"{f.metadata['help']} (default: %(default)s)"
        )
        if base is bool and not is_list:
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=base, choices=choices)
            if is_list:
                kwargs["nargs"] = "+"
        flags = [f"--{f.name}"]
        if "_" in f.name:
            flags.append(f"--{f.name.replace('_', '-')}")
        flags += [alias for alias in f.metadata.get("aliases", ()) if alias not in flags]
        groups[group].add_argument(*flags, **kwargs)


def from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """The ``config_cls`` instance of parsed arguments (its ``__post_init__`` validates it)."""
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if f.init})


def parse_args(config_cls: type, argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Parse ``argv`` into a ``config_cls`` instance with a parser generated from its fields."""
    parser = argparse.ArgumentParser(prog=prog, description=config_cls.__doc__)
    add_arguments(parser, config_cls)
    return from_args(config_cls, parser.parse_args(argv))
