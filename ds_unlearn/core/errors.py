"""The one exception family for bad user input: the CLI turns it into one line and exit code 2.

Library code names the parameter a problem is about, never a command-line flag: ``InputError(
"the set is empty", field="forget")`` reads "forget: the set is empty" from Python, and the CLI
renders the same error as "--forget: the set is empty". A parameter named inside a message is
written with ``param`` (``f"{param('holdout')} row 3: same text as {param('forget')} row 1"``)
and rendered the same way, so a command's one-line errors name its flags while a Python caller
reads its own keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

# Wraps a parameter name inside a message; never shown (NUL cannot occur in a path, and repr()
# escapes it in ids and values).
_MARK = "\x00"


def param(name: str) -> str:
    """``name`` as a parameter mentioned in an InputError's message: shown as ``name`` by
    ``str(err)`` and as ``--name`` by the CLI (``InputError.render``)."""
    return f"{_MARK}{name}{_MARK}"


def bare(name: str) -> str:
    """A parameter as Python callers see it: its name."""
    return name


def flag(name: str) -> str:
    """A parameter as the CLI shows it: its flag."""
    return f"--{name}"


class InputError(ValueError):
    """A config, data file, option or path the user must fix; raised before any model compute.

    ``field``: the parameter the problem is about (e.g. ``"holdout"``), or None. Given, the
    message follows it: ``InputError("no such file x", field="forget")`` is "forget: no such file
    x". A message that itself starts with ``param(name)`` (``f"{param('forget')} row 2: ..."``)
    is about that parameter too."""

    def __init__(self, message: str, field: str | None = None):
        if field is not None:
            message = f"{param(field)}: {message}"
        elif message.startswith(_MARK) and message.count(_MARK) >= 2:
            field = message.split(_MARK, 2)[1]
        super().__init__(message)
        self.field = field

    def render(self, name: Callable[[str], str] = bare) -> str:
        """The message with every parameter shown by ``name`` (``bare``, or ``flag`` for the CLI)."""
        parts = str(self.args[0]).split(_MARK) if self.args else [""]
        return "".join(name(part) if i % 2 else part for i, part in enumerate(parts))

    def __str__(self) -> str:
        return self.render(bare)


class NonFiniteLogitsError(InputError):
    """The model produced NaN/inf logits for some rows, so their metrics would be meaningless. Raised
    after the forward that showed it (identically on every rank); the model, not the data, needs fixing."""
