"""Tracking: W&B offline leaves a syncable run and metrics.jsonl the curves; TensorBoard (through Accelerate's
tracker) holds the same curves on the same step axis; a broken W&B is one warning, never a failed run; an unknown or
missing tracker is refused before any stage runs; the sweep file is a valid grid over the study's config keys."""

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, cli, smoke_config
from unlearnbench import tracking
from unlearnbench.config import load_config
from unlearnbench.study import run_study
from unlearnbench.tracking import Tracker, wandb_mode

FAST = ["tracking.backends=[wandb]", "unlearn.request_kinds=[canary]", "unlearn.max_steps=4"]


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
    for key in (b"unlearn/canary_r16/uq", b"unlearn/step", b"unlearn/canary_r16/forgetting", b"fingerprints"):
        assert key in events, key  # curves on the step axis, the per-example table, the resolved config
    assert f"wandb sync {offline[0]}" in capsys.readouterr().out

    records = _records(run_copy)
    keys = set().union(*records)
    for r in (1, 4, 16):
        for k in ("uq", "uq_lo", "uq_hi", "exposure_mean", "utility_drop", "id_holdout_ppl"):
            assert f"unlearn/canary_r{r}/{k}" in keys
    steps = [rec["unlearn/step"] for rec in records if "unlearn/canary_r16/uq" in rec]
    assert steps == [0, 1, 2, 3, 4]
    # the findings are decided by the report stage, and its tracker gets their summary values
    assert not any(rec.get("record") == "summary" and "findings/F3/verdict" in rec for rec in records)
    run_study(smoke_config(run_copy, *FAST), "report")
    verdict = json.loads((run_copy / "summary.json").read_text())["findings"]["F3"]["verdict"]
    assert [rec["findings/F3/verdict"] for rec in _records(run_copy)
            if rec.get("record") == "summary" and "findings/F3/verdict" in rec] == [verdict]
    assert next(rec for rec in _records(run_copy) if "findings/F3/verdict" in rec)["job_type"] == "report"


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
    assert (run_copy / "unlearn" / "summary.json").exists()
    assert (run_copy / "unlearn" / "canary_r16" / "curve.parquet").exists()
    assert any("unlearn/canary_r16/uq" in rec for rec in _records(run_copy))


def test_unreachable_host_times_out_into_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_FAILED", set())
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # well-formed, so wandb really tries the host
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    cfg = smoke_config(tmp_path, "tracking.backends=[wandb]")
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
    on = smoke_config(tmp_path, "tracking.backends=[wandb]")
    assert wandb_mode(on) == "offline"  # no API key: offline by default
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(on) == "online"
    assert wandb_mode(smoke_config(tmp_path, "tracking.backends=[wandb]", "tracking.mode=offline")) == "offline"
    assert wandb_mode(smoke_config(tmp_path, "tracking.backends=[]")) is None
    assert wandb_mode(smoke_config(tmp_path, "tracking.backends=[tensorboard]")) is None
    # the deprecated single key still works, and wins over the list (older config files and commands set it)
    assert smoke_config(tmp_path, "tracking.backend=none").tracking.backends == []
    assert smoke_config(tmp_path, "tracking.backends=[tensorboard]", "tracking.backend=wandb").tracking.backends == ["wandb"]
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


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the TensorBoard event files in one run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tensorboard_and_wandb_offline_hold_the_curves_of_metrics_jsonl(run_copy, monkeypatch, capsys):
    """Both trackers at once: the TensorBoard event file's unlearning curves are metrics.jsonl's values at its
    steps, and the offline W&B run is still written."""
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_study(smoke_config(run_copy, *FAST, "tracking.backends=[wandb,tensorboard]"), "unlearn", force=True)
    assert not [str(w.message) for w in caught if "TensorBoard" in str(w.message)] and not _wandb_warnings(caught)

    runs = sorted((run_copy / "tensorboard" / "unlearn").iterdir())
    assert len(runs) == 1  # one TensorBoard run per stage invocation, under <run.dir>/tensorboard/<stage>/
    tb = _scalars(runs[0])
    records = _records(run_copy)
    for r in (1, 4, 16):
        for k in ("uq", "exposure_mean", "utility_drop"):
            key = f"unlearn/canary_r{r}/{k}"
            want = [(rec["unlearn/step"], rec[key]) for rec in records if key in rec]
            assert want and [s for s, _ in tb[key]] == [s for s, _ in want], key  # the unlearning step is the x-axis
            np.testing.assert_allclose([v for _, v in tb[key]], [v for _, v in want], rtol=1e-6, atol=1e-7)
    assert [s for s, _ in tb["unlearn/canary_r16/uq"]] == [0, 1, 2, 3, 4]
    assert len(sorted((run_copy / "wandb").glob("offline-run-*"))) == 1
    assert "wandb sync" in capsys.readouterr().out


