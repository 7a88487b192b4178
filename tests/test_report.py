"""The report stage: the one writer of the run's summary.json, deciding the findings from the stored per-request
results (so `report --force` re-decides them); every figure a non-empty PNG that report.md references; --compare puts
runs side by side."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import cli, smoke_config
from unlearnbench.distributed import make_accelerator
from unlearnbench.errors import UserError
from unlearnbench.rundir import Context
from unlearnbench.reporting.compare import compare_runs
from unlearnbench.reporting.style import FIGURES
from unlearnbench.stages import report as report_stage

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
    (run / "summary.json").unlink()
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
    for g in summary["requests"]:
        assert f"| {g['kind']} | {g['repetitions']} | 1 | {g['n_examples']} |" in md
    for key, f in summary["findings"].items():
        assert f"**{key}: {f['verdict']}**" in md and f"({f['holds']} of {f['of']} " in md
        assert trk.summaries[f"findings/{key}/verdict"] == f["verdict"]
    for c in summary["findings"]["F3"]["kinds"]:
        m = c["cox"]["memorization"]
        assert (f"- {c['kind']}: **{c['family_verdict']}** after Holm (unadjusted {c['verdict']}" in md
                and f"within-request SD of memorization {m['hr']:.3g}" in md)
    for c in summary["findings"]["F1"]["contrasts"]:
        assert f"- r{c['repetitions']} {c['ood_kind']} vs id: **{c['family_verdict']}** after Holm" in md
    f4 = summary["attacks"]["findings"]["F4"]
    assert f"**F4: {f4['verdict']}**" in md and trk.summaries["findings/F4/verdict"] == f4["verdict"]


def test_the_merged_summary_is_the_report_stages_own(smoke_study, tmp_path):
    """summary.json is written by the report stage alone (its record lists it; the unlearn and attack stages' do
    not): the unlearn stage's request rows, each with `attacked` and the attack columns of attacks/<request>/, F4
    from those results, and the unlearn stage's outcome counts and cost."""
    from unlearnbench.io import write_json
    from unlearnbench.verdicts import decide_f4

    cfg, run = smoke_study
    records = {s: json.loads((run / "stages" / f"{s}.json").read_text())["files"] for s in ("unlearn", "attack", "report")}
    assert "summary.json" in records["report"]
    assert "summary.json" not in records["unlearn"] and "unlearn/summary.json" in records["unlearn"]
    assert all(f.startswith("attacks/") for f in records["attack"])
    summary = json.loads((run / "summary.json").read_text())
    unlearn = json.loads((run / "unlearn" / "summary.json").read_text())
    attacks = json.loads((run / "attacks" / "summary.json").read_text())
    attacked = {r["request"]: r for r in attacks["requests"]}
    assert attacked and {x["request"] for x in attacks["skipped"]} | set(attacked) == {
        g["request"] for g in unlearn["requests"] if g["repetitions"] == 16}  # the smoke preset: max_repetitions
    assert [{k: v for k, v in g.items() if k != "attacked" and not k.startswith("attack_")} for g in summary["requests"]
            ] == unlearn["requests"]
    for g in summary["requests"]:
        assert g["attacked"] == (g["request"] in attacked)
        if g["attacked"]:
            r = attacked[g["request"]]
            assert g["attack_relearn_retain_recovered"] == r["relearn_retain"]["recovered"]
            assert g["attack_mia_loss_auc_unlearned"] == r["mia"]["unlearned"]["loss"]
    assert summary["outcomes"] == unlearn["outcomes"] and summary["cost"] == unlearn["cost"]
    assert summary["attacks"]["requests"] == sorted(attacked)
    assert summary["attacks"]["relearn_steps"] == attacks["relearn_steps"] == cfg.attack.relearn_steps
    # as stored
    write_json(tmp_path / "f4.json", decide_f4(list(attacked.values()), attacks["skipped"], cfg.metrics.alpha))
    assert json.loads((tmp_path / "f4.json").read_text()) == summary["attacks"]["findings"]["F4"]


