"""The report stage: every figure a non-empty PNG that report.md references; --compare puts runs side by side."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import cli, smoke_config
from unlearnbench.distributed import make_accelerator
from unlearnbench.errors import UserError
from unlearnbench.report import FIGURES, compare_runs, render_markdown, run_report
from unlearnbench.runner import Context

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class RecordingTracker:
    """Stands in for tracking.Tracker: remembers what the report stage logs."""

    def __init__(self):
        self.images, self.summaries = {}, {}

    def log_images(self, images):
        self.images.update(images)

    def summary(self, values):
        self.summaries.update(values)


def test_report_renders_every_figure_and_references_it(smoke_study, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    shutil.rmtree(run / "report")
    trk = RecordingTracker()
    run_report(Context(cfg=smoke_config(run), run_dir=run, acc=make_accelerator(None)), trk=trk)

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
    for c in summary["findings"]["F3"]["correlations"]:
        rho = f"ρ = {c['rho']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]"
        assert f"{c['kind']}, steps to forget vs {c['variable']}: {rho}" in md


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


def test_render_markdown_of_a_seed_aggregate():
    agg = {"seeds": [0, 1], "runs": ["a", "b"], "groups": [
        {"kind": "id", "repetitions": 16, "seeds": 2, "unlearned_seeds": 2,
         "steps_to_unlearn": {"mean": 10.0, "lo": 6.0, "hi": 14.0, "n": 2},
         "utility_drop_at_unlearned": {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 2},
         **{k: {"mean": None, "lo": None, "hi": None, "n": 0} for k in
            ("uq_final", "steps_to_forget_mean", "memorization_mean", "difficulty_mean")}}],
        "findings": {"F1": {"verdicts": ["reproduced", "not reproduced"], "reproduced_in": 1, "of": 2,
                            "verdict": "partly reproduced"}}}
    md = render_markdown(agg)
    assert "| id | 16 | 2 | 2 | 10 ± 4 (n=2) | +50.0% (n=2) | – |" in md
    assert "**F1: partly reproduced**, reproduced in 1 of 2 seeds" in md


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
    for g in agg["groups"]:
        per_seed = [next(x for x in r["groups"] if x["kind"] == g["kind"] and x["repetitions"] == g["repetitions"])
                    for r in runs]
        assert g["seeds"] == 2
        assert g["uq_final"]["mean"] == pytest.approx(np.mean([x["uq_final"] for x in per_seed]))
    md = (parent / "report" / "compare.md").read_text()
    assert "0, 1" in md and "canary" in md
