"""One writer per run directory: `<run.dir>/run.lock`, held by the main process (global rank 0) for a whole
invocation.

The lock file is created atomically (`O_CREAT | O_EXCL`, which NFSv3+ and the usual cluster filesystems honour)
and holds who took it: host, process id, when, the command line, and what is needed to tell a dead holder from a
live one. A second invocation on the same directory is refused (exit 2) with the holder named. A lock is stale,
reported and taken over, when

- its holder ran on this machine (same host name, boot and process namespace) and that process is gone (or its
  id now belongs to a younger process), or this machine rebooted since;
- its holder ran elsewhere and the lock has not been refreshed for `run.lock_stale_hours` hours (environment
  variable `UNLEARNBENCH_LOCK_STALE_HOURS`, default 24): the holder refreshes the file's modification time every
  minute or so while it runs, so a long job on another node is never mistaken for a dead one.

Under a multi-process launch only rank 0 touches the file; the verdict is broadcast, so on a refusal every rank
exits with the same message and none waits at a barrier. A command takes the lock once (`study.invocation`); a
second take in the same process is refused like any other.

This module does locking only: it asks the run directory's layout which directories nest with this one
(`rundir.nested_runs`); removing what a failed invocation left and installing the signal handlers belong to the
command that takes the lock (`study.invocation`).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from unlearnbench.errors import UserError
from unlearnbench.rundir import nested_runs

LOCK_NAME = "run.lock"
STALE_ENV = "UNLEARNBENCH_LOCK_STALE_HOURS"
DEFAULT_STALE_HOURS = 24.0
_UNREADABLE_GRACE_S = 30.0  # an empty or half-written lock file younger than this may be being written right now


class RunDirLocked(UserError):
    """Another invocation holds the run directory."""


def stale_hours(cfg: Any = None) -> float:
    """Hours after which another host's unrefreshed lock counts as stale: `UNLEARNBENCH_LOCK_STALE_HOURS`, else
    the config's `run.lock_stale_hours` (where the config has that key), else 24."""
    raw = os.environ.get(STALE_ENV)
    if raw not in (None, ""):
        try:
            val = float(raw)
        except ValueError:
            raise UserError(f"{STALE_ENV}={raw!r} is not a number of hours. Set it to e.g. 24, or unset it.") from None
        if not val > 0:
            raise UserError(f"{STALE_ENV}={raw!r} must be > 0 hours. Set it to e.g. 24, or unset it.")
        return val
    val = getattr(getattr(cfg, "run", None), "lock_stale_hours", None)
    return float(val) if val is not None and float(val) > 0 else DEFAULT_STALE_HOURS


