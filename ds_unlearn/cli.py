"""The ``ds-unlearn`` command: one subcommand per job, each a module in ``ds_unlearn/commands/``
with ``main(argv) -> exit code``.

    ds-unlearn score    per-sequence memorization of a model on a data file
    ds-unlearn unlearn  remove a forget set with GA, SGA, TA or TAU (one process; see launch/)
    ds-unlearn audit    prove per sequence that a forget set is gone: greedy, membership, sampling
    ds-unlearn memorize the memorisation lab (random strings, phases, local prefix, ...)
    ds-unlearn demo     plant, score, unlearn and report on the real SmolLM2-135M
"""

from __future__ import annotations

import importlib
import sys

from .core.errors import InputError

SUBCOMMANDS = {
    "score": "per-sequence memorization of a model on a data file",
    "unlearn": "remove a forget set with GA, SGA, TA or TAU",
    "audit": "prove per sequence that a forget set is gone: greedy, membership inference, sampling",
    "memorize": "the memorisation lab: make a model memorise random strings and record how",
    "demo": "the whole story on SmolLM2-135M: plant, score, unlearn (GA, SGA, TAU), report",
}


def usage() -> str:
    lines = ["usage: ds-unlearn {" + ",".join(SUBCOMMANDS) + "} [options]", ""]
    lines += [f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "ds-unlearn COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ds-unlearn: error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(f"ds_unlearn.commands.{name}").main(rest)
    except InputError as err:
        from .core import distributed as D

        if D.rank() == 0:
            print(f"ds-unlearn {name}: error: {err}", file=sys.stderr)
        D.finalize()
        return 2


if __name__ == "__main__":
    sys.exit(main())