def test_report_force_redecides_every_finding_from_the_stored_results(smoke_study, tmp_path):
    """The findings live in the report stage: change stored per-request results (as a rule change would re-read
    them) and `report --force` decides again from them, without rerunning unlearn."""
    import os

    from unlearnbench.records import amend_record
    from unlearnbench.study import run_study

    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    before = json.loads((run / "summary.json").read_text())
    # id_r16 became unlearned (F1/F2's only informative r16 pairs rest on it); make it collapse at every target
    res_path = run / "unlearn" / "id_r16" / "result.json"
    res = json.loads(res_path.read_text())
    assert res["outcome"] == "unlearned"
    res["outcome"] = "collapsed"
    for o in res["outcomes"].values():
        o["outcome"] = "collapsed"
    res_path.write_text(json.dumps(res))
    # canary's memorization negated: the Cox coefficient of memorization changes sign, F3 for canary reverses
    canary = [g["request"] for g in before["requests"] if g["kind"] == "canary"]
    for name in canary:
        p = run / "unlearn" / name / "forgetting.parquet"
        df = pd.read_parquet(p)
        df.assign(memorization=-df.memorization).to_parquet(p, index=False)
    for rel in ["unlearn/id_r16/result.json"] + [f"unlearn/{n}/forgetting.parquet" for n in canary]:
        amend_record(run, "unlearn", rel)  # a deliberate change, not damage
    unlearn_record = (run / "stages" / "unlearn.json").read_text()
    curve_mtime = os.stat(run / "unlearn" / "id_r16" / "curve.parquet").st_mtime_ns

    run_study(smoke_config(run), "report", force=True)
    after = json.loads((run / "summary.json").read_text())
    assert (run / "stages" / "unlearn.json").read_text() == unlearn_record  # unlearn did not run again
    assert os.stat(run / "unlearn" / "id_r16" / "curve.parquet").st_mtime_ns == curve_mtime
    assert json.loads(res_path.read_text())["outcome"] == "collapsed"
    row = next(g for g in after["requests"] if g["request"] == "id_r16")
    assert row["outcome"] == "collapsed" and all(row[f"step_uq_{t}"] is None for t in res["outcomes"])
    assert after["outcomes"]["collapsed"] == before["outcomes"].get("collapsed", 0) + 1
    assert after["outcomes"]["unlearned"] == before["outcomes"]["unlearned"] - 1
    for key in ("F1", "F2"):
        for c_before, c_after in zip(before["findings"][key]["contrasts"], after["findings"][key]["contrasts"]):
            e_b, e_a = (c["by_target"][c["main"]] for c in (c_before, c_after))
            if c_after["repetitions"] == 16:  # the collapsed ID request is left out of its side and counted
                assert e_a["counts"]["id_used"] == e_b["counts"]["id_used"] - 1
                assert e_a["counts"]["id_left_out"] == {
                    "F1": {"collapsed": 1}, "F2": {"collapsed: no cost at a crossing": 1}}[key]
            else:
                assert e_a["counts"] == e_b["counts"]
    f3b = {c["kind"]: c for c in before["findings"]["F3"]["kinds"]}
    f3a = {c["kind"]: c for c in after["findings"]["F3"]["kinds"]}
    # the rule is symmetric: a flipped coefficient swaps reproduced and reversed and leaves "not significant" alone
    mirror = {"reproduced": "reversed", "reversed": "reproduced"}
    assert f3a["canary"]["verdict"] == mirror.get(f3b["canary"]["verdict"], f3b["canary"]["verdict"])
    assert f3a["canary"]["cox"]["memorization"]["hr_lo"] == pytest.approx(
        1 / f3b["canary"]["cox"]["memorization"]["hr_hi"], rel=1e-3)
    assert f3a["canary"]["cox"]["memorization"]["coef"] == pytest.approx(-f3b["canary"]["cox"]["memorization"]["coef"],
                                                                          rel=1e-3)
    assert {k: f3a[k]["verdict"] for k in ("id", "domain")} == {k: f3b[k]["verdict"] for k in ("id", "domain")}
    # the attack stage ran on the unlearn results before the change: its results no longer count in the merged view
    assert "attacks" in before and "attacks" not in after and not any("attacked" in g for g in after["requests"])
    assert f"**F3: {after['findings']['F3']['verdict']}**" in (run / "report" / "report.md").read_text()


