"""SIGKILL during score and unlearn, then the same command again: results identical to an uninterrupted run."""

import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _kill_when(cmd, ready, timeout=300):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_unlearn_resumes_identically(smoke_study, tmp_path):
    _, ref = smoke_study
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "unlearn")
    (run / "summary.json").unlink()
    for s in ("unlearn", "report"):
        (run / "stages" / f"{s}.json").unlink()
    cmd = [sys.executable, "-m", "unlearnbench", "unlearn", "--preset", "smoke", f"run.dir={run}"]
    _kill_when(cmd, lambda: len(list((run / "unlearn").glob("*/result.json"))) >= 2)
    done = len(list((run / "unlearn").glob("*/result.json")))
    assert 2 <= done < 9, "the kill should land mid-stage"
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("already done, skipping") == done
    for d in (ref / "unlearn").iterdir():
        a = pd.read_parquet(d / "trajectory.parquet")
        b = pd.read_parquet(run / "unlearn" / d.name / "trajectory.parquet")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)


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
    for name in ("original.parquet", "oracle.parquet", "examples.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(ref / "scores" / name), pd.read_parquet(run / "scores" / name),
                                      check_exact=False, rtol=1e-6)
