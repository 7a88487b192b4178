"""Atomic file writes: every output appears whole or not at all (temp file + fsync + rename), and reads that name
the file when it cannot be parsed (a truncated or altered file is a user-facing error, never a traceback)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from unlearnbench.errors import UserError


class CorruptFileError(UserError):
    """A file the run wrote earlier is truncated, altered or unreadable: the message names it and the fix."""


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import (os.umask sets as it reads)


def _tmp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_UMASK)  # mkstemp makes 0600; an output is readable like any file the user writes
    return Path(name)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    """Flush a file's data (or, with O_DIRECTORY, a rename in a directory) to stable storage (best effort: some
    filesystems refuse fsync)."""
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort)."""
    _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _replace(tmp: Path, path: Path) -> None:
    """Data on disk first, then the rename: after a crash the file is the old one or the new one, whole."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically (UTF-8)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (NaN becomes null so other tools can read it)."""
    write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _clean(obj.item())
    return obj


def read_json(path: str | Path) -> Any:
    """Read a JSON file; one that does not parse (truncated, altered, not UTF-8) raises a CorruptFileError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({_why(exc)}): it was truncated or altered after it "
                               "was written. Delete it (or the stage's outputs) and rerun the stage that writes it."
                               ) from None


def _why(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    """Write a DataFrame as parquet atomically."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        df.to_parquet(tmp, index=False)
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_parquet(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """Read a parquet file; one that does not parse raises a CorruptFileError naming it."""
    import pyarrow as pa

    path = Path(path)
    try:
        return pd.read_parquet(path, **kwargs)
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptFileError(f"{path} is not a readable parquet file ({type(exc).__name__}: {_why(exc)}): it was "
                               "truncated or altered after it was written. Delete it (or the stage's outputs) and "
                               "rerun the stage that writes it.") from None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory that replaces `path` only if the block finishes (its files flushed to disk first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs should be readable like any other directory
    try:
        yield tmp
        for dirpath, _, files in os.walk(tmp):
            for f in files:
                _fsync(Path(dirpath) / f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