def test_a_run_directory_of_an_older_layout_is_refused_with_what_to_rerun(smoke_study, tmp_path):
    """Every stage record carries the run directory's layout (2 since 0.2.0, whose names differ). A directory whose
    records lack it was written by an older unlearnbench: every command that would read it refuses it in one
    paragraph (what changed, the changelog, `run --force` or a new run.dir), never a KeyError, removing nothing; a
    forced stage is recomputed and its new record carries the layout."""
    from unlearnbench.records import LAYOUT
    from unlearnbench.study import run_study

    assert LAYOUT == 2
    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run)
    for p in sorted((run / "stages").glob("*.json")):
        rec = json.loads(p.read_text())
        assert rec["layout"] == 2, p.name
        del rec["layout"]
        p.write_text(json.dumps(rec))
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    for stage in ("prepare", "train", "score", "unlearn", "attack", "report", "run"):
        with pytest.raises(UserError) as err:
            run_study(smoke_config(run), stage)
        msg = str(err.value)
        assert "written by an older unlearnbench" in msg and "Changelog" in msg and "\n" not in msg, stage
        assert f"`unlearnbench run --force run.dir={run}`" in msg and "new directory" in msg
    with pytest.raises(UserError, match="older unlearnbench"):
        compare_runs([run], tmp_path / "cmp")
    res = cli("report", "--preset", "smoke", f"run.dir={run}", timeout=300)
    assert res.returncode == 2 and "older unlearnbench" in res.stderr and "Traceback" not in res.stderr
    after = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] != ".cache"} == {
        k: v for k, v in before.items() if k.parts[0] != ".cache"}  # refused before anything was touched
    run_study(smoke_config(run), "prepare", force=True)  # --force recomputes the stage under the new layout
    assert json.loads((run / "stages" / "prepare.json").read_text())["layout"] == 2
    with pytest.raises(UserError, match="older unlearnbench"):
        run_study(smoke_config(run), "train")  # the stages after it are still of the older layout

def _fake_seed(src, dest, seed, shift):
    """A seed sub-run holding only what the comparison reads, with numbers shifted."""
    dest.mkdir(parents=True)
    shutil.copy(src / "config.yaml", dest / "config.yaml")
    summary = json.loads((src / "summary.json").read_text())
    summary["seed"] = seed
    for g in summary["requests"]:
        g["uq_final"] += shift
        g["memorization_mean"] += shift
    (dest / "summary.json").write_text(json.dumps(summary))


