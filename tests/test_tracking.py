"""Tracking: W&B offline leaves a syncable run and metrics.jsonl the curves; a broken W&B is one warning, never a
failed run; the sweep file is a valid grid over the study's config keys."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, smoke_config
from unlearnbench import tracking
from unlearnbench.config import load_config
from unlearnbench.study import run_study
from unlearnbench.tracking import Tracker, wandb_mode

FAST = ["tracking.backend=wandb", "unlearn.request_kinds=[canary]", "unlearn.max_steps=4"]


@pytest.fixture
def run_copy(smoke_study, tmp_path, monkeypatch):
    """A copy of the smoke study without metrics.jsonl, and a process that has seen no W&B failure yet."""
    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    (run / "metrics.jsonl").unlink()
    monkeypatch.setattr(tracking, "_FAILED", set())
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DISABLED", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc credentials
    return run


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _wandb_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "W&B" in str(w.message) or "wandb" in str(w.message).lower()]


def test_offline_study_leaves_offline_run_and_curve_keys(run_copy, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_study(smoke_config(run_copy, *FAST), "unlearn", force=True)
    assert not _wandb_warnings(caught)

    offline = sorted((run_copy / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    events = b"".join(p.read_bytes() for p in offline[0].glob("run-*.wandb"))  # the log `wandb sync` uploads
    for key in (b"unlearn/canary_r16/uq", b"unlearn/step", b"unlearn/canary_r16/examples", b"fingerprints"):
        assert key in events, key  # curves on the step axis, the per-example table, the resolved config
    assert f"wandb sync {offline[0]}" in capsys.readouterr().out

    records = _records(run_copy)
    keys = set().union(*records)
    for r in (1, 4, 16):
        for k in ("uq", "uq_lo", "uq_hi", "exposure_mean", "utility_drop", "id_holdout_ppl"):
            assert f"unlearn/canary_r{r}/{k}" in keys
    steps = [rec["unlearn/step"] for rec in records if "unlearn/canary_r16/uq" in rec]
    assert steps == [0, 1, 2, 3, 4]
    assert any(rec.get("record") == "summary" and "findings/F3/verdict" in rec for rec in records)


def test_misconfigured_wandb_completes_with_one_warning(run_copy, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "invalid")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: fails fast
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_study(smoke_config(run_copy, *FAST), "unlearn", force=True)
        # a second stage in the same process stays quiet: the one warning covers the whole run
        Tracker(smoke_config(run_copy, *FAST), run_copy, "report", True).finish()
    msgs = _wandb_warnings(caught)
    assert len(msgs) == 1, msgs
    assert "local files only" in msgs[0]
    assert (run_copy / "summary.json").exists()
    assert (run_copy / "unlearn" / "canary_r16" / "curve.parquet").exists()
    assert any("unlearn/canary_r16/uq" in rec for rec in _records(run_copy))


def test_unreachable_host_times_out_into_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_FAILED", set())
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # well-formed, so wandb really tries the host
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    cfg = smoke_config(tmp_path, "tracking.backend=wandb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trk = Tracker(cfg, tmp_path, "unlearn", True)
        trk.log({"unlearn/x/uq": 0.5}, **{"unlearn/step": 1})
        trk.finish()
    assert trk.wandb_run is None
    assert len(_wandb_warnings(caught)) == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["unlearn/x/uq"] == 0.5


def test_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    on = smoke_config(tmp_path, "tracking.backend=wandb")
    assert wandb_mode(on) == "offline"  # no API key: offline by default
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(on) == "online"
    assert wandb_mode(smoke_config(tmp_path, "tracking.backend=wandb", "tracking.mode=offline")) == "offline"
    assert wandb_mode(smoke_config(tmp_path, "tracking.backend=none")) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(on) is None
    trk = Tracker(on, tmp_path, "score", True)
    trk.log({"score/a": 1.0, "flag": True}, step=3)
    trk.summary({"utility/x": 2.0})
    trk.finish()
    assert not (tmp_path / "wandb").exists()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["score/a"] == 1.0 and lines[0]["step"] == 3 and lines[1]["utility/x"] == 2.0


def test_sweep_file_is_a_grid_over_valid_overrides():
    sweep = yaml.safe_load((ROOT / "launch" / "sweep.yaml").read_text())
    cmd = sweep["command"]
    assert cmd[:6] == ["${env}", "accelerate", "launch", "-m", "unlearnbench", "unlearn"]
    assert cmd[-1] == "${args_no_hyphens}" and "--force" in cmd
    params = sweep["parameters"]
    assert set(params) == {"unlearn.method", "unlearn.lr", "unlearn.request_kinds"}
    preset = cmd[cmd.index("--preset") + 1]
    for key, spec in params.items():
        for value in spec["values"]:
            load_config(preset, None, [f"{key}={value}"])  # each value is a valid override (UserError otherwise)
