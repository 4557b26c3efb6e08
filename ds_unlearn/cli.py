"""The ``ds-unlearn`` command and the process entry of every job: one subcommand per job, each a
module in ``ds_unlearn/commands/`` with ``main(argv) -> exit code``.

    ds-unlearn score    per-sequence memorization of a model on a data file
    ds-unlearn unlearn  remove a forget set (GA, SGA, TA, TAU, GradDiff, NPO, GA+KL; launch/ for ranks)
    ds-unlearn audit    prove per sequence that a forget set is gone: greedy, membership, sampling
    ds-unlearn memorize the memorisation lab (random strings, phases, local prefix, ...)
    ds-unlearn demo     plant, score, unlearn with every method and report on the real SmolLM2-135M

Every command also takes ``--dist_timeout_s S`` (default 300): under a launcher, the longest any
collective may wait before the job ends with an error.

What a failure looks like (the same for every command, on one process or many ranks):
bad input -> one line naming the flag / row / file, exit code 2, nothing written; any other
error -> the failing rank prints its traceback (each line prefixed with its rank) and exits
non-zero at once, without entering another collective, so the launcher stops the other ranks.
The barrier and ``destroy_process_group`` that end a run belong to the success path only.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from .commands import process
from .core import distributed as D
from .core.errors import InputError, flag

SUBCOMMANDS = {
    "score": "per-sequence memorization of a model on a data file",
    "unlearn": "remove a forget set: GA, SGA, TA, TAU, GradDiff, NPO or GA+KL (--method)",
    "audit": "prove per sequence that a forget set is gone: greedy, membership inference, sampling",
    "memorize": "the memorisation lab: make a model memorise random strings and record how",
    "demo": "the whole story on SmolLM2-135M-Instruct: plant, score, unlearn with every method, audit, report",
}
TIMEOUT_FLAG = "--dist_timeout_s"


def usage() -> str:
    lines = ["usage: ds-unlearn {" + ",".join(SUBCOMMANDS) + "} [options]", ""]
    lines += [f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items()]
    lines += [
        "",
        "ds-unlearn COMMAND --help shows a command's options.",
        f"Every command takes {TIMEOUT_FLAG} S (default {process.DEFAULT_TIMEOUT_S}): "
        "the longest a collective may wait.",
    ]
    return "\n".join(lines)


def pop_timeout(argv: list[str]) -> tuple[list[str], float]:
    """``argv`` without ``--dist_timeout_s S`` (or ``=S``), and S (seconds, > 0)."""
    rest, timeout, i = [], float(process.DEFAULT_TIMEOUT_S), 0
    while i < len(argv):
        arg = argv[i]
        if arg == TIMEOUT_FLAG or arg.startswith(TIMEOUT_FLAG + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            try:
                timeout = float(value)
            except ValueError:
                raise InputError(f"{TIMEOUT_FLAG}: expected seconds, got {value!r}") from None
            if not timeout > 0:
                raise InputError(f"{TIMEOUT_FLAG}: must be positive, got {value}")
            continue
        rest.append(arg)
        i += 1
    return rest, timeout


def run_command(name: str, argv: list[str]) -> int:
    """``ds_unlearn.commands.<name>.main(argv)``; after a command's own --help, the flag every
    command shares (argparse's help exits, so that exit is caught here)."""
    command = importlib.import_module(f"ds_unlearn.commands.{name}")
    if not any(a in ("-h", "--help") for a in argv):
        return command.main(argv)
    try:
        code = command.main(argv)
    except SystemExit as done:
        code = done.code or 0
    print(
        f"\nEvery command also takes {TIMEOUT_FLAG} S (default {process.DEFAULT_TIMEOUT_S}): under a launcher, "
        "the longest any collective may wait before the job ends with an error."
    )
    return code


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
        rest, timeout = pop_timeout(rest)
        process.init_distributed(timeout)
        process.start_launcher_watchdog()
        code = run_command(name, rest)
    except InputError as err:
        # The library names parameters; on the command line each one is its flag.
        process.report_error(f"ds-unlearn {name}: error: {err.render(flag)}")
        process.abandon()
        process.release_shared_memory()
        if D.launched_by_launcher():
            # A ZeRO-3 rank's C++ teardown aborts (code 250) unless the job ends with a final
            # barrier, which bad input must not wait on: leave now, with the bad-input code.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except BaseException as err:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            # A full disk while saving: the write was undone (core.files.write_error says what);
            # one line and exit 1, no traceback, on one process and on every rank alike.
            process.report_error(f"ds-unlearn {name}: error: {err.strerror or err}")
            sys.stdout.flush()
            sys.stderr.flush()
            process.release_shared_memory()
            if D.launched_by_launcher():
                os._exit(1)
            return 1
        if isinstance(err, KeyboardInterrupt) and not D.launched_by_launcher():
            # Ctrl-C on one process: one line and the shell's code for SIGINT, not a traceback.
            # What a command writes at its end was not written; unlearn's checkpoints stay resumable.
            print(f"ds-unlearn {name}: interrupted", file=sys.stderr)
            process.release_shared_memory()
            return 130
        if not D.launched_by_launcher() or isinstance(err, SystemExit) and not err.code:
            raise
        # One rank failed: say so loudly and leave now. Any further collective (a barrier, the
        # final gather) would wait for ranks that are themselves waiting for us.
        process.report_traceback()
        sys.stdout.flush()
        process.release_shared_memory()
        os._exit(1)
    process.finalize()
    return code


if __name__ == "__main__":
    sys.exit(main())
