"""``diffalign`` command line, generated from the command modules in ``diffalign.commands``.

Each subcommand is one module with ``NAME``, ``HELP``, ``DESCRIPTION``, ``CONFIG`` (an options dataclass) and
``run(config) -> int``; adding a command is adding its module and its name to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .options import add_arguments, from_args

COMMANDS = ("sample", "bench", "ems", "calibrate", "train", "eval", "pairs")


def build_parser() -> argparse.ArgumentParser:
    """``diffalign COMMAND --option value ...``: one subparser per command module, its options from ``CONFIG``."""
    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Fast diffusion samplers as diffusers schedulers, and preference-alignment trainers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.DESCRIPTION)
        add_arguments(command, module.CONFIG)
        command.set_defaults(module=module, parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), build the command's config and run it; returns the exit code.

    A config that rejects its values (``ValueError`` from its ``__post_init__``) is reported as a usage error.
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        config = from_args(args.module.CONFIG, args)
    except ValueError as error:
        args.parser.error(str(error))
    return args.module.run(config)


if __name__ == "__main__":
    sys.exit(main())
