"""The report stage: every figure a non-empty PNG that report.md references; --compare puts runs side by side."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import cli, smoke_config
from unlearnbench.distributed import make_accelerator
from unlearnbench.errors import UserError
from unlearnbench.rundir import Context
from unlearnbench.stages import report as report_stage
from unlearnbench.stages.report import FIGURES, compare_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class RecordingTracker:
    """Stands in for tracking.Tracker: remembers what the report stage logs."""

    def __init__(self):
        self.images, self.summaries = {}, {}

    def log_images(self, images):
        self.images.update(images)

    def summary(self, values):
        self.summaries.update(values)

    def finish(self):
        pass


def test_report_renders_every_figure_and_references_it(smoke_study, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    shutil.rmtree(run / "report")
    trk = RecordingTracker()
    monkeypatch.setattr(report_stage, "open_tracker", lambda ctx, job_type: trk)
    report_stage.run(Context(cfg=smoke_config(run), run_dir=run, acc=make_accelerator(None)))

    md = (run / "report" / "report.md").read_text()
    for name in FIGURES:
        data = (run / "report" / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1024, name
        assert f"]({name}.png)" in md, name
    assert sorted(trk.images) == sorted(f"report/{name}" for name in FIGURES)
    assert all(p.exists() for p in trk.images.values())

    summary = json.loads((run / "summary.json").read_text())
    for g in summary["groups"]:
        assert f"| {g['kind']} | {g['repetitions']} | 1 | {g['n_examples']} |" in md
    for key, f in summary["findings"].items():
        assert f"**{key}: {f['verdict']}** ({f['holds']} of {f['of']}" in md
        assert trk.summaries[f"findings/{key}/verdict"] == f["verdict"]
    for c in summary["findings"]["F3"]["kinds"]:
        hr = c["cox"]["memorization"]["hr"]
        assert f"- {c['kind']}: **{c['verdict']}**; hazard ratio of forgetting per SD of memorization {hr:.3g}" in md
    for c in summary["findings"]["F1"]["cells"]:
        assert f"| {c['repetitions']} | {c['ood_kind']} | {c['replicates']} | **{c['verdict']}** |" in md


def _fake_seed(src, dest, seed, shift):
    """A seed sub-run holding only what the comparison reads, with numbers shifted."""
    dest.mkdir(parents=True)
    shutil.copy(src / "config.yaml", dest / "config.yaml")
    summary = json.loads((src / "summary.json").read_text())
    summary["seed"] = seed
    for g in summary["groups"]:
        g["uq_final"] += shift
        g["memorization_mean"] += shift
    (dest / "summary.json").write_text(json.dumps(summary))


def test_compare_runs_side_by_side_with_multi_seed_parent(smoke_study, tmp_path):
    _, src = smoke_study
    parent = tmp_path / "seeds"
    for seed, shift in ((0, 0.0), (1, 0.1), (2, -0.1)):
        _fake_seed(src, parent / f"seed_{seed}", seed, shift)
    (parent / "summary.json").write_text(json.dumps({"seeds": [0, 1, 2], "runs": [], "groups": [], "findings": {}}))
    out = tmp_path / "cmp"
    compare_runs([src, parent], out)

    md = (out / "compare.md").read_text()
    png = (out / "compare.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1024
    assert "](compare.png)" in md
    assert "| seeds | " in md and "0, 1, 2" in md
    summary = json.loads((src / "summary.json").read_text())
    g = next(g for g in summary["groups"] if g["request"] == "canary_r16")
    # the parent's three seeds: mean uq_final equals the single run's (shifts cancel), with an interval
    row = next(line for line in md.split("### Final UQ")[1].splitlines() if line.startswith("| canary | 16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{g['uq_final']:.2f} (n=1)"
    assert cells[3].startswith(f"{g['uq_final']:.2f} ± ") and cells[3].endswith("(n=3)")
    assert cells[4].endswith("(n=4)")  # pooled over every seed of every run
    assert "## Findings" in md and "seeds reproduced" in md


def test_compare_and_report_refuse_a_directory_without_summary(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no summary.json"):
        compare_runs([tmp_path / "empty"], tmp_path / "cmp")
    res = cli("report", "--preset", "smoke", "--compare", str(tmp_path / "empty"), f"run.dir={tmp_path / 'r'}",
              timeout=120)
    assert res.returncode == 2, res.stderr
    assert "no summary.json" in res.stderr and "Traceback" not in res.stderr


def test_seed_aggregate_and_compare_show_the_same_numbers(tmp_path):
    """summary.json of a multi-seed parent and its compare.md come from one implementation: a group with nothing to
    forget in one seed is left out of steps to unlearn in both, and both give the same mean and interval."""
    from unlearnbench.findings import aggregate_seeds

    def group(steps, drop, nothing):
        return {"request": "id_r4", "kind": "id", "repetitions": 4, "n_examples": 8, "steps_to_unlearn": steps,
                "utility_drop_at_unlearned": drop, "uq_final": 0.9, "steps_to_forget_mean": 5.0,
                "memorization_mean": 1.0, "difficulty_mean": 4.0, "exposure_gap_bits": 3.0,
                "nothing_to_forget": nothing}
    parent = tmp_path / "seeds"
    for seed, steps, drop, nothing in ((0, 8, 0.2, False), (1, 13, 0.4, False), (2, 2, 0.0, True), (3, 10, 0.3, False)):
        d = parent / f"seed_{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"run": "x", "seed": seed, "method": "ga", "lr": 3e-4,
                                                    "exposure": "extrapolated", "max_steps": 100, "uq_target": 0.9,
                                                    "groups": [group(steps, drop, nothing)], "findings": {}}))
    dirs = sorted(parent.glob("seed_*"))
    agg = aggregate_seeds(dirs)
    (parent / "summary.json").write_text(json.dumps(agg))
    steps = agg["groups"][0]["steps_to_unlearn"]
    # seeds 0, 1, 3 (seed 2 had nothing to forget): mean 31/3, t-interval by hand
    assert steps["n"] == 3 and steps["mean"] == pytest.approx(31 / 3)
    half = 4.302652729911275 * np.std([8, 13, 10], ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert steps["hi"] - steps["mean"] == pytest.approx(half)
    compare_runs([parent], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    row = next(line for line in md.split("### Steps to unlearn")[1].splitlines() if line.startswith("| id | 4 |"))
    assert f"{31 / 3:.3g} ± {half:.3g} (n=3)" in row


@pytest.mark.slow
def test_multi_seed_study_aggregates_and_reports(tmp_path):
    """run.seeds=[0,1]: one sub-run per seed with different data, an aggregated summary and the parent's report."""
    from conftest import smoke_config
    from unlearnbench.study import run_study

    parent = tmp_path / "seeds"
    cfg = smoke_config(parent, "run.seeds=[0,1]", "train.steps=20", "unlearn.max_steps=2",
                       "unlearn.request_kinds=[canary]")
    dirs = run_study(cfg, "run")
    assert dirs == [parent / "seed_0", parent / "seed_1"]
    ids = [pd.read_parquet(d / "scores/examples.parquet").example_id.tolist() for d in dirs]
    secrets = [pd.read_parquet(d / "scores/original.parquet").nll.sum() for d in dirs]
    assert ids[0] == ids[1] and secrets[0] != secrets[1]  # same layout, different seeds
    agg = json.loads((parent / "summary.json").read_text())
    assert agg["seeds"] == [0, 1]
    runs = [json.loads((d / "summary.json").read_text()) for d in dirs]
    for g in agg["groups"]:  # every replicate group of every seed counts once
        cell = [x for r in runs for x in r["groups"] if x["kind"] == g["kind"] and x["repetitions"] == g["repetitions"]]
        assert g["requests"] == len(cell) == sum(g["outcomes"].values()) >= 2
        vals = [x["uq_final"] for x in cell if x.get("uq_final") is not None and np.isfinite(x["uq_final"])]
        assert g["uq_final"]["n"] == len(vals) > 0
        assert g["uq_final"]["mean"] == pytest.approx(np.mean(vals))
    md = (parent / "report" / "compare.md").read_text()
    assert "0, 1" in md and "canary" in md
