"""Output files that are either complete or absent: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import InputError


def check_writable(path: str | Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse to clobber an existing output unless asked; checked before any compute."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{option}: {path} exists (pass --overwrite to replace it)")
    if not path.parent.exists() and path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    _atomic_write(Path(path), "".join(json.dumps(row) + "\n" for row in rows))


def write_json(path: str | Path, obj) -> None:
    _atomic_write(Path(path), json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