def test_compare_runs_side_by_side_with_multi_seed_parent(smoke_study, tmp_path):
    _, src = smoke_study
    parent = tmp_path / "seeds"
    for seed, shift in ((0, 0.0), (1, 0.1), (2, -0.1)):
        _fake_seed(src, parent / f"seed_{seed}", seed, shift)
    (parent / "summary.json").write_text(json.dumps({"seeds": [0, 1, 2], "runs": [], "cells": [], "findings": {}}))
    out = tmp_path / "cmp"
    compare_runs([src, parent], out)

    md = (out / "compare.md").read_text()
    png = (out / "compare.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1024
    assert "](compare.png)" in md
    assert "| seeds | " in md and "0, 1, 2" in md
    summary = json.loads((src / "summary.json").read_text())
    g = next(g for g in summary["requests"] if g["request"] == "canary_r16")
    # the parent's three seeds: mean uq_final equals the single run's (shifts cancel), with an interval
    row = next(line for line in md.split("### Final UQ")[1].splitlines() if line.startswith("| canary | 16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{g['uq_final']:.2f} (n=1)"
    assert cells[3].startswith(f"{g['uq_final']:.2f} ± ") and cells[3].endswith("(n=3 seeds)")
    assert cells[4].endswith("(n=4 seeds)")  # pooled over every seed of every run
    assert "## Findings" in md and "| F1 |" in md and "seeds reproduced" not in md  # one verdict per run, no vote


def test_compare_and_report_refuse_a_directory_without_summary(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no summary.json"):
        compare_runs([tmp_path / "empty"], tmp_path / "cmp")
    res = cli("report", "--preset", "smoke", "--compare", str(tmp_path / "empty"), f"run.dir={tmp_path / 'r'}",
              timeout=120)
    assert res.returncode == 2, res.stderr
    assert "no summary.json" in res.stderr and "Traceback" not in res.stderr


def test_seed_aggregate_and_compare_show_the_same_numbers(tmp_path):
    """summary.json of a multi-seed parent and its compare.md come from one implementation, the seed as the unit: a
    request with nothing to forget in one seed is left out of steps to unlearn in both, and both give the same mean
    and interval over the seeds."""
    from conftest import smoke_config, write_seed
    from unlearnbench.findings import aggregate_seeds

    def request(steps, drop, nothing):
        return {"request": "id_r4_g0", "kind": "id", "repetitions": 4, "group": 0, "n_examples": 8,
                "outcome": "unlearned", "steps_to_unlearn": steps, "utility_drop_at_unlearned": drop, "uq_final": 0.9,
                "steps_to_forget_mean": 5.0, "memorization_mean": 1.0, "difficulty_mean": 4.0,
                "exposure_gap_bits": 3.0, "nothing_to_forget": nothing, "uq_auc": 0.5,
                "outcomes": {t: {"outcome": "unlearned", "step": steps, "log_ppl_ratio": drop}
                             for t in ("0.5", "0.8", "0.9")}}
    parent = tmp_path / "seeds"
    for seed, steps, drop, nothing in ((0, 8, 0.2, False), (1, 13, 0.4, False), (2, 2, 0.0, True), (3, 10, 0.3, False)):
        write_seed(parent / f"seed_{seed}", seed, [request(steps, drop, nothing)])
    dirs = sorted(parent.glob("seed_*"))
    agg = aggregate_seeds(smoke_config(parent), dirs)
    (parent / "summary.json").write_text(json.dumps(agg))
    steps = agg["cells"][0]["steps_to_unlearn"]
    # seeds 0, 1, 3 (seed 2 had nothing to forget): mean 31/3, t-interval over those seeds by hand
    assert (steps["n"], steps["n_unit"]) == (3, "seeds") and steps["mean"] == pytest.approx(31 / 3)
    half = 4.302652729911275 * np.std([8, 13, 10], ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert steps["hi"] - steps["mean"] == pytest.approx(half)
    compare_runs([parent], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    row = next(line for line in md.split("### Steps to unlearn")[1].splitlines() if line.startswith("| id | 4 |"))
    assert f"{31 / 3:.3g} ± {half:.3g} (n=3 seeds)" in row


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
    ids = [pd.read_parquet(d / "scores/forget.parquet").example_id.tolist() for d in dirs]
    secrets = [pd.read_parquet(d / "scores/original.parquet").nll.sum() for d in dirs]
    assert ids[0] == ids[1] and secrets[0] != secrets[1]  # same layout, different seeds
    agg = json.loads((parent / "summary.json").read_text())
    assert agg["seeds"] == [0, 1]
    runs = [json.loads((d / "summary.json").read_text()) for d in dirs]
    for g in agg["cells"]:  # every replicate group of every seed counts once
        cell = [x for r in runs for x in r["requests"]
                if x["kind"] == g["kind"] and x["repetitions"] == g["repetitions"]]
        assert g["requests"] == len(cell) == sum(g["outcomes"].values()) >= 2
        vals = [x["uq_final"] for x in cell if x.get("uq_final") is not None and np.isfinite(x["uq_final"])]
        assert g["uq_final"]["n"] == len(vals) > 0
        assert g["uq_final"]["mean"] == pytest.approx(np.mean(vals))
    md = (parent / "report" / "compare.md").read_text()
    assert "0, 1" in md and "canary" in md
