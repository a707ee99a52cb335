"""Atomic writes: a file or directory appears whole under its final name, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from florist_hf.errors import FloristError


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and one rename (fsynced first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, payload) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one line; a line is written with a single write so a kill cannot leave half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_jsonl_atomic(path: str | os.PathLike, records) -> Path:
    """Replace a JSON-lines file with ``records`` in one rename."""
    return write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def writable_directory(path: str | os.PathLike, *, key: str | None, target: str | os.PathLike | None = None) -> Path:
    """``path`` made with its parents where missing, and checked writable; where it cannot be (a
    parent is a file, a read-only or virtual file system, no permission) one line naming ``target``
    (what is to be written in ``path``; default ``path`` itself) and the setting ``key`` that chose it."""
    path = Path(path)
    named = Path(target) if target is not None else path
    fix = f"set {key} to a folder you can write" if key else "write it to a folder you can write"
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, f"{path} is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        where = f" ({error.filename})" if error.filename and Path(error.filename) != named else ""
        raise FloristError(f"{named}: cannot be made: {error.strerror or error}{where}; {fix}") from None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".florist-hf-write-check.", dir=path))
    except OSError as error:
        raise FloristError(f"{named}: cannot be written: {path} does not take new files ({error.strerror or error}); "
                           f"{fix}") from None
    return path


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False, key: str | None = None) -> Iterator[Path]:
    """Yield a staging directory that replaces ``target`` when the block succeeds.

    On any error the staging directory is removed and ``target`` is untouched. With ``overwrite``,
    an existing ``target`` is swapped out only after the new one is complete. Where ``target``'s
    folder cannot be made or written, one line names it and the setting ``key`` that chose it.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(target)
    writable_directory(target.parent, key=key, target=target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def retire_directory(path: Path, new_path: Path) -> None:
    """Move ``path`` aside to ``new_path`` (replacing what was there), kept for inspection."""
    shutil.rmtree(new_path, ignore_errors=True)
    new_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, new_path)
