"""Transitional: command-line parsing lives in ``ds_unlearn.commands.parsing``. ``commands/demo.py``
still imports these two argparse helpers from here; this module goes once the demo's command
parses a config dataclass with ``commands.parsing.parse_config`` like the others."""

from __future__ import annotations

import argparse

from .errors import InputError
from .seeds import seed_problem


def seed_arg(value: str) -> int:
    """argparse ``type=`` for ``--seed``: an integer numpy and torch accept."""
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    problem = seed_problem(seed)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return seed


def one_line_errors(parser):
    """Make an argparse parser raise InputError (one line, exit 2 from the CLI) instead of
    printing its usage and exiting; returns the parser."""

    def error(message: str):
        raise InputError(message)

    parser.error = error
    return parser
