"""YAML files and command-line flags onto a config dataclass: YAML keys must be fields, flags
override YAML, and every problem is one InputError line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import yaml

from .errors import InputError

T = TypeVar("T")


def load_yaml(path: str | Path, allowed_keys: set[str]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"--config: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"--config: {path} must hold a mapping of settings")
    unknown = sorted(set(data) - allowed_keys)
    if unknown:
        raise InputError(f"--config: {path}: unknown key '{unknown[0]}'")
    return data


def init_keys(cls) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


def build_parser(cls, prog: str | None = None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls)
    if prog:
        parser.prog = prog
    parser.add_argument("--config", default=None, help=f"YAML file of {cls.__name__} fields; flags override it")
    return parser


def parse_config(
    cls: type[T],
    argv: list[str],
    prog: str | None = None,
    adjust_yaml: Callable[[dict], dict] = lambda d: d,
    before_build: Callable[[dict], None] | None = None,
) -> T:
    """``[--config FILE.yaml] [--flag value ...]`` into a validated ``cls``.

    ``before_build(values)`` runs on the merged settings right before ``cls(**values)`` and may
    change them in place. Every problem raises InputError (one line)."""
    parser = build_parser(cls, prog)
    pre, _ = parser.parse_known_args(argv) if "--config" in argv else (None, None)
    if pre is not None and pre.config:
        parser.set_defaults(**adjust_yaml(load_yaml(pre.config, init_keys(cls))))
    try:
        namespace, unknown = parser.parse_known_args(argv)
    except SystemExit as exit_:  # argparse already printed its one line
        raise InputError("invalid command-line flags (see the message above)") from exit_
    if unknown:
        raise InputError(f"unknown flag {unknown[0]}")
    values = {k: v for k, v in vars(namespace).items() if k != "config"}
    if before_build is not None:
        before_build(values)
    try:
        return cls(**values)
    except InputError:
        raise
    except (ValueError, TypeError) as err:  # upstream checks, or a YAML value of the wrong shape
        raise InputError(str(err).strip().splitlines()[0]) from None
