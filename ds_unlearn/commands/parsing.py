"""One parser for every command: a config dataclass (each field with ``metadata={"help": ...}``)
onto ``[--config FILE.yaml] [--flag value ...]``. YAML keys must be fields, flags override YAML,
and every problem is one InputError line naming the flag, or the YAML file and key.

A command declares its config as a dataclass and calls ``parse_config(Config, argv, prog=...)``;
``print_help`` shows its docstring and field help. Field types map to flags as in
``transformers.HfArgumentParser``, with one spelling per flag (``--batch_size``, the field's
name; no ``--batch-size``), plus two rules of ours:

- ``tuple[X, ...]`` takes one or more values, like ``list[X]`` (the config gets a list; its
  ``__post_init__`` may convert it);
- a union with ``str`` (``int | str``) is taken as written: the config's ``__post_init__``
  converts and checks it (``--batch_size auto``, ``--suffix_length rest``).

``metadata={"choices": [...]}`` limits a field's values on the command line and in the YAML file.
"""

from __future__ import annotations

import argparse
import copy
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..core.errors import InputError
from ..core.seeds import seed_problem

T = TypeVar("T")

LAUNCHER_FLAG = "--local_rank"  # the deepspeed launcher adds --local_rank=N; LOCAL_RANK says the same


def option(default: Any = MISSING, help: str = "", **metadata) -> Any:
    """A config field with its help (and argparse extras such as ``choices``); a list default is
    copied per instance. No default: the flag is required."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


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


class _ParserError(Exception):
    """argparse's complaint, raised instead of printing the usage and exiting."""


def _grouped_parser(cls, **kwargs):
    """An ``HfArgumentParser`` for ``cls`` whose fields with a ``group`` in their metadata (the
    docs' grouping: ``UnlearnConfig`` has them) are listed under that group in ``--help``; the
    key is not passed on to argparse, which would refuse it."""
    from transformers import HfArgumentParser

    titles = getattr(cls, "GROUP_TITLES", {})

    class GroupedParser(HfArgumentParser):
        def _parse_dataclass_field(self, parser, field):  # HfArgumentParser calls it on self
            group = field.metadata.get("group")
            if group is None:
                return HfArgumentParser._parse_dataclass_field(parser, field)
            plain = copy.copy(field)
            plain.metadata = types.MappingProxyType({k: v for k, v in field.metadata.items() if k != "group"})
            if group not in self._field_groups:
                self._field_groups[group] = self.add_argument_group(titles.get(group, group))
            return HfArgumentParser._parse_dataclass_field(self._field_groups[group], plain)

    GroupedParser._field_groups = {}  # a fresh class per parser: its groups are its own
    return GroupedParser(cls, **kwargs)


def build_parser(cls, prog: str | None = None, description: str | None = None):
    """An ``HfArgumentParser`` for ``cls`` plus ``--config``; its errors raise (no usage dump)."""
    parser = _grouped_parser(cls, description=description, formatter_class=_Help)
    if prog:
        parser.prog = prog
    parser.add_argument("--config", default=None, help=f"YAML file of {cls.__name__} fields; flags override it")
    # One spelling per flag, the field's name: HfArgumentParser also adds --a-b for a_b.
    for action in parser._actions:
        for alias in [o for o in action.option_strings if "-" in o[2:]]:
            action.option_strings.remove(alias)
            del parser._option_string_actions[alias]
    actions = {action.dest: action for action in parser._actions}
    for name, hint in _field_types(cls).items():
        action = actions.get(name)
        if action is None:
            continue
        if action.help:  # field help is plain text; argparse formats help with %
            action.help = action.help.replace("%", "%%")
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # HfArgumentParser handles lists only
            action.type, action.nargs = args[0], "+"
        if origin in (typing.Union, types.UnionType) and str in args:  # converted by the config
            action.type = str

    # --help lists the command's own fields first, then the groups it inherits.
    own = list(vars(cls).get("__annotations__", {}))
    rank = {name: i for i, name in enumerate(["help", *own])}
    for listed in (parser._actions, parser._optionals._group_actions):  # usage, then the options
        listed.sort(key=lambda a: rank.get(a.dest, len(rank)))

    def error(message: str):
        raise _ParserError(message)

    parser.error = error
    return parser


