"""What a stage wrote, checked: sizes and sha256 checksums of output files (the manifests a stage record keeps
under `files`), and the checksums that make a checkpoint directory complete (`complete.json`).

A file is checked at most once per process (size first, then checksum; the result is kept while the file's size,
modification time and inode stay the same), so a run pays for hashing its inputs once per invocation: on the
default run's tens of MB that is well under a second.

Checks answer with a `Damage` (which file, what is wrong) rather than raising: the stage records (`records.py`)
decide what to invalidate, what to remove and what to tell the user. This module imports nothing of the package
but `io`: everything else that checks files stands on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from unlearnbench.io import CorruptFileError, read_json, write_json

CHUNK = 1 << 20

# Verified files of this process: absolute path -> (size, mtime_ns, inode, sha256). A file whose stat changed is
# checked again.
_VERIFIED: dict[str, tuple[int, int, int, str]] = {}


@dataclass(frozen=True)
class Damage:
    """A recorded file that does not match its record: `rel` (relative to the run directory) and why."""

    rel: str
    problem: str

    def __str__(self) -> str:
        return f"{self.rel} {self.problem}"


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _skipped(name: str) -> bool:
    """Leftovers of interrupted atomic writes (`.<name>.<random>[.tmp]`) and hidden files are not outputs."""
    return name.startswith(".")


def iter_files(root: Path) -> Iterable[Path]:
    """Every regular file under `root` (itself if it is a file), hidden entries left out, sorted."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        for f in sorted(filenames):
            if not _skipped(f):
                yield Path(dirpath) / f


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def file_entry(path: Path) -> dict:
    """{"size", "sha256"} of one file; remembered as verified (it was just written, or just read back)."""
    st = os.stat(path)
    digest = sha256_file(path)
    _VERIFIED[os.path.realpath(path)] = (*_stat_key(st), digest)
    return {"size": st.st_size, "sha256": digest}


def manifest(base: Path, roots: Iterable[str | Path]) -> dict[str, dict]:
    """{path relative to `base` (posix): {"size", "sha256"}} of every file under each of `roots` (relative to
    `base`; missing ones are skipped)."""
    base = Path(base)
    out: dict[str, dict] = {}
    for r in roots:
        for f in iter_files(base / r):
            out[f.relative_to(base).as_posix()] = file_entry(f)
    return out


