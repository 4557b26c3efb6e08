"""Output files that are either complete or absent, and the one guard every command runs on its
output paths before any compute."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import InputError

OVERWRITE_FLAG = "--overwrite"  # the one spelling, on every command


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output(
    path: str | Path,
    *,
    option: str,
    overwrite: bool,
    inputs: Iterable[str | Path | None] = (),
    directory: bool = False,
    owned: Sequence[str] | None = None,
) -> None:
    """Refuse an output path that would destroy or mix with something; raises InputError.

    - Never equal to, inside, or (for a directory) holding an input (data file or checkpoint),
      with or without ``--overwrite``.
    - A file output: an existing file needs ``--overwrite``; a directory in its place is an error.
    - A directory output: a file in its place is an error; an earlier run's outputs (entries
      matching any of the ``owned`` names or glob patterns, or any entry at all when ``owned`` is
      None) need ``--overwrite``.
    Creates nothing: callers create outputs only after every check passed.
    """
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if _inside(resolved, src):
            raise InputError(f"{option}: {path} is or lies inside the input {source}")
        if directory and resolved in src.parents:
            raise InputError(f"{option}: {path} holds the input {source}")
    if directory:
        if path.exists() and not path.is_dir():
            raise InputError(f"{option}: {path} is a file, not a directory")
        if path.is_dir() and not overwrite:
            names = [p.name for p in path.iterdir()]
            # Named in the order of ``owned``: a finished run is named by its first output.
            clash = sorted(names) if owned is None else [n for p in owned for n in sorted(names) if _owned(n, (p,))]
            if clash:
                raise InputError(
                    f"{option}: {path} holds an earlier run ({clash[0]}); pass {OVERWRITE_FLAG} to replace it"
                )
    else:
        if path.is_dir():
            raise InputError(f"{option}: {path} is a directory, not a file")
        if path.exists() and not overwrite:
            raise InputError(f"{option}: {path} exists (pass {OVERWRITE_FLAG} to replace it)")
    _check_creatable(path if directory else path.parent, path, option)


def _check_creatable(target: Path, path: Path, option: str) -> None:
    """Refuse ``path`` now if its folder ``target`` could not be created or written into later (a
    file in the way, no permission, a read-only or virtual file system), rather than after the
    compute. Probes with a uniquely named empty folder in the nearest existing ancestor, removed at
    once: ``target`` itself is never created here (other ranks run the same check)."""
    target = target.absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{option}: cannot create {path}: {existing} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ds_unlearn_probe_", dir=existing))
    except OSError as err:
        raise InputError(f"{option}: cannot create {path} in {existing} ({err.strerror or err})") from None


def _owned(name: str, owned: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in owned)


def clear_outputs(directory: str | Path, owned: Sequence[str]) -> None:
    """Remove the entries of ``directory`` matching ``owned`` (names or glob patterns: an earlier
    run's outputs) and nothing else; creates the directory if needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for target in sorted(directory.iterdir()):
        if not _owned(target.name, owned):
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, written atomically (complete or absent)."""
    _atomic_write(Path(path), "".join(json.dumps(row) + "\n" for row in rows))


def write_json(path: str | Path, obj) -> None:
    """Indented JSON, written atomically (complete or absent)."""
    _atomic_write(Path(path), json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every non-empty line of a JSONL file as a dict."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
