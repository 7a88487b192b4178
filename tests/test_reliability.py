"""Reliability where clusters hurt: one writer per run directory (the lock), damaged outputs detected and
recomputed instead of trusted, a run directory that is a file, temporary files kept inside the run directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PY, ROOT, launch
from unlearnbench import integrity
from unlearnbench.cli import main
from unlearnbench.errors import UserError
from unlearnbench.io import CorruptFileError, read_json, read_parquet
from unlearnbench.lock import (LOCK_NAME, RunDirLocked, STALE_ENV, _record, hold_run_lock, lock_path, machine,
                               stale_reason)

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of an in-process CLI call."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def files_in(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) if path.exists() else []


def one_paragraph_error(err: str) -> str:
    assert err.startswith("unlearnbench: error: ") and "Traceback" not in err and "internal error" not in err, err
    assert err.count("\n") == 1, f"one paragraph: {err!r}"
    return err


# ---------------------------------------------------------------------------------------------------------------
# the lock

HOLDER = """
import sys, time
from unlearnbench import interrupt
from unlearnbench.lock import hold_run_lock
with hold_run_lock(sys.argv[1], command="holder --for-the-test"), interrupt.handlers():  # as a command holds it
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _start_holder(run_dir: Path, seconds: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen([PY, "-c", HOLDER, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline()
    assert line.strip() == "held", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_second_invocation_is_refused_while_another_holds_the_run_dir(capsys, prepared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared[1], run)
    holder = _start_holder(run)
    try:
        before = files_in(run)
        doc = json.loads((run / LOCK_NAME).read_text())
        assert doc["pid"] == holder.pid and doc["host"] == socket.gethostname()
        assert doc["command"] == "holder --for-the-test" and doc["started"]
        code, out, err = run_cli(capsys, "prepare", "--preset", "smoke", f"run.dir={run}")
        assert code == 2
        one_paragraph_error(err)
        for words in (f"process {holder.pid} on host {socket.gethostname()}", "running since", "holder --for-the-test",
                      f"delete {run / LOCK_NAME}", "another run.dir", STALE_ENV):
            assert words in err, (words, err)
        assert files_in(run) == before, "a refused invocation writes nothing"
        assert "already done" not in out
        # the programmatic entry refuses the same way, with the exception's own type
        with pytest.raises(RunDirLocked, match="is in use by another unlearnbench invocation"):
            with hold_run_lock(run):
                pass
        # a seed sub-run or a map cell of a run directory in use is in use too
        with pytest.raises(RunDirLocked, match=f"is in use through {run} by another"):
            with hold_run_lock(run / "seed_0"):
                pass
        assert not (run / "seed_0").exists()
    finally:
        holder.send_signal(signal.SIGTERM)  # a scheduler's time limit: the holder unwinds and releases the lock
        holder.wait(timeout=60)
    assert holder.returncode == 128 + signal.SIGTERM
    assert "terminated (SIGTERM)" in holder.stderr.read()
    assert not (run / LOCK_NAME).exists(), "SIGTERM releases the lock"
    code, out, err = run_cli(capsys, "prepare", "--preset", "smoke", f"run.dir={run}")
    assert code == 0 and "already done" in out, err
    assert not (run / LOCK_NAME).exists()


def test_parent_of_a_sub_run_in_use_is_refused(tmp_path):
    parent = tmp_path / "seeds"
    holder = _start_holder(parent / "seed_1")
    try:
        with pytest.raises(RunDirLocked, match=f"in use through {parent / 'seed_1'}"):
            with hold_run_lock(parent):
                pass
        with hold_run_lock(parent / "seed_2"):  # a sibling is another run directory
            pass
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
    with hold_run_lock(parent):
        pass


def _dead_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run: Path, mtime_age_s: float = 0.0, **changes) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    doc = {**_record("unlearnbench run --preset paper", "t0ken"), **changes}
    path = run / LOCK_NAME
    path.write_text(json.dumps(doc))
    if mtime_age_s:
        t = time.time() - mtime_age_s
        os.utime(path, (t, t))
    return path


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(capsys, prepared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared[1], run)
    pid = _dead_pid()
    _write_lock(run, pid=pid, process_started=123.0)
    code, out, err = run_cli(capsys, "prepare", "--preset", "smoke", f"run.dir={run}")
    assert code == 0, err
    assert f"was left by process {pid} on {socket.gethostname()}" in out
    assert "no longer runs" in out and "taking it over" in out and "already done" in out
    assert not (run / LOCK_NAME).exists() and not list(run.glob(f".{LOCK_NAME}*"))


@pytest.mark.parametrize("case, changes, age_h, stale", [
    ("other-host-fresh", {"host": "node-a17"}, 0.0, None),
    ("other-host-old", {"host": "node-a17"}, 3.0, "last refreshed 3.0 h ago on host node-a17"),
    ("same-host-rebooted", {"boot_id": "not-this-boot"}, 0.0, "has rebooted"),
    ("pid-reused", {"pid": os.getpid(), "process_started": 12345.0}, 0.0, "now belongs to another process"),
    ("alive", {"pid": os.getpid()}, 0.0, None),
], ids=lambda v: v if isinstance(v, str) else "")
def test_stale_rules(tmp_path, monkeypatch, case, changes, age_h, stale):
    monkeypatch.setenv(STALE_ENV, "2")
    if case == "alive":
        from unlearnbench.lock import _process_started

        changes = {**changes, "process_started": _process_started(os.getpid())}
    path = _write_lock(tmp_path / "run", mtime_age_s=age_h * 3600, **changes)
    doc = json.loads(path.read_text())
    why = stale_reason(doc, path.stat().st_mtime, 2 * 3600)
    if stale is None:
        assert why is None
        with pytest.raises(RunDirLocked) as exc:
            with hold_run_lock(tmp_path / "run"):
                pass
        assert str(doc["pid"]) in str(exc.value) and doc["host"] in str(exc.value) and "\n" not in str(exc.value)
        assert json.loads(path.read_text()) == doc, "a live holder's lock is left alone"
    else:
        assert stale in why
        with hold_run_lock(tmp_path / "run"):
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not path.exists()


def test_empty_lock_file_waits_for_its_writer_then_counts_as_stale(tmp_path):
    path = tmp_path / "run" / LOCK_NAME
    path.parent.mkdir()
    path.write_text("")
    assert stale_reason(None, time.time(), 3600) is None
    with pytest.raises(RunDirLocked, match="creating the lock file right now"):
        with hold_run_lock(tmp_path / "run"):
            pass
    old = time.time() - 300
    os.utime(path, (old, old))
    assert "empty or unreadable" in stale_reason(None, old, 3600)
    with hold_run_lock(tmp_path / "run"):
        pass
    assert not path.exists()


def test_lock_is_taken_once_refreshed_and_released(tmp_path, monkeypatch):
    monkeypatch.setenv(STALE_ENV, str(1.2 / 3600))  # heartbeat every 0.2 s
    run = tmp_path / "run"
    with hold_run_lock(run, command="outer") as held:
        assert held.created and held.run_dir == run
        path = lock_path(run)
        t0 = path.stat().st_mtime
        # a command takes the lock once: a second take, even in the same process, is refused like any other
        with pytest.raises(RunDirLocked, match=f"process {os.getpid()} on host"):
            with hold_run_lock(run, command="inner"):
                pass
        with pytest.raises(RunDirLocked, match=f"in use through {run}"):
            with hold_run_lock(run / "seed_0"):
                pass
        assert json.loads(path.read_text())["command"] == "outer", "the refused take leaves the lock alone"
        os.utime(path, (t0 - 100, t0 - 100))
        deadline = time.time() + 10
        while path.stat().st_mtime < t0 - 50 and time.time() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime >= t0 - 50, "the holder refreshes the lock while it runs"
    assert not path.exists()


def test_a_command_takes_the_lock_and_checks_its_config_once(capsys, prepared, tmp_path, monkeypatch):
    from unlearnbench import lock, study

    run = tmp_path / "run"
    shutil.copytree(prepared[1], run)
    taken, checked = [], []
    acquire, check_config = lock.acquire, study.check_config
    monkeypatch.setattr(lock, "acquire", lambda run_dir, *a, **k: taken.append(run_dir) or acquire(run_dir, *a, **k))
    monkeypatch.setattr(study, "check_config", lambda cfg: checked.append(cfg.run.dir) or check_config(cfg))
    code, out, err = run_cli(capsys, "prepare", "--preset", "smoke", f"run.dir={run}")
    assert code == 0 and "already done" in out, err
    assert taken == [run] and checked == [str(run)]
    taken.clear(), checked.clear()
    from conftest import smoke_config

    study.run_study(smoke_config(run, "run.seeds=[0,1]"), "prepare")  # the library entry: one lock for both seeds
    assert taken == [run] and checked == [str(run)]
    assert (run / "seed_1" / "stages" / "prepare.json").exists() and not (run / LOCK_NAME).exists()


def test_library_entry_holds_the_lock_and_cleans_up_after_a_user_error(tmp_path):
    from conftest import smoke_config
    from unlearnbench.study import run_study

    run = tmp_path / "run"
    holder = _start_holder(run)
    try:
        with pytest.raises(RunDirLocked, match=f"process {holder.pid} on host"):
            run_study(smoke_config(run), "prepare")
        assert (run / LOCK_NAME).exists() and not (run / "stages").exists()
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
    with pytest.raises(UserError, match="has not run"):
        run_study(smoke_config(tmp_path / "new"), "train")
    assert not (tmp_path / "new").exists(), "the directory the call created is gone again"


def test_bad_stale_hours_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv(STALE_ENV, "soon")
    with pytest.raises(UserError, match=STALE_ENV):
        with hold_run_lock(tmp_path / "run"):
            pass
    assert not (tmp_path / "run").exists()


def test_machine_identity_is_recorded():
    m = machine()
    assert m["host"] == socket.gethostname()
    doc = _record(None, "x")
    assert doc["pid"] == os.getpid() and doc["boot_id"] == m["boot_id"] and doc["pidns"] == m["pidns"]


@pytest.mark.slow
def test_refusal_reaches_every_rank_of_a_multi_process_launch(prepared, tmp_path):
    """Rank 0 is refused; rank 1 must not wait at a barrier: the launch ends, exit 2 on every rank."""
    run = tmp_path / "run"
    shutil.copytree(prepared[1], run)
    holder = _start_holder(run)
    try:
        t0 = time.time()
        res = launch("prepare", "--preset", "smoke", f"run.dir={run}", timeout=300)
        assert time.time() - t0 < 280
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
    assert res.returncode != 0
    assert res.stderr.count("is in use by another unlearnbench invocation") == 2, res.stderr[-3000:]
    # the launcher reports the failed ranks with its own traceback; none comes from the ranks themselves
    assert "unlearnbench/" not in "".join(line for line in res.stderr.splitlines(True) if line.startswith("  File"))


# ---------------------------------------------------------------------------------------------------------------
# a run directory that is a file

@pytest.mark.parametrize("argv", [["prepare"], ["run"], ["map"], ["report", "--compare", "{tmp}"]],
                         ids=["prepare", "run", "map", "compare"])
def test_run_dir_that_is_a_file_exits_2(capsys, tmp_path, argv):
    f = tmp_path / "results.txt"
    f.write_text("not a directory\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_cli(capsys, *args, "--preset", "smoke", f"run.dir={f}")
    assert code == 2
    one_paragraph_error(err)
    assert "is an existing file, not a directory" in err and f"run.dir={f}.d" in err
    assert f.read_text() == "not a directory\n"
    code, _, err = run_cli(capsys, *args, "--preset", "smoke", f"run.dir={f}/sub")
    assert code == 2 and f"{f} is an existing file" in one_paragraph_error(err)


def test_refused_stage_in_a_new_run_dir_leaves_nothing(capsys, tmp_path):
    run = tmp_path / "new"
    code, _, err = run_cli(capsys, "train", "--preset", "smoke", f"run.dir={run}")
    assert code == 2 and "has not run" in one_paragraph_error(err)
    assert not run.exists(), "the directory this invocation created (config.yaml, caches, lock) is gone again"


# ---------------------------------------------------------------------------------------------------------------
# temporary files and caches stay in the run directory

def test_contained_tmp_redirects_and_restores(tmp_path, monkeypatch):
    from unlearnbench.rundir import contained_tmp

    monkeypatch.setenv("TMPDIR", str(tmp_path / "system"))
    before = tempfile.tempdir
    with contained_tmp(tmp_path / "run") as tmp:
        assert tmp == (tmp_path / "run" / ".cache" / "tmp").resolve()
        assert os.environ["TMPDIR"] == str(tmp) and tempfile.gettempdir() == str(tmp)
        with tempfile.NamedTemporaryFile() as fh:
            assert Path(fh.name).parent == tmp
    assert os.environ["TMPDIR"] == str(tmp_path / "system") and tempfile.tempdir == before
    assert not tmp.exists(), "the empty temporary directory is removed"


def test_matplotlib_temporary_fallback_is_replaced(tmp_path, monkeypatch):
    """matplotlib exports MPLCONFIGDIR=<tmp>/matplotlib-XXXX when it cannot create its config directory; that is
    not the user's choice and must not keep the font cache outside the run directory."""
    from unlearnbench import rundir

    monkeypatch.setattr(rundir, "_OURS", {})
    fallback = Path(tempfile.gettempdir()) / "matplotlib-abc123"
    monkeypatch.setenv("MPLCONFIGDIR", str(fallback))
    got = rundir.contain_writes(tmp_path / "run")
    assert got["MPLCONFIGDIR"] == str((tmp_path / "run" / ".cache" / "matplotlib").resolve())
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))  # the user's own value still wins
    assert rundir.contain_writes(tmp_path / "run")["MPLCONFIGDIR"] == str(tmp_path / "mine")


def test_nothing_is_written_outside_the_run_dir_even_while_it_runs(smoke_study, tmp_path):
    """Polls $TMPDIR, $HOME and the working directory *during* a report stage with W&B on (media and table
    staging, its service's socket and port files) and matplotlib (font cache): what a check after the exit
    misses because the libraries clean up after themselves."""
    home, cwd, tmp, run = (tmp_path / n for n in ("home", "cwd", "tmp", "run"))
    for d in (home, cwd, tmp):
        d.mkdir()
    shutil.copytree(smoke_study[1], run)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([PY, "-m", "unlearnbench", "report", "--preset", "smoke", f"run.dir={run}",
                             "tracking.backend=wandb"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    while proc.poll() is None:
        for d in (home, cwd, tmp):
            for dirpath, dirs, names in os.walk(d):
                seen.update(os.path.join(dirpath, n) for n in dirs + names)
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert list((run / "wandb").glob("offline-run-*")) and (run / ".cache" / "matplotlib").is_dir()
    assert sorted(seen) == []
    assert not (run / ".cache" / "tmp").exists() or not any((run / ".cache" / "tmp").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# damaged outputs are detected and recomputed, never trusted

def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    i = len(data) // 2
    data[i] ^= 0xFF
    p.write_bytes(bytes(data))


KINDS = [  # (file, the stage that wrote it, a later stage that reads it)
    ("models/original/model.safetensors", "train", "score"),
    ("scores/forget.parquet", "score", "unlearn"),
    ("data/examples/*.arrow", "prepare", "train"),
    ("scores/utility.json", "score", "unlearn"),
]


@pytest.mark.parametrize("how", [_truncate, _flip], ids=["truncated", "flipped"])
@pytest.mark.parametrize("pattern, producer, consumer", KINDS, ids=[k[0].split("/")[-1] for k in KINDS])
def test_damaged_input_is_named_and_its_stage_invalidated(capsys, smoke_study, tmp_path, pattern, producer,
                                                          consumer, how):
    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    target = sorted(run.glob(pattern))[0]
    rel = target.relative_to(run).as_posix()
    how(target)
    integrity.forget_verified()  # this test process may have verified the original file
    records = {p.name: p.read_bytes() for p in (run / "stages").glob("*.json")}
    code, out, err = run_cli(capsys, consumer, "--preset", "smoke", f"run.dir={run}")
    assert code == 2, (out[-1000:], err)
    one_paragraph_error(err)
    assert rel in err and f"'{producer}' stage" in err and f"`unlearnbench {producer} run.dir={run}`" in err
    assert ("truncated" in err) if how is _truncate else ("altered" in err)
    rec = read_json(run / "stages" / f"{producer}.json")
    assert rel in rec["invalid"]["files"]
    unit = run / "/".join(rel.split("/")[:2])
    assert not unit.exists(), "the damaged part is removed so that it is recomputed"
    for name, blob in records.items():  # every other record is untouched
        if name != f"{producer}.json":
            assert (run / "stages" / name).read_bytes() == blob, name
    # the stage that wrote it now recomputes without --force; every other stage still refuses it meanwhile
    code, _, err = run_cli(capsys, consumer, "--preset", "smoke", f"run.dir={run}")
    assert code == 2 and "marked invalid" in err


def test_run_recomputes_a_damaged_output_and_nothing_downstream(capsys, smoke_study, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    target = run / "scores" / "utility.json"
    good = hashlib.sha256(target.read_bytes()).hexdigest()
    _flip(target)
    integrity.forget_verified()
    code, out, err = run_cli(capsys, "run", "--preset", "smoke", f"run.dir={run}")
    assert code == 0, err[-2000:]
    assert "[score] output scores/utility.json has the recorded size but not the recorded sha256" in out
    assert "[unlearn] already done" in out, "score is deterministic: the same outputs, nothing downstream reruns"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == good
    assert "invalid" not in read_json(run / "stages" / "score.json")


def test_changed_inputs_recompute_the_stage(capsys, smoke_study, tmp_path):
    """A stage whose inputs are not the ones it was computed from (an upstream stage was recomputed into other
    bytes) reruns, instead of being skipped on its config fingerprint alone."""
    from unlearnbench.io import write_json

    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    rec = read_json(run / "stages" / "report.json")
    rec["inputs"]["unlearn"] = "0" * 16
    write_json(run / "stages" / "report.json", rec)
    rec = read_json(run / "stages" / "unlearn.json")
    rec["inputs"]["score"] = "0" * 16
    write_json(run / "stages" / "unlearn.json", rec)
    from conftest import smoke_config
    from unlearnbench.records import should_run
    from unlearnbench.rundir import Context

    class Acc:
        is_main_process, num_processes = True, 1

        def print(self, *a):
            print(*a)

        def wait_for_everyone(self):
            pass

    ctx = Context(cfg=smoke_config(run), run_dir=run, acc=Acc())
    assert should_run(ctx, "unlearn")
    assert "the outputs of score changed since it ran" in capsys.readouterr().out
    assert not (run / "unlearn").exists() and (run / "summary.json").exists()  # the report stage's output stays
    assert not should_run(ctx, "score")


def test_unreadable_json_and_parquet_are_named(tmp_path):
    j, p = tmp_path / "x.json", tmp_path / "x.parquet"
    j.write_text('{"a": [1, 2')
    with pytest.raises(CorruptFileError, match="x.json is not valid JSON"):
        read_json(j)
    p.write_bytes(b"PAR1" + os.urandom(64))
    with pytest.raises(CorruptFileError, match="x.parquet is not a readable parquet file"):
        read_parquet(p)


def test_verify_input_checks_another_stage_s_output_before_it_is_read(smoke_study, tmp_path):
    from unlearnbench.records import verify_input

    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    verify_input(run / "scores" / "forget.parquet")
    assert len(read_parquet(run / "scores" / "forget.parquet")) > 0
    verify_input(run / "scores")  # a directory: every recorded file under it
    verify_input(tmp_path / "run" / "summary.json")
    _truncate(run / "summary.json")
    integrity.forget_verified()
    with pytest.raises(CorruptFileError, match="summary.json has .* bytes, the record says"):
        verify_input(run / "summary.json")
    assert read_json(run / "stages" / "report.json")["invalid"]["files"] == ["summary.json"]
    assert not (run / "summary.json").exists(), "the damaged file is removed"
    verify_input(run / "summary.json")  # its record is marked invalid: being recomputed, nothing more to say


# ---------------------------------------------------------------------------------------------------------------
# checkpoints

def _checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"step_{step:07d}"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(os.urandom(4096))
    (ckpt / "optimizer.bin").write_bytes(os.urandom(8192))
    (ckpt / "sub" / "random_states_0.pkl").write_bytes(os.urandom(100))
    integrity.mark_complete(ckpt, step)
    return ckpt


@pytest.mark.parametrize("how", [_truncate, _flip, lambda p: p.unlink()], ids=["truncated", "flipped", "missing"])
def test_damaged_checkpoint_is_never_resumed(tmp_path, how):
    root = tmp_path / "checkpoints" / "original"
    older, newer = _checkpoint(root, 40), _checkpoint(root, 80)
    assert integrity.latest_checkpoint(root, "train") == (newer, 80)
    said = []
    integrity.forget_verified()
    how(newer / "optimizer.bin")
    assert integrity.latest_checkpoint(root, "train", say=said.append) == (older, 40)
    assert said[0].startswith(f"[train] not resuming from {newer}: ") and "optimizer.bin" in said[0]
    how(older / "sub" / "random_states_0.pkl")
    assert integrity.latest_checkpoint(root, "train", say=said.append) is None
    (root / "step_0000120").mkdir()  # interrupted while being written: no complete.json, skipped silently
    said.clear()
    assert integrity.latest_checkpoint(root, "train", say=said.append) is None
    assert len(said) == 2 and "step_0000120" not in " ".join(said)


def test_latest_checkpoint_names_its_caller(tmp_path):
    """The skipped checkpoint is reported under the caller's label (an unlearning request's, not "[train]")."""
    root = tmp_path / "checkpoint"
    older, newer = _checkpoint(root, 1), _checkpoint(root, 5)
    _truncate(newer / "optimizer.bin")
    said = []
    assert integrity.latest_checkpoint(root, "unlearn", say=said.append) == (older, 1)
    assert len(said) == 1 and said[0].startswith(f"[unlearn] not resuming from {newer}: ")
    assert said[0].endswith(". It is ignored.") and "[train]" not in said[0]


def test_checkpoint_recorded_before_checksums_is_trusted(tmp_path):
    ckpt = tmp_path / "step_0000040"
    ckpt.mkdir()
    (ckpt / "complete.json").write_text('{"step": 40}')
    assert integrity.latest_checkpoint(tmp_path, "train") == (ckpt, 40)


def test_checkpoint_policy_and_disk_use_per_stage(tmp_path):
    """train.keep_checkpoints: by default no checkpoint survives a verified save; N keeps the newest N; the stage
    record says how much disk the stage and its checkpoints use."""
    from conftest import smoke_config
    from unlearnbench.study import run_study

    small = ["train.steps=60", "train.checkpoint_every=20"]
    run_study(smoke_config(tmp_path / "none", *small), "prepare")
    run_study(smoke_config(tmp_path / "none", *small), "train")
    assert not (tmp_path / "none" / "checkpoints").exists()
    rec = json.loads((tmp_path / "none" / "stages" / "train.json").read_text())
    sizes = sum(p.stat().st_size for p in (tmp_path / "none" / "models").rglob("*") if p.is_file())
    assert rec["disk_bytes"] == sizes and rec["checkpoint_bytes"] == 0
    run_study(smoke_config(tmp_path / "two", *small, "train.keep_checkpoints=2"), "prepare")
    run_study(smoke_config(tmp_path / "two", *small, "train.keep_checkpoints=2"), "train")
    for name in ("original", "oracle"):
        kept = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / name).glob("step_*"))
        assert kept == ["step_0000020", "step_0000040"]
    assert json.loads((tmp_path / "two" / "stages" / "train.json").read_text())["checkpoint_bytes"] > 0
