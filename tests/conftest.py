"""Shared fixtures: small configs and a prepared smoke run directory, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def smoke_config(run_dir: Path, *overrides: str):
    """The smoke preset pointed at `run_dir`, with overrides."""
    from unlearnbench.config import load_config
    from unlearnbench.rundir import resolve_run

    return resolve_run(load_config("smoke", None, [f"run.dir={run_dir}", *overrides]))


def cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run `python -m unlearnbench ...` in a subprocess; returns CompletedProcess."""
    import subprocess

    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([PY, "-m", "unlearnbench", *args], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=cwd or ROOT)


def free_port() -> int:
    """A free TCP port on loopback for a launch's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, processes: int = 2, config: str = "cpu_ddp.yaml", env: dict | None = None,
           timeout: int = 600):
    """`accelerate launch` of `python -m unlearnbench ...` with 2 CPU processes (gloo), in a subprocess.

    A subprocess rather than accelerate.debug_launcher: forking a process whose OpenMP threads already ran
    (any earlier torch work in the test session) deadlocks the children.
    """
    import subprocess

    e = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    if config == "cpu_ddp.yaml":
        e["ACCELERATE_USE_CPU"] = "1"
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "unlearnbench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def fresh_state():
    """Forget the Accelerate singleton state inherited from the test process (debug_launcher forks it)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A smoke run directory with the prepare stage done."""
    from unlearnbench.study import run_study

    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    cfg = smoke_config(run_dir)
    run_study(cfg, "prepare")
    return cfg, run_dir


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """A whole smoke study (prepare -> train -> score -> unlearn -> report), run once per session."""
    from unlearnbench.study import run_study

    run_dir = tmp_path_factory.mktemp("study") / "run"
    cfg = smoke_config(run_dir)
    run_study(cfg, "run")
    return cfg, run_dir


def assert_same_curve(a, b) -> None:
    """Two unlearning curves of the same request from one process and from a multi-process backend.

    The same θ₀, forget batches and loss normalisation; the gradient all-reduce only reorders float sums, so after
    a few steps of lr 1e-3 UQ and exposure agree to ~1e-5 bits and perplexity to ~1e-7 relative (measured: DDP and
    ZeRO-2/3 all below 1e-5). A changed update does not stay that small: DeepSpeed's default gradient clipping at
    1.0 (absent in one process) moved UQ by 1.5e-2 and perplexity by 2e-3. UQ and exposure span ~1 bit over these
    steps, so 1e-3 bits is far below any reported difference.
    """
    import numpy as np

    assert list(a.step) == list(b.step)
    np.testing.assert_allclose(a.uq, b.uq, atol=1e-3)
    np.testing.assert_allclose(a.exposure_mean, b.exposure_mean, atol=1e-3)
    np.testing.assert_allclose(a.id_holdout_ppl, b.id_holdout_ppl, rtol=1e-4)
    np.testing.assert_allclose(a.train_loss.dropna(), b.train_loss.dropna(), rtol=1e-4)


def write_seed(d, seed: int, results: list[dict]) -> None:
    """A finished run directory as far as the aggregation reads it: unlearn/summary.json, each result.json, and the
    report stage's summary.json (seed, request rows)."""
    import json

    from unlearnbench.results import request_row

    rows = [request_row(r) for r in results]
    for r in results:
        (d / "unlearn" / r["request"]).mkdir(parents=True)
        (d / "unlearn" / r["request"] / "result.json").write_text(json.dumps(r))
    (d / "unlearn" / "summary.json").write_text(json.dumps({"requests": rows}))
    (d / "summary.json").write_text(json.dumps({"run": "x", "seed": seed, "method": "ga", "lr": 3e-4,
                                                "exposure": "extrapolated", "max_steps": 100, "uq_target": 0.9,
                                                "requests": rows, "findings": {}}))
