"""The report's figures, checked on their rendered artists (tests/figure_checks.py, whose own tests are
test_figure_checks.py) rather than by eye: every text inside the canvas, no overlapping tick labels, every scale
readable, legend entries and drawn marks in agreement; the F1/F2 effects each on a scale of their own with the points
behind them and their verdict; kinds named after the run's corpora."""

import json
import math
import shutil

import pytest
from matplotlib.colors import to_hex
from matplotlib.legend import Legend

from figure_checks import legend_problems, overlapping_ticks, texts_outside, unlabelled_axes
from unlearnbench.reporting.style import FIGURES, kind_labels, log_ticks, verdict_colour


# ---------------------------------------------------------------------------------------------- the eleven figures


@pytest.fixture(scope="module")
def smoke_figures(smoke_study):
    from unlearnbench.io import read_json
    from unlearnbench.reporting.attack_figures import build_attack_figures
    from unlearnbench.reporting.run_figures import run_figures
    from unlearnbench.reporting.run_report import run_kind_labels
    from unlearnbench.results import load_curves, load_run

    _, run_dir = smoke_study
    run = load_run(run_dir)
    summary = read_json(run_dir / "summary.json")
    labels = run_kind_labels(run_dir)
    figs = run_figures(summary, load_curves(run_dir, run.requests), run.forgetting, labels)
    figs.update(build_attack_figures(run_dir, run.attack_results, labels))
    return figs, summary, labels


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_of_the_smoke_run_passes_every_check(smoke_figures, name):
    figs, _, _ = smoke_figures
    assert sorted(figs) == sorted(FIGURES)
    fig = figs[name]
    assert texts_outside(fig) == []
    assert overlapping_ticks(fig) == []
    assert unlabelled_axes(fig) == []
    assert legend_problems(fig) == []


def test_the_smoke_figures_name_the_runs_corpora(smoke_figures, smoke_study):
    figs, _, labels = smoke_figures
    manifest = json.loads((smoke_study[1] / "data" / "manifest.json").read_text())
    assert labels == kind_labels(manifest["corpora"])
    texts = [t.get_text() for lg in figs["exposure_trajectories"].legends for t in lg.get_texts()]
    assert labels["id"] in texts and labels["id"] != "ID"


def test_kind_labels_follow_the_corpora():
    assert kind_labels({"id": "kjv", "domain": "pydoc"}) == {"id": "ID (KJV)", "canary": "OOD canary",
                                                            "domain": "OOD domain (pydoc)"}
    assert kind_labels({"id": "pystdlib", "domain": "kjv"})["id"] == "ID (pystdlib)"
    assert kind_labels({"id": "/data/my_corpus.jsonl"})["id"] == "ID (my_corpus)"
    assert kind_labels(None) == {"id": "ID", "canary": "OOD canary", "domain": "OOD domain"}


def test_a_run_whose_id_corpus_is_pystdlib_is_labelled_so(smoke_study, tmp_path):
    """The report reads data/manifest.json: a run whose ID corpus is pystdlib says so in its figures."""
    from unlearnbench.io import read_json
    from unlearnbench.reporting.run_figures import run_figures
    from unlearnbench.reporting.run_report import run_kind_labels
    from unlearnbench.results import load_curves, load_run

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_study[1] / "data", run_dir / "data", ignore=shutil.ignore_patterns("examples", "tokenizer"))
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    manifest["corpora"] = {"id": "pystdlib", "domain": "kjv", "python": "3.11"}
    (run_dir / "data" / "manifest.json").write_text(json.dumps(manifest))
    labels = run_kind_labels(run_dir)
    assert (labels["id"], labels["domain"]) == ("ID (pystdlib)", "OOD domain (KJV)")
    run = load_run(smoke_study[1])
    figs = run_figures(read_json(smoke_study[1] / "summary.json"), load_curves(smoke_study[1], run.requests),
                       run.forgetting, labels)
    texts = {t.get_text() for lg in figs["survival"].findobj(Legend) for t in lg.get_texts()}
    assert any(t.startswith("ID (pystdlib)") for t in texts) and not any(t.startswith("ID (KJV)") for t in texts)


@pytest.mark.parametrize("lo,hi", [(1.0, 2.0), (0.9, 1.3), (1.0, 3e5), (1.0, 1e12), (0.5, 40.0)])
def test_log_ticks_are_few_and_inside(lo, hi):
    ticks = log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 6 and all(lo * 0.99 <= t <= hi * 1.01 for t in ticks)


# ---------------------------------------------------------------------------------------------- the effects


def _readout(mean, lo, hi, ids, oods, censored=()):
    values = {"id": [{"request": f"id_g{i}", "seed": 0, "value": v, "censored": False} for i, v in enumerate(ids)],
              "ood": [{"request": f"ood_g{i}", "seed": 0, "value": v, "censored": i in censored}
                      for i, v in enumerate(oods)]}
    return {"mean": mean, "lo": lo, "hi": hi, "n_informative": len(ids) + len(oods), "values": values,
            "counts": {}, "verdict": "not reproduced"}


