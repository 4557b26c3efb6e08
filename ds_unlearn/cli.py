"""The ``ds-unlearn`` command: one subcommand per job, each in ``ds_unlearn/commands/``."""

from __future__ import annotations

import argparse
import sys

from .errors import InputError

SUBCOMMANDS = {
    "score": "per-sequence memorization of a model on a data file",
}


def _command_module(name: str):
    import importlib

    return importlib.import_module(f"ds_unlearn.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-unlearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        _command_module(name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _command_module(args.command).run(args)
    except InputError as err:
        from . import distributed as D

        if D.rank() == 0:
            print(f"ds-unlearn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
