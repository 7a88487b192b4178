"""Interrupted runs resume to the results of an uninterrupted one: SIGKILL during score and unlearn; SIGTERM
(a scheduler's pre-emption) during train and unlearn on 2 processes, and inside an unlearning step on one, which
stop at a safe point with a checkpoint (interrupt.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, free_port, launch


def _kill_when(cmd, ready, timeout=300):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_unlearn_resumes_identically(smoke_study, tmp_path):
    _, ref = smoke_study
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "unlearn")
    (run / "summary.json").unlink()  # the report stage's
    for s in ("unlearn", "report"):
        (run / "stages" / f"{s}.json").unlink()
    cmd = [sys.executable, "-m", "unlearnbench", "unlearn", "--preset", "smoke", f"run.dir={run}"]
    _kill_when(cmd, lambda: len(list((run / "unlearn").glob("*/result.json"))) >= 2)
    done = len(list((run / "unlearn").glob("*/result.json")))
    assert 2 <= done < 9, "the kill should land mid-stage"
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("already done, skipping") == done
    for d in (p for p in (ref / "unlearn").iterdir() if p.is_dir()):  # the requests (beside unlearn/summary.json)
        a = pd.read_parquet(d / "trajectory.parquet")
        b = pd.read_parquet(run / "unlearn" / d.name / "trajectory.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)


@pytest.mark.slow
def test_killed_score_resumes_identically(smoke_study, tmp_path):
    _, ref = smoke_study
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for name in ("scores", "unlearn"):
        shutil.rmtree(run / name)
    for s in ("score", "unlearn", "report"):
        (run / "stages" / f"{s}.json").unlink()
    cmd = [sys.executable, "-m", "unlearnbench", "score", "--preset", "smoke", f"run.dir={run}"]
    _kill_when(cmd, lambda: (run / "scores" / "original.parquet").exists())
    assert not (run / "stages" / "score.json").exists()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("original.parquet", "oracle.parquet", "forget.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(ref / "scores" / name), pd.read_parquet(run / "scores" / name),
                                      check_exact=False, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: stop at a safe point, checkpoint, resume identically (interrupt.py)

_TIMING = {"eval_seconds", "elapsed_seconds", "tokens_per_s", "wall_seconds", "device_seconds", "eval_share",
           "peak_memory_mib"}


def _same_request(ref, run, name):
    """A request's files in `run` equal the reference's, to the bit (wall-clock numbers aside)."""
    for f in ("trajectory.parquet", "curve.parquet", "forgetting.parquet"):
        a, b = pd.read_parquet(ref / "unlearn" / name / f), pd.read_parquet(run / "unlearn" / name / f)
        pd.testing.assert_frame_equal(a.drop(columns=[c for c in a if c in _TIMING]),
                                      b.drop(columns=[c for c in b if c in _TIMING]), check_exact=True)
    ra, rb = (json.loads((d / "unlearn" / name / "result.json").read_text()) for d in (ref, run))
    assert {k: v for k, v in ra.items() if k not in _TIMING} == {k: v for k, v in rb.items() if k not in _TIMING}
    assert not (run / "unlearn" / name / "checkpoint").exists(), "the checkpoint goes once the request is done"


def _same_model(a, b):
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _without(ref, tmp_path, *stages, name="run"):
    """A copy of the reference run with `stages` not run."""
    run = tmp_path / name
    shutil.copytree(ref, run)
    outputs = {"train": ("models", "checkpoints"), "score": ("scores",), "unlearn": ("unlearn",),
               "attack": ("attacks",), "report": ("report", "summary.json")}
    for s in stages:
        for o in outputs[s]:
            p = run / o
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        (run / "stages" / f"{s}.json").unlink(missing_ok=True)
    return run


def test_sigterm_in_unlearn_checkpoints_and_resumes_identically(smoke_study, tmp_path, monkeypatch, capsys):
    """One process: SIGTERM from inside a step -> the request stops after that step with a checkpoint, exit 143;
    the same command resumes it to the same files, bit for bit; a second SIGTERM stops the next request."""
    import unlearnbench.unlearn.request as request_mod
    from unlearnbench.cli import main

    _, ref = smoke_study
    run = _without(ref, tmp_path, "unlearn", "attack", "report")
    calls, fire_at, real_step = [0], [5], request_mod.step

    def step(u, i):
        calls[0] += 1
        if calls[0] == fire_at[0]:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it: this step still runs
        return real_step(u, i)

    monkeypatch.setattr(request_mod, "step", step)
    argv = ["unlearn", "--preset", "smoke", f"run.dir={run}"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 143
    err = capsys.readouterr().err
    first = "canary_r1"
    ckpt = run / "unlearn" / first / "checkpoint" / "step_0000005"
    assert f"interrupted (SIGTERM) at unlearn step 5 ({first}), checkpoint written to {ckpt}; rerun the same " \
           "command to resume" in err, err
    assert (ckpt / "complete.json").exists() and not (run / "unlearn" / first / "result.json").exists()
    assert not (run / "run.lock").exists(), "the lock is released"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handlers are restored"

    calls[0], fire_at[0] = 0, 16  # resumed at step 5: 15 steps finish canary_r1, then stop the next request
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 143
    out = capsys.readouterr().out
    assert f"{first}: resuming at step 5" in out
    _same_request(ref, run, first)
    _same_model(ref / "unlearn" / first / "model_unlearned", run / "unlearn" / first / "model_unlearned")
    assert (run / "unlearn" / "canary_r4" / "checkpoint" / "step_0000001" / "complete.json").exists()
    assert not (run / "unlearn" / "canary_r4" / "result.json").exists()

    # A checkpoint written before the evaluator had a state_dict (loop.json without "format", its evaluator's last
    # scores named "theta0" or kept in last_scores.parquet) is refused with a message, and the request starts again
    from unlearnbench import integrity

    old = run / "unlearn" / "canary_r16" / "checkpoint" / "step_0000001"
    shutil.copytree(run / "unlearn" / "canary_r4" / "checkpoint" / "step_0000001", old)
    loop = json.loads((old / "loop.json").read_text())
    assert loop.pop("format") == 3 and loop["evaluator"]["last"] == "theta0"
    (old / "loop.json").write_text(json.dumps(loop))
    integrity.mark_complete(old, 1)

    # The same run with another unlearning config: the checkpoint and the finished request were computed for the
    # old one, so neither is reused (a trajectory resumed under a new lr would be silently wrong)
    fire_at[0] = -1
    main([*argv, "unlearn.lr=0.002"])  # returns: the stage finished
    out = capsys.readouterr().out
    assert f"[unlearn] {first}: its result was computed for another config; recomputing it" in out
    assert "canary_r4/checkpoint/step_0000001: it was written for another config; this request starts again" in out
    assert ("canary_r16/checkpoint/step_0000001: it was written by an older unlearnbench (checkpoint format 1; this "
            "version reads format 3); this request starts again from θ₀ and the checkpoint is removed (a request "
            "checkpoint is only a resume aid)") in out
    assert not (run / "unlearn" / "canary_r16" / "checkpoint").exists()
    assert "resuming at step" not in out and not (run / "unlearn" / "canary_r4" / "checkpoint").exists()
    assert json.loads((run / "unlearn" / first / "result.json").read_text())["lr"] == 0.002


def _launch_and_signal(args, ready, sig=signal.SIGTERM, timeout=600):
    """`accelerate launch` 2 CPU processes of `python -m unlearnbench *args`; `sig` to the launcher once `ready()`.
    Returns (return code, stderr, seconds from the signal to the end)."""
    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
           "-m", "unlearnbench", *args]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline and not ready() and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(sig)
        t0 = time.time()
        proc.wait(timeout=300)
        err.seek(0)
        return proc.returncode, err.read(), time.time() - t0


def _interrupted_lines(err, stage):
    return re.findall(rf"unlearnbench: interrupted \(SIGTERM\) at {stage} step (\d+) \((\w+)\), checkpoint written "
                      r"to (\S+); rerun the same command to resume", err)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["jobs", "data"])
def test_sigterm_during_train_on_two_processes(smoke_study, tmp_path, parallel):
    """SIGTERM to `accelerate launch` (forwarded to both workers) during training: each model stops after an
    optimizer step with a checkpoint (data-parallel: both ranks at the same step), the lock goes; the same command
    resumes to the weights of the same launch uninterrupted, bit for bit. (Not to the in-process fixture's: it
    trains with the machine's threads, a launched worker with one, and the matmul blocking of a thread count rounds
    differently: measured on an Intel CPU, the 2-thread and 1-thread weights differ in the last bits. Data-parallel
    adds the all-reduce's own rounding.)"""
    _, ref = smoke_study
    base = _without(ref, tmp_path, "train", "score", "unlearn", "attack", "report", name="uninterrupted")
    res = launch("train", "--preset", "smoke", f"run.dir={base}", f"train.parallel={parallel}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = _without(ref, tmp_path, "train", "score", "unlearn", "attack", "report")
    args = ["train", "--preset", "smoke", f"run.dir={run}", f"train.parallel={parallel}"]
    code, err, after = _launch_and_signal(args, lambda: (run / "checkpoints" / "original" / "step_0000040").exists())
    lines = _interrupted_lines(err, "train")
    assert code != 0 and lines, err[-3000:]  # workers exit 143; torch's launcher reports the signal with exit 1
    assert after < 60
    for step, model, path in lines:
        assert (Path(path) / "complete.json").exists() and Path(path).name == f"step_{int(step):07d}"
    assert not (run / "stages" / "train.json").exists() and not (run / "run.lock").exists()
    assert not (run / "models" / "original" / "config.json").exists()
    res = launch(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from step" in res.stdout
    for m in ("original", "oracle"):
        _same_model(base / "models" / m, run / "models" / m)


@pytest.mark.slow
def test_sigterm_during_unlearn_on_two_processes(smoke_study, tmp_path):
    """SIGTERM to the launcher during job-parallel unlearning: each process checkpoints the request it is in,
    writes no result for it, exits; the same command resumes both and every request matches an uninterrupted run
    of that command. (Launched, like it: one thread per process. Scores depend on the thread count at float
    rounding, ~1e-6 nats on an example's NLL sum, so the in-process fixture, with the machine's threads, is no
    bit-for-bit reference.)"""
    _, smoke = smoke_study
    ref = _without(smoke, tmp_path, "unlearn", "attack", "report", name="reference")
    res = launch("unlearn", "--preset", "smoke", f"run.dir={ref}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = _without(smoke, tmp_path, "unlearn", "attack", "report")
    args = ["unlearn", "--preset", "smoke", f"run.dir={run}"]
    code, err, after = _launch_and_signal(args, lambda: any((run / "unlearn").glob("*/result.json")))
    lines = _interrupted_lines(err, "unlearn")
    assert code != 0 and lines, err[-3000:]
    assert after < 60
    for step, name, path in lines:
        assert (Path(path) / "complete.json").exists()
        assert not (run / "unlearn" / name / "result.json").exists()
    done = {p.parent.name for p in (run / "unlearn").glob("*/result.json")}
    assert 1 <= len(done) < 9 and not (run / "run.lock").exists()
    res = launch(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("resuming at step") == len(lines)
    for d in sorted(p for p in (ref / "unlearn").iterdir() if p.is_dir()):  # the requests, not summary.json
        _same_request(ref, run, d.name)