def digest_of(files: dict[str, dict]) -> str:
    """One hash for a whole manifest: what a downstream stage records as the inputs it was computed from."""
    blob = json.dumps({k: v["sha256"] for k, v in sorted(files.items())}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_file(path: Path, size: int, sha256: str, rel: str | None = None, full: bool = True) -> Damage | None:
    """None when `path` has the recorded size and checksum (checksum skipped when `full` is False), else the
    damage. Done once per process per unchanged file."""
    rel = rel or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Damage(rel, "is missing")
    except OSError as exc:
        return Damage(rel, f"cannot be read ({exc.strerror or exc})")
    if not os.path.isfile(path):
        return Damage(rel, "is not a regular file")
    if st.st_size != size:
        return Damage(rel, f"has {st.st_size} bytes, the record says {size} (truncated or overwritten)")
    if not full:
        return None
    key = os.path.realpath(path)
    hit = _VERIFIED.get(key)
    if hit is not None and hit[:3] == _stat_key(st) and hit[3] == sha256:
        return None
    try:
        got = sha256_file(path)
    except OSError as exc:
        return Damage(rel, f"cannot be read ({exc.strerror or exc})")
    if got != sha256:
        return Damage(rel, "has the recorded size but not the recorded sha256 checksum (its bytes were altered)")
    _VERIFIED[key] = (*_stat_key(st), got)
    return None


def find_damage(base: Path, files: dict[str, dict], under: str | None = None, full: bool = True) -> list[Damage]:
    """Every damaged file of a manifest (optionally only those under the relative path `under`)."""
    base = Path(base)
    prefix = None if under is None else Path(under).as_posix().rstrip("/")
    out = []
    for rel, entry in sorted(files.items()):
        if prefix is not None and prefix != "." and rel != prefix and not rel.startswith(prefix + "/"):
            continue
        try:
            size, digest = int(entry["size"]), entry.get("sha256")
        except (AttributeError, KeyError, TypeError, ValueError):
            out.append(Damage(rel, "has no usable size and checksum in its record"))
            continue
        damage = check_file(base / rel, size, str(digest), rel, full and digest is not None)
        if damage is not None:
            out.append(damage)
    return out


def check_manifest(base: Path, files: dict[str, dict], under: str | None = None, full: bool = True) -> Damage | None:
    """The first damaged file of a manifest (optionally only those under the relative path `under`), or None."""
    found = find_damage(base, files, under, full)
    return found[0] if found else None


def trust(base: Path, files: dict[str, dict]) -> None:
    """Remember a manifest's files as verified without hashing them here: on processes other than the main one,
    once the main process verified them (the files' stat must still match the record's size)."""
    base = Path(base)
    for rel, entry in files.items():
        p = base / rel
        try:
            st = os.stat(p)
        except OSError:
            continue
        if st.st_size == int(entry["size"]):
            _VERIFIED[os.path.realpath(p)] = (*_stat_key(st), str(entry["sha256"]))


def forget_verified() -> None:
    """Drop this process's cache of verified files (tests)."""
    _VERIFIED.clear()


# ----------------------------------------------------------------------------------------------- checkpoints

COMPLETE = "complete.json"


HASH_CHECKPOINTS_UP_TO = 8 << 30  # larger checkpoints record sizes only: hashing them at every save costs minutes


def mark_complete(ckpt: Path, step: int, hash_up_to: int = HASH_CHECKPOINTS_UP_TO, **extra: Any) -> None:
    """Write `<ckpt>/complete.json` (last, atomically) with the step and the size and sha256 of every file of the
    checkpoint (sizes only when the checkpoint holds more than `hash_up_to` bytes): a later resume trusts the
    checkpoint only if every file still matches. Call it once every rank's files are written."""
    ckpt = Path(ckpt)
    paths = [f for f in iter_files(ckpt) if f.relative_to(ckpt).as_posix() != COMPLETE]
    if sum(f.stat().st_size for f in paths) <= hash_up_to:
        files = {f.relative_to(ckpt).as_posix(): file_entry(f) for f in paths}
    else:
        files = {f.relative_to(ckpt).as_posix(): {"size": f.stat().st_size, "sha256": None} for f in paths}
    write_json(ckpt / COMPLETE, {"step": int(step), "files": files, **extra})


def check_checkpoint(ckpt: Path) -> tuple[int | None, str | None]:
    """(step, None) for a complete, undamaged checkpoint directory; (None, why) otherwise. A `complete.json`
    without a file list (written before checksums were recorded) is trusted as before."""
    ckpt = Path(ckpt)
    try:
        rec = read_json(ckpt / COMPLETE)
        step = int(rec["step"])
    except FileNotFoundError:
        return None, "it has no complete.json (interrupted while being written)"
    except (CorruptFileError, KeyError, TypeError, ValueError) as exc:
        return None, f"its complete.json is unreadable ({str(exc).split('. ')[0]})"
    files = rec.get("files")
    if isinstance(files, dict):
        damage = check_manifest(ckpt, files)
        if damage is not None:
            return None, f"{damage}"
    return step, None


def latest_checkpoint(ckpt_root: Path, label: str, say=print) -> tuple[Path, int] | None:
    """The newest `step_*` checkpoint under `ckpt_root` that is complete and undamaged, with its step; damaged or
    incomplete ones are reported (through `say`, as `[<label>] not resuming from ...`) and skipped, never resumed
    from."""
    for p in sorted(Path(ckpt_root).glob("step_*"), reverse=True):
        if not p.is_dir():
            continue
        step, why = check_checkpoint(p)
        if step is not None:
            return p, step
        if (p / COMPLETE).exists():
            say(f"[{label}] not resuming from {p}: {why}. It is ignored.")
    return None
