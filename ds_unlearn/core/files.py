"""Output files that are either complete or absent, and the one guard every command runs on its
output paths before any compute."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, param


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
    """Refuse an output path that would destroy or mix with something; raises InputError naming
    the path as ``option`` (a parameter, ``errors.param(name)``, or plain words).

    - Never equal to, inside, or (for a directory) holding an input (data file or checkpoint),
      with or without ``overwrite``.
    - A file output: an existing file needs ``overwrite``; a directory in its place is an error.
    - A directory output: a file in its place is an error; an earlier run's outputs (entries
      matching any of the ``owned`` names or glob patterns, or any entry at all when ``owned`` is
      None) need ``overwrite``.
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
                    f"{option}: {path} holds an earlier run ({clash[0]}); pass {param('overwrite')} to replace it"
                )
    else:
        if path.is_dir():
            raise InputError(f"{option}: {path} is a directory, not a file")
        if path.exists() and not overwrite:
            raise InputError(f"{option}: {path} exists (pass {param('overwrite')} to replace it)")
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
    try:
        tmp.write_text(text)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from err
    os.replace(tmp, path)


def is_write_error(err: BaseException) -> bool:
    """An I/O failure while writing: an OSError, or safetensors' own error wrapping one."""
    return isinstance(err, OSError) or (type(err).__name__ == "SafetensorError" and "os error" in str(err))


def write_error(path: str | Path, err: BaseException) -> OSError:
    """``err`` (see ``is_write_error``) restated as one OSError line naming what could not be
    written, and that nothing of it was kept (a full disk: ENOSPC, EDQUOT)."""
    code = getattr(err, "errno", None)
    if code is None and "os error 28" in str(err):
        code = errno.ENOSPC
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device"
    else:
        why = getattr(err, "strerror", None) or str(err)
    return OSError(code, f"cannot write {path}: {why}; nothing of it was kept (earlier outputs are untouched)")


def partial_name(path: str | Path) -> Path:
    """The temporary sibling a directory output is written under before its rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Write a directory output complete or not at all: yields an empty temporary sibling
    (``partial_name``) to write into; on success it replaces ``path`` by a rename (an earlier
    ``path`` is removed only then); on any error it is removed, ``path`` is left as it was, and
    an OSError is restated by ``write_error`` (so a full disk leaves nothing that loads as if
    whole). The name is fixed, not per process, so every rank of a collective save writes the
    same folder; rank 0 alone should then call this (or use ``publish_directory``)."""
    path = Path(path)
    tmp = partial_name(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed run's leftover
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(err):
            raise write_error(path, err) from err
        raise
    publish_directory(tmp, path)


def publish_directory(tmp: str | Path, path: str | Path) -> None:
    """Replace ``path`` with the finished folder ``tmp`` (rename; an earlier ``path`` goes after)."""
    tmp, path = Path(tmp), Path(path)
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


LOCK_NAME = ".ds_unlearn.lock"


class OutputLock:
    """An exclusive lock on an output folder for a run's life (``flock`` on ``DIR/.ds_unlearn.lock``,
    released by the OS if the process dies, so a file left by a killed run is not held), so a second
    run into the same folder is refused instead of interleaving its files. ``held`` probes without
    creating anything; ``acquire`` creates the folder and takes it. Either leaves ``holder`` (the
    process the holding run wrote) when another process holds it."""

    ATTEMPTS = 5  # acquire retries this often, 50 ms apart: another run's ``held`` probe is momentary

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self.handle = None
        self.holder = ""
        self.unsupported = ""  # why the file system cannot lock (the run goes on unlocked)
        self.created: list[Path] = []  # folders acquire made, removed by release if still empty

    def held(self) -> bool:
        """True when another process holds the lock now. Creates and writes nothing (every rank may
        call it before any check has passed); False where the file system has no ``flock``."""
        try:
            handle = open(self.path)
        except OSError:  # no lock file (or none this process can read): nobody holds it
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in _HELD:
                    return False
                self.holder = handle.read().strip()
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def acquire(self) -> bool:
        """Take the lock (creating the folder); False when another process holds it. On a file
        system without ``flock`` it returns True unlocked, with the reason in ``unsupported``."""
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = missing
        for attempt in range(self.ATTEMPTS):
            if attempt:
                time.sleep(0.05)
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                handle.seek(0)
                self.holder = handle.read().strip()
                handle.close()
                if err.errno not in _HELD:
                    self.unsupported = err.strerror or str(err)
                    return True
                continue
            if not _same_file(handle, self.path):  # its releasing holder unlinked it after our open
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} on {socket.gethostname()}")
            handle.flush()
            self.handle, self.holder = handle, ""
            return True
        return False

    def release(self) -> None:
        """Drop the lock and its file, and the folders ``acquire`` created if nothing else went in
        (a run refused after locking leaves nothing behind)."""
        if self.handle is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting run re-checks the path
            self.handle.close()
            self.handle = None
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # holds the run's outputs (or is not ours to remove)
                break
        self.created = []


_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's "someone else holds it"


def _same_file(handle, path: Path) -> bool:
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, written atomically (complete or absent)."""
    _atomic_write(Path(path), "".join(json.dumps(row) + "\n" for row in rows))


def write_json(path: str | Path, obj) -> None:
    """Indented JSON, written atomically (complete or absent)."""
    _atomic_write(Path(path), json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Every non-empty line of a JSONL file as a dict."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