def _read_small(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(4096).strip()
    except OSError:
        return None


def machine() -> dict:
    """What identifies this process's machine: host name, kernel boot id and process-id namespace (a container
    on the same host has another namespace, where our process ids mean nothing)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot_id": _read_small("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _fmt_time(epoch: float | None) -> str:
    if not epoch:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def _fmt_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Heartbeat:
    """Refreshes the lock file's modification time while the lock is held, and warns once if the file was removed
    or replaced by someone else."""

    def __init__(self, path: Path, token: str, stale_s: float):
        self.path, self.token = path, token
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(max(0.2, min(60.0, stale_s / 6)),),
                                       name="unlearnbench-lock-heartbeat", daemon=True)
        self.lost = False

    def _beat(self, every: float) -> None:
        while not self.stop.wait(every):
            try:
                doc = json.loads(self.path.read_text(encoding="utf-8"))
                if doc.get("token") != self.token:
                    raise ValueError("replaced")
                os.utime(self.path, None)
            except (OSError, ValueError):
                if not self.lost:
                    self.lost = True
                    print(f"unlearnbench: warning: the lock {self.path} was removed or replaced by someone else while "
                          "this run holds it; another invocation may now write to the same run directory.",
                          file=sys.stderr, flush=True)


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run directory."""
    return Path(run_dir) / LOCK_NAME


def read_lock(path: Path) -> dict | None:
    """The holder's record, or None when the file is empty or not (yet) valid JSON."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def stale_reason(doc: dict | None, mtime: float, stale_s: float, now: float | None = None) -> str | None:
    """Why a lock is stale (its holder is certainly or very probably gone), or None when it must be respected."""
    now = time.time() if now is None else now
    if doc is None:
        if now - mtime > _UNREADABLE_GRACE_S:
            return "it is empty or unreadable (its writer died while creating it)"
        return None
    here = machine()
    same_host = doc.get("host") == here["host"]
    if same_host and doc.get("boot_id") and here["boot_id"] and doc["boot_id"] != here["boot_id"]:
        return f"host {here['host']} has rebooted since it was taken"
    if same_host and doc.get("pidns") == here["pidns"] and doc.get("boot_id") == here["boot_id"]:
        pid = doc.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return f"its process {pid} no longer runs on {here['host']}"
        started, recorded = _process_started(pid), doc.get("process_started")
        if started is not None and isinstance(recorded, (int, float)) and abs(started - recorded) > 2.0:
            return f"its process id {pid} now belongs to another process (the holder ended)"
        return None
    if now - mtime > stale_s:
        return (f"it was last refreshed {_fmt_age(now - mtime)} ago on host {doc.get('host')}, longer than the "
                f"{stale_s / 3600:g} h after which a lock from another host counts as stale")
    return None


def holder_message(run_dir: Path, path: Path, doc: dict | None, mtime: float, stale_s: float) -> str:
    """The one-paragraph refusal: who holds the run directory, since when, and what to do."""
    now = time.time()
    if doc is None:
        who = f"an invocation that is creating the lock file right now ({path} is still empty)"
    else:
        who = (f"process {doc.get('pid')} on host {doc.get('host')}"
               + (f" (user {doc['user']})" if doc.get("user") else "")
               + f", running since {doc.get('started') or _fmt_time(doc.get('started_epoch'))}"
               + f" and alive {_fmt_age(now - mtime)} ago"
               + (f", command `{doc['command']}`" if doc.get("command") else ""))
    return (f"The run directory {run_dir} is in use by another unlearnbench invocation: {who}. Two invocations "
            "writing one run directory would overwrite each other's outputs. Wait for it to finish, or give this "
            f"one another run.dir; if that process is gone (killed, its node lost), delete {path} and rerun. A lock "
            f"left on this host by a process that no longer runs is taken over automatically, one from another host "
            f"once it has not been refreshed for {stale_s / 3600:g} h ({STALE_ENV} or run.lock_stale_hours).")


def _record(command: str | None, token: str) -> dict:
    here = machine()
    try:
        import getpass

        user = getpass.getuser()
    except Exception:
        user = None
    now = time.time()
    return {"host": here["host"], "pid": os.getpid(), "user": user,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)), "started_epoch": now,
            "command": command if command is not None else shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
            "process_started": _process_started(os.getpid()), "boot_id": here["boot_id"], "pidns": here["pidns"],
            "token": token}


def _create(path: Path, doc: dict) -> bool:
    """Create the lock file atomically with `doc` in it; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(doc, indent=2) + "\n").encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)  # an empty lock would block the next invocation for no reason
        raise
    os.close(fd)
    return True