class _Help(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default (when it has one) after its help."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.required or not action.help:
            return action.help
        default = " ".join(map(str, action.default)) if isinstance(action.default, list | tuple) else action.default
        return f"{action.help} (default: {str(default).replace('%', '%%')})"


def print_help(cls, prog: str, doc: str | None) -> None:
    """A command's ``--help``: its docstring, then every field's flag, help and default."""
    build_parser(cls, prog=prog, description=(doc or "").replace("``", "")).print_help()


def one_line_errors(parser):
    """Make an argparse parser raise InputError (one line, exit 2 from the CLI) instead of
    printing its usage and exiting; returns the parser."""

    def error(message: str):
        raise InputError(message)

    parser.error = error
    return parser


def _flag_of(message: str) -> str | None:
    match = re.match(r"argument (--[\w.-]+)", message)
    return match.group(1) if match else None


def without_launcher_flag(cls, argv: list[str]) -> list[str]:
    """``argv`` without the launcher's ``--local_rank=N`` (or ``--local_rank N``) when ``cls`` has
    no such field."""
    if "local_rank" in init_keys(cls):
        return list(argv)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == LAUNCHER_FLAG:
            skip = True  # its value is the next word
        elif not a.startswith(LAUNCHER_FLAG + "="):
            out.append(a)
    return out


def parse_config(
    cls: type[T],
    argv: list[str],
    prog: str | None = None,
    adjust_yaml: Callable[[dict], dict] = lambda d: d,
    before_build: Callable[[dict], None] | None = None,
) -> T:
    """``[--config FILE.yaml] [--flag value ...]`` into a validated ``cls``.

    ``before_build(values)`` runs on the merged settings right before ``cls(**values)`` and may
    change them in place. Every problem raises InputError (one line) naming the flag, or the
    YAML file and key when the bad value came from the file."""
    argv = without_launcher_flag(cls, argv)
    parser = build_parser(cls, prog)
    yaml_path, from_yaml = None, {}
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        try:
            pre, _ = parser.parse_known_args(argv)
        except _ParserError as err:
            raise InputError(str(err)) from None
        if pre.config:
            yaml_path = pre.config
            from_yaml = adjust_yaml(load_yaml(pre.config, init_keys(cls)))
            parser.set_defaults(**from_yaml)
    try:
        namespace, unknown = parser.parse_known_args(argv)
    except _ParserError as err:
        message = str(err)
        flag = _flag_of(message)
        given = flag is not None and any(a == flag or a.startswith(flag + "=") for a in argv)
        key = flag[2:] if flag else None
        if yaml_path and key in from_yaml and not given:  # argparse converted the YAML value
            message = message.split(": ", 1)[-1]
            raise InputError(f"--config: {yaml_path}: key '{key}': {message}") from None
        raise InputError(message) from None
    if unknown:
        raise InputError(f"unknown flag {unknown[0]}")
    values = {k: v for k, v in vars(namespace).items() if k != "config"}
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    for key, value in from_yaml.items():
        if values.get(key) is value and not isinstance(value, str):  # argparse converted the strings
            expected = _mismatch(value, _field_types(cls).get(key))
            if expected:
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise InputError(f"--config: {yaml_path}: key '{key}': expected {expected}, got {shown}")
        if values.get(key) is value and key in choices:  # argparse checks choices of flags only
            bad = next((v for v in (value if isinstance(value, list) else [value]) if v not in choices[key]), None)
            if bad is not None:
                allowed = ", ".join(map(str, choices[key]))
                raise InputError(f"--config: {yaml_path}: key '{key}': invalid choice {bad!r} (choose from {allowed})")
    if before_build is not None:
        before_build(values)
    try:
        return cls(**values)
    except InputError:
        raise
    except (ValueError, TypeError) as err:  # upstream checks, or a YAML value of the wrong shape
        raise InputError(str(err).strip().splitlines()[0]) from None


def _field_types(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot evaluate: leave the values to the dataclass
        return {}


def _mismatch(value, hint) -> str | None:
    """What ``hint`` expects when the YAML value ``value`` does not fit it, else None. Checks the
    plain types config fields use (bool, int, float, str, lists of them, optionals and unions);
    any other annotation passes, for the config's own checks."""
    if hint is None or hint is typing.Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if any(_mismatch(value, a) is None for a in options):
            return None
        return " or ".join(_mismatch(None, a) or _name(a) for a in options)
    if origin in (list, tuple):
        inner = args[0] if args else None
        if not isinstance(value, list):
            return f"a list of {_name(inner)}" if inner else "a list"
        bad = next((v for v in value if _mismatch(v, inner)), None) if inner else None
        return f"a list of {_name(inner)}" if bad is not None else None
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def _name(hint) -> str:
    return {bool: "true or false", int: "integers", float: "numbers", str: "strings"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )
