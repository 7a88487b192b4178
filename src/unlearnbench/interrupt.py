"""Stopping at a safe point on SIGINT (Ctrl-C) and SIGTERM (`scancel`, a scheduler's pre-emption or time-limit
signal, `kill`): the run writes a checkpoint, unwinds (the run lock is released) and exits with 130 (SIGINT) or
143 (SIGTERM); the same command resumes from the checkpoint to the same results.

- The handlers only record the signal. Loops with safe points (each training step, each unlearning step) run
  inside `safe_points()` and ask `should_stop()` after a step: on a stop they write the checkpoint their periodic
  checkpointing writes (training) or a request checkpoint (unlearning), then raise `Interrupted`.
- Outside such a loop (prepare, score, report, saving a model) there is nothing to save mid-way: the handler raises
  `Interrupted` at once, so a run waiting there still ends promptly (its finished work is kept, as after a kill).
- A second SIGINT more than a second after the first stops at once (KeyboardInterrupt), without the checkpoint; a
  repeated SIGTERM is ignored (a scheduler repeats it; the checkpoint being written is worth the wait).
- Data-parallel loops (DDP, DeepSpeed, FSDP: every rank in one model) must stop at the same step: there
  `should_stop(acc, collective=True)` takes the maximum of every rank's flag (one scalar all-reduce per step).
  Job-parallel training and unlearning (each process runs whole jobs alone) ask their own process only (no
  collective).

Under `accelerate launch` / torchrun the launcher receives the signal and forwards it to every worker (each in its
own session), then waits `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds (default 30) before killing them: raise it when
writing a checkpoint takes longer. The workers exit 130/143; the launcher itself exits 1 with torch's
"Received Signals.SIGTERM death signal" report.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
_HARD_AFTER_S = 1.0  # a second SIGINT within this is the same Ctrl-C delivered twice (terminal and launcher)


class Interrupted(SystemExit):
    """A stop on a signal, raised at a safe point (after writing a checkpoint) or at once outside loops with safe
    points. A SystemExit whose code is 130 / 143: handlers of ordinary errors let it through to the CLI (which
    prints `message()`), and a script using the package directly exits with that code. `reported`: the line was
    printed already (by the handler)."""

    def __init__(self, signum: int | None = None, stage: str | None = None, step: int | None = None,
                 checkpoint: str | os.PathLike | None = None, what: str | None = None, local: bool = False):
        self.signum = int(signum if signum is not None else (requested() or signal.SIGTERM))
        self.stage, self.step, self.what, self.local = stage, step, what, local
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.reported = False
        super().__init__(self.exit_code)

    def __str__(self) -> str:
        return self.message()

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (128 + the signal number, as a shell reports a signalled process)."""
        return EXIT_CODES.get(self.signum, 128 + self.signum)

    def message(self) -> str:
        """The one line the CLI prints."""
        sig = _NAMES.get(self.signum, f"signal {self.signum}")
        if self.checkpoint is None:
            where = f" at {self.stage}" if self.stage else ""
            where += f" step {self.step}" if self.step is not None else ""
            where += f" ({self.what})" if self.what else ""
            return (f"{'interrupted' if self.signum == signal.SIGINT else 'terminated'} ({sig}){where}; finished "
                    "work is kept; rerun the same command to resume")
        return (f"interrupted ({sig}) at {self.stage} step {self.step}" + (f" ({self.what})" if self.what else "")
                + f", checkpoint written to {self.checkpoint}; rerun the same command to resume")


class _State:
    signum: int | None = None
    first_at: float = 0.0
    depth: int = 0  # active safe_points() blocks


_STATE = _State()


def requested() -> int | None:
    """The signal that asked this process to stop, if any."""
    return _STATE.signum


def reset() -> None:
    """Forget a recorded stop (tests; a library caller that handled an Interrupted)."""
    _STATE.signum, _STATE.first_at = None, 0.0


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Record a stop as the handler does (tests, or code that decides to stop): the next safe point acts on it."""
    if _STATE.signum is None:
        _STATE.signum, _STATE.first_at = int(signum), time.monotonic()


def _is_main() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _handler(signum, frame) -> None:  # runs in the main thread, between bytecodes
    if _STATE.signum is not None:
        if signum == signal.SIGINT and time.monotonic() - _STATE.first_at > _HARD_AFTER_S:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        return
    request_stop(signum)
    if _STATE.depth == 0:  # nothing to save mid-way here: unwind now (the lock is released on the way)
        exc = Interrupted(signum)
        if _is_main():
            print(f"unlearnbench: {exc.message()}", file=sys.stderr, flush=True)
        exc.reported = True
        raise exc
    if _is_main():
        print(f"unlearnbench: {_NAMES.get(signum, signum)} received: stopping at the next safe point (a checkpoint "
              "is written first); Ctrl-C again to stop at once", file=sys.stderr, flush=True)


def _ours_or_default(current) -> bool:
    return current in (signal.SIG_DFL, signal.default_int_handler, None, _handler)


@contextmanager
def handlers() -> Iterator[None]:
    """Install the SIGINT/SIGTERM handlers for the block (main thread only; a handler someone else installed, e.g.
    a test runner's, is left alone), and restore the previous ones after it. Nested blocks share the outer one."""
    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) is not _handler and signal.getsignal(signal.SIGINT) is not _handler:
            reset()  # a new invocation in this process: a stop an earlier one handled is forgotten
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                cur = signal.getsignal(sig)
                if _ours_or_default(cur) and cur is not _handler:
                    old[sig] = signal.signal(sig, _handler)
            except (ValueError, OSError):
                pass
    try:
        yield
    finally:
        for sig, h in old.items():
            try:
                signal.signal(sig, h)
            except (ValueError, OSError):
                pass


@contextmanager
def safe_points(acc: Any = None, collective: bool = False, stage: str | None = None,
                what: str | None = None) -> Iterator[None]:
    """A block whose loop reaches safe points: a signal inside only records the stop. A stop requested before the
    block or during its last part (after its last safe point) raises `Interrupted` on entry or on exit."""
    if should_stop(acc, collective):
        raise Interrupted(stage=stage, what=what, local=not collective)
    _STATE.depth += 1
    try:
        yield
    finally:
        _STATE.depth -= 1
    if should_stop(acc, collective):
        raise Interrupted(stage=stage, what=what, local=not collective)


def should_stop(acc: Any = None, collective: bool = False) -> bool:
    """Whether to stop at this safe point. `collective`: every rank of the launch calls this at the same point and
    they agree (the maximum of their flags; a rank that had no signal adopts the others'); else this process only."""
    if not collective or acc is None or getattr(acc, "num_processes", 1) <= 1:
        return _STATE.signum is not None
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(_STATE.signum or 0)], device=acc.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    got = int(flag.item())
    if got and _STATE.signum is None:
        request_stop(got)
    return bool(got)