def _cell(reps, ood, readout, family):
    return {"cell": f"r{reps} {ood}", "repetitions": reps, "ood_kind": ood, "main": "uq_0.9", "verdict": "x",
            "family_verdict": family, "by_target": {"uq_0.9": readout}}


def synthetic_summary():
    """F1/F2 with one cell whose interval is ~100x wider than the others' and one without an interval."""
    f1 = [_cell(4, "canary", _readout(-0.5, -0.88, -0.13, [1.8, 1.9, 2.0], [1.3, 1.4, 1.5]), "reversed"),
          _cell(4, "domain", _readout(0.3, 0.1, 0.5, [1.8, 1.9, 2.0], [2.1, 2.2, 2.3], censored=(2,)), "reproduced"),
          _cell(16, "domain", _readout(9.0, -82.7, 101.0, [2.0, 2.5], [2.0, 30.0]), "not significant"),
          _cell(1, "canary", _readout(None, None, None, [1.0], [4.6], censored=(0,)), "inconclusive")]
    f2 = [_cell(4, "canary", _readout(0.34, 0.003, 0.68, [0.3, 0.5, 0.28], [0.01, 0.02, 0.0]), "not significant"),
          _cell(16, "domain", _readout(-1.0, -39.8, 35.5, [0.1, 0.2], [0.1, 9.0]), "not significant")]
    return {"uq_target": 0.9, "findings": {"F1": {"contrasts": f1}, "F2": {"contrasts": f2}}}


def test_each_effect_has_a_scale_of_its_own_with_its_points_and_verdict():
    from unlearnbench.reporting.effects_figure import fig_effects

    summary = synthetic_summary()
    fig = fig_effects(summary, kind_labels({"id": "kjv", "domain": "pydoc"}))
    assert texts_outside(fig) == [] and overlapping_ticks(fig) == [] and legend_problems(fig) == []
    assert unlabelled_axes(fig) == []
    axes = {ax.get_label(): ax for ax in fig.findobj(lambda a: hasattr(a, "get_ylim") and a.get_label())}
    for key, f in summary["findings"].items():
        for c in f["contrasts"]:
            e = c["by_target"]["uq_0.9"]
            eff, val = axes[f"{key} {c['cell']} effect"], axes[f"{key} {c['cell']} values"]
            # the verdict after Holm below the panel, in its colour
            assert val.get_xlabel().startswith(c["family_verdict"])
            box = val.xaxis.label.get_bbox_patch().get_facecolor()
            assert to_hex(box) == to_hex(verdict_colour(c["family_verdict"]))
            # every request's value drawn on the left axis: filled, or hollow triangles when censored
            pts = [(y, ln.get_marker(), ln.get_markerfacecolor()) for ln in val.lines if ln.get_linestyle() == "None"
                   for y in ln.get_ydata()]
            want = sorted(v["value"] for side in ("id", "ood") for v in e["values"][side])
            assert sorted(p[0] for p in pts) == pytest.approx(want)
            n_cens = sum(v["censored"] for side in ("id", "ood") for v in e["values"][side])
            assert sum(m == "^" and str(face) == "none" for _, m, face in pts) == n_cens
            y0, y1 = val.get_ylim()
            assert y0 <= min(want) and max(want) <= y1
            if e["mean"] is None:
                continue
            lo, hi = eff.get_ylim()
            assert lo <= e["lo"] and e["hi"] <= hi and lo <= 0 <= hi  # its own interval, and 0, fit its axis
            assert (e["hi"] - e["lo"]) / (hi - lo) > 0.5  # and fill most of it: a small interval is no flat mark


def test_an_open_interval_gets_an_arrow_and_the_seeds_their_contrasts():
    from unlearnbench.reporting.effects_figure import fig_effects

    r = _readout(0.4, None, 0.9, [1.0, 1.2, 1.1], [1.5, 1.6, 1.4], censored=(1,))
    r["seed_effects"] = [0.2, 0.5, 0.5]
    fig = fig_effects({"uq_target": 0.9, "findings": {"F1": {"contrasts": [_cell(4, "domain", r, "not significant")]}}},
                      kind_labels())
    assert texts_outside(fig) == [] and legend_problems(fig) == []
    eff = next(ax for ax in fig.axes if ax.get_label() == "F1 r4 domain effect")
    arrows = [t for t in eff.texts if getattr(t, "arrow_patch", None) is not None]
    assert len(arrows) == 1 and arrows[0].xy[1] == pytest.approx(eff.get_ylim()[0])  # down to the axis' edge
    seeds = [ln for ln in eff.lines if ln.get_marker() == "s"]
    assert sorted(seeds[0].get_ydata()) == [0.2, 0.5, 0.5]
    assert "−∞" in next(ax for ax in fig.axes if ax.get_label() == "F1 r4 domain values").get_title()
    assert not math.isnan(eff.get_ylim()[0])