def _take_over(path: Path, seen: bytes) -> bool:
    """Move a stale lock aside, but only the exact file judged stale (another invocation may have replaced it)."""
    aside = path.with_name(f".{path.name}.stale.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: just try to create ours
    try:
        if aside.read_bytes() != seen:  # we moved a fresh lock of someone else: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            return False
    except OSError:
        pass
    finally:
        aside.unlink(missing_ok=True)
    return True


def _nested_holder(run_dir: Path, stale_s: float) -> tuple[Path, dict | None, float] | None:
    """A live lock on a run directory nested with this one (`rundir.nested_runs`: a multi-seed parent, the parent
    of a findings-map setting, or those sub-runs of this directory): its holder writes here too."""
    for path in (d / LOCK_NAME for d in nested_runs(run_dir)):
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        doc = read_lock(path)
        if stale_reason(doc, mtime, stale_s) is None:
            return path, doc, mtime
    return None


def acquire(run_dir: Path, command: str | None = None, stale_s: float = DEFAULT_STALE_HOURS * 3600,
            say: Callable[[str], None] = print) -> tuple[str, bool]:
    """Take the lock of `run_dir` (created if missing) for this process; returns its token and whether the run
    directory was created for it. Raises RunDirLocked naming the holder when it, or a run directory nested with
    it, is taken; UserError when the directory cannot hold a lock."""
    run_dir = Path(run_dir)
    holder = _nested_holder(run_dir, stale_s)
    if holder is not None:
        raise RunDirLocked(holder_message(run_dir, *holder, stale_s).replace(
            f"The run directory {run_dir} is in use", f"The run directory {run_dir} is in use through "
            f"{holder[0].parent}", 1))
    created = not run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the run directory {run_dir}: {exc.strerror or exc}. Choose a writable "
                        "location with run.dir=PATH.") from None
    path = lock_path(run_dir)
    token = uuid.uuid4().hex
    for _ in range(5):
        doc = _record(command, token)
        try:
            if _create(path, doc):
                return token, created
        except OSError as exc:
            raise UserError(f"Cannot create the lock file {path}: {exc.strerror or exc}. The run directory must be "
                            "writable; choose another run.dir.") from None
        try:
            seen = path.read_bytes()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue  # released between our attempt and our look: try again
        except OSError as exc:
            raise UserError(f"Cannot read the lock file {path}: {exc.strerror or exc}. Check the run directory's "
                            "permissions or choose another run.dir.") from None
        holder = read_lock(path) if seen.strip() else None
        why = stale_reason(holder, mtime, stale_s)
        if why is None:
            raise RunDirLocked(holder_message(Path(run_dir), path, holder, mtime, stale_s))
        who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}, command "
               f"`{holder.get('command')}`)" if holder else "an unknown process")
        say(f"[lock] {path} was left by {who}, and {why}: taking it over.")
        _take_over(path, seen)
    raise RunDirLocked(f"Could not take the lock {path}: other invocations keep taking it. Make sure only one "
                       "unlearnbench invocation uses this run directory, then rerun.")


def release(run_dir: Path, token: str) -> None:
    """Remove the lock if it is still ours."""
    path = lock_path(run_dir)
    doc = read_lock(path)
    if doc is not None and doc.get("token") == token:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Held:
    """A lock this process holds (on the main process; the other ranks hold no file): `created` says whether the
    run directory was created to hold it."""

    run_dir: Path
    created: bool


@contextmanager
def hold_run_lock(run_dir: str | Path, acc: Any = None, command: str | None = None,
                  cfg: Any = None) -> Iterator[Held]:
    """Hold `<run_dir>/run.lock` for the block (main process only; every rank learns of a refusal).

    - Refused: `RunDirLocked` (a UserError: exit 2) on every rank; nothing is written.
    - Held: a heartbeat thread refreshes the file; the lock is released when the block ends, however it ends.
    """
    run_dir = Path(run_dir)
    is_main = acc is None or acc.is_main_process
    stale_s = stale_hours(cfg) * 3600
    say = acc.print if acc is not None else print

    def take() -> tuple[str, bool]:
        return acquire(run_dir, command, stale_s, say)

    if acc is not None and getattr(acc, "num_processes", 1) > 1:
        from unlearnbench.distributed import on_main_or_fail  # imports torch: only for a multi-process launch

        token, created = on_main_or_fail(acc, take)  # run on rank 0; its answer (or its refusal) on every rank
    else:
        token, created = take()
    if not is_main:
        yield Held(run_dir, created)
        return
    beat = _Heartbeat(lock_path(run_dir).absolute(), token, stale_s)
    beat.thread.start()
    try:
        yield Held(run_dir, created)
    finally:
        beat.stop.set()
        beat.thread.join(timeout=5)
        release(run_dir, token)