def test_tensorboard_tracker_takes_tables_images_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(tracking, "_FAILED", set())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([0, 1], [1, 0])
    plt.savefig(tmp_path / "fig.png")
    plt.close()
    trk = Tracker(smoke_config(tmp_path, "tracking.backends=[tensorboard]"), tmp_path, "report", True)
    assert list(trk.trackers) == ["tensorboard"] and trk.wandb_run is None
    trk.log({"train/original/loss": 2.5}, step=20, model="original")
    trk.log_table("score/forget", pd.DataFrame({"example_id": ["a", "b"], "nll": [1.25, 2.0]}))
    trk.log_images({"report/fig": tmp_path / "fig.png"})
    trk.summary({"findings/F1/verdict": "reproduced", "findings/F1/of": 3, "x": float("nan")})
    trk.finish()
    logdir = next((tmp_path / "tensorboard" / "report").iterdir())
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    assert [(e.step, e.value) for e in ea.Scalars("train/original/loss")] == [(20, 2.5)]
    assert [e.value for e in ea.Scalars("findings/F1/of")] == [3.0] and "x" not in tags["scalars"]
    assert "report/fig" in tags["images"]
    text = {t for t in tags["tensors"]}
    assert {"score/forget/text_summary", "findings/F1/verdict/text_summary"} <= text
    table = ea.Tensors("score/forget/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| example_id | nll |" in table and "| b | 2 |" in table
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train/original/loss"] == 2.5 and lines[1]["findings/F1/verdict"] == "reproduced"


def test_a_broken_tracker_is_one_warning_and_the_others_go_on(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(tracking, "_FAILED", set())
    trk = Tracker(smoke_config(tmp_path, "tracking.backends=[tensorboard]"), tmp_path, "unlearn", True)

    class Broken:
        def log(self, *a, **k):
            raise OSError("disk full")

        def finish(self):
            pass

    trk.trackers["mlflow"] = Broken()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(3):
            trk.log({"unlearn/x/uq": s / 4}, **{"unlearn/step": s})
        trk.finish()
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and msgs[0].startswith("MLflow log failed (OSError: disk full)"), msgs
    assert len(_records(tmp_path)) == 3
    assert len(_scalars(next((tmp_path / "tensorboard" / "unlearn").iterdir()))["unlearn/x/uq"]) == 3


def test_tracker_names_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from unlearnbench.config import TRACKERS

    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS)


def test_unknown_or_missing_tracker_exits_2_before_any_stage(tmp_path):
    res = cli("run", "--preset", "smoke", f"run.dir={tmp_path / 'a'}", "tracking.backends=[wandb,neptune]")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown tracker(s) 'neptune'" in res.stderr and "tensorboard" in res.stderr and "mlflow" in res.stderr
    absent = [n for n in ("aim", "clearml", "dvclive", "swanlab", "mlflow", "comet_ml")
              if importlib.util.find_spec(n) is None]
    if not absent:
        pytest.skip("every tracker is installed here")
    from unlearnbench.config import TRACKERS

    run = tmp_path / "b"
    res = cli("run", "--preset", "smoke", f"run.dir={run}", f"tracking.backends=[tensorboard,{absent[0]}]")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"asks for {absent[0]}" in res.stderr and f"pip install {TRACKERS[absent[0]]}" in res.stderr
    assert not (run / "data").exists() and not (run / "stages").exists()  # refused before the first stage


def test_a_session_a_stop_left_open_is_finished_on_the_way_out(tmp_path, monkeypatch):
    """A stage stopped by SIGTERM raises past its tracker's finish(): the CLI's `finish_open` closes the session,
    so the TensorBoard writer is flushed and closed (its scalars readable) and nothing stays open."""
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(tracking, "_FAILED", set())
    trk = Tracker(smoke_config(tmp_path, "tracking.backends=[tensorboard]"), tmp_path, "unlearn", True)
    trk.log({"unlearn/canary_r16/uq": 0.75}, step=3)
    assert trk in tracking._OPEN
    tracking.finish_open()
    assert trk.trackers == {} and trk not in tracking._OPEN
    logdir = next((tmp_path / "tensorboard" / "unlearn").iterdir())
    assert _scalars(logdir)["unlearn/canary_r16/uq"] == [(3, 0.75)]
    tracking.finish_open()  # nothing left: a second call is a no-op
