"""The ladder: specs and their points, the shipped CPU and GPU ladders, sharing stages between points, and (slow) a
tiny ladder end to end with a kill between points, its resume and re-deciding the stored points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PY, ROOT, smoke_config
from unlearnbench.errors import UserError
from unlearnbench.ladder import load_spec, points

TINY = {"title": "tiny", "preset": "smoke", "overrides": ["attack.enabled=false"],
        "axes": [{"name": "size", "x": "params", "levels": [{"name": "64", "set": []},
                                                            {"name": "32", "set": ["model.hidden_size=32"]}]},
                 {"name": "lr", "levels": [{"name": "1e-3", "set": []},
                                           {"name": "3e-3", "set": ["unlearn.lr=3e-3"]}]}]}


def _spec(tmp_path: Path, doc: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_points_dedupe_and_override_order(tmp_path):
    spec = load_spec(str(_spec(tmp_path, TINY)))
    pts = points(spec, tmp_path / "lad", ["unlearn.max_steps=5", "model.hidden_size=48"])
    assert [p.name for p in pts] == ["base", "size-32", "lr-3e-3"]
    by = {p.name: p for p in pts}
    assert by["base"].levels == [("size", "64"), ("lr", "1e-3")]  # both base levels are the base point
    # the command line changes every point's base; a level's own setting wins over it
    assert by["base"].cfg.model.hidden_size == 48 and by["size-32"].cfg.model.hidden_size == 32
    assert by["lr-3e-3"].cfg.model.hidden_size == 48 and by["lr-3e-3"].cfg.unlearn.lr == 3e-3
    assert all(p.cfg.unlearn.max_steps == 5 and not p.cfg.attack.enabled for p in pts)
    assert by["size-32"].cfg.run.dir == str(tmp_path / "lad" / "points" / "size-32")


@pytest.mark.parametrize("doc, match", [
    ({"preset": "smoke"}, "non-empty list `axes`"),
    ({**TINY, "bogus": 1}, "unknown keys"),
    ({**TINY, "axes": [{"name": "a", "levels": [{"name": "x", "set": ["run.dir=/tmp/x"]}]}]}, "run.dir"),
    ({**TINY, "axes": [{"name": "a", "levels": [{"name": "x", "set": ["model.hidden_size"]}]}]}, "key=value"),
    ({**TINY, "axes": [{"name": "a", "x": "time", "levels": [{"name": "x"}]}]}, "x: level or x: params"),
])
def test_bad_specs_are_refused(tmp_path, doc, match):
    with pytest.raises(UserError, match=match):
        load_spec(str(_spec(tmp_path, doc)))


def test_unknown_ladder_names_the_shipped_ones():
    with pytest.raises(UserError, match="cpu, gpu"):
        load_spec("nope")


def _params(cfg) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.data.vocab_size, hidden_size=m.hidden_size,
                                             intermediate_size=m.intermediate_size, num_hidden_layers=m.n_layers,
                                             num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads,
                                             tie_word_embeddings=m.tie_embeddings))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _forget_share_and_epochs(cfg) -> tuple[float, float]:
    d = cfg.data
    insertions = len(d.kinds) * d.replicates * d.group_size * sum(d.repetitions)
    sequences = d.n_train + insertions
    return insertions / sequences, cfg.train.steps * cfg.train.batch_size / sequences


def test_shipped_cpu_ladder_design(tmp_path):
    """The CPU ladder's points are what docs/ladder.md states: about 0.3M / 1.3M / 5M parameters, a seed-like point
    of about one pass with forget insertions under 10%, repetitions 1/10/100 at 14.8%."""
    by = {p.name: p for p in points(load_spec("cpu"), tmp_path, [])}
    assert sorted(by) == ["base", "regime-1_pass", "repetitions-1_10_100", "roles-ID_Python", "seeds-3", "size-0.3M",
                          "size-5M"]
    assert by["seeds-3"].cfg.run.seeds == [0, 1, 2]
    assert [round(_params(by[n].cfg) / 1e6, 2) for n in ("size-0.3M", "base", "size-5M")] == [0.31, 1.32, 5.0]
    share, epochs = _forget_share_and_epochs(by["base"].cfg)
    assert round(share, 3) == 0.431 and round(epochs, 2) == 4.56
    share, epochs = _forget_share_and_epochs(by["regime-1_pass"].cfg)
    assert share < 0.10 and abs(epochs - 1) < 0.01
    share, epochs = _forget_share_and_epochs(by["repetitions-1_10_100"].cfg)
    assert round(share, 3) == 0.148 and abs(epochs - 1) < 0.01
    assert by["repetitions-1_10_100"].cfg.data.repetitions == [1, 10, 100]
    assert (by["roles-ID_Python"].cfg.data.corpus, by["roles-ID_Python"].cfg.data.domain_corpus) == ("pystdlib", "kjv")


def test_shipped_gpu_ladder_design(tmp_path):
    """Llama sizes from about 25M to 350M parameters, the seed-like regime, 5 seeds."""
    pts = points(load_spec("gpu"), tmp_path, [])
    sizes = sorted(_params(p.cfg) for p in pts if p.name.startswith("size-"))
    assert len(sizes) == 3 and 25e6 <= sizes[0] and sizes[-1] <= 360e6
    for p in pts:
        share, epochs = _forget_share_and_epochs(p.cfg)
        assert p.cfg.run.seeds == [0, 1, 2, 3, 4] and share < 0.10 and abs(epochs - 1) < 0.01


def test_share_stages_by_fingerprint(smoke_study, tmp_path):
    """A run that differs only in unlearning settings shares data, models and scores (and is not retrained); one
    that differs in the model shares only the prepared data."""
    from unlearnbench.records import read_record, share_stages
    from unlearnbench.study import run_study

    src = smoke_study[1]
    dst = tmp_path / "lr"
    cfg = smoke_config(dst, "unlearn.lr=3e-3", "unlearn.request_kinds=[canary]", "attack.enabled=false")
    dst.mkdir()
    assert share_stages(src, dst, cfg) == ["prepare", "train", "score"]
    assert (dst / "models").is_symlink() and read_record(dst, "train")["shared_from"] == os.path.relpath(src, dst)
    trained = (dst / "stages" / "train.json").read_bytes()
    run_study(cfg, "run")
    assert (dst / "stages" / "train.json").read_bytes() == trained  # skipped, not retrained
    assert read_record(dst, "unlearn")["fingerprint"] != read_record(src, "unlearn")["fingerprint"]
    other = tmp_path / "small"
    other.mkdir()
    assert share_stages(src, other, smoke_config(other, "model.hidden_size=32")) == ["prepare"]
    assert share_stages(src, other, smoke_config(other, "model.hidden_size=32")) == []  # nothing more to share


def _ladder(*args: str, timeout: int = 1200, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([PY, "-m", "unlearnbench", "ladder", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, **kw)


@pytest.mark.slow
def test_tiny_gpu_ladder_killed_between_points_resumes_and_redecides(tmp_path):
    """The GPU ladder's own spec at tiny sizes (smoke data, 2 seeds) plus an unlearning axis: the point that
    changes only unlearning shares the trained pairs; a SIGKILL between points, then the same command, finishes
    without recomputing the finished point; --findings-only re-decides the stored points to the same table."""
    doc = yaml.safe_load((ROOT / "src" / "unlearnbench" / "ladders" / "gpu.yaml").read_text())
    doc.update(preset="smoke", overrides=["run.seeds=[0,1]", "attack.enabled=false"])
    doc["axes"][0]["levels"] = [{"name": "tiny", "set": ["model.hidden_size=32", "model.intermediate_size=86"]}]
    doc["axes"].append(TINY["axes"][1])
    spec = _spec(tmp_path, doc, "tinygpu.yaml")
    root = tmp_path / "lad"
    proc = _ladder("--ladder", str(spec), f"run.dir={root}")
    lines = []
    for line in proc.stdout:  # kill it once the first point is done and the second has started
        lines.append(line)
        if line.startswith("[ladder] size-tiny"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    base_train = (root / "points/base/seed_0/stages/train.json").read_bytes()
    proc = _ladder("--ladder", str(spec), f"run.dir={root}")
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out
    assert "already done for this config" in out
    assert (root / "points/base/seed_0/stages/train.json").read_bytes() == base_train
    lr = json.loads((root / "points/lr-3e-3/seed_1/stages/train.json").read_text())
    assert lr["shared_from"] == os.path.relpath(root / "points/base/seed_1", root / "points/lr-3e-3/seed_1")
    assert "shared_from" not in json.loads((root / "points/size-tiny/seed_1/stages/train.json").read_text())
    fresh = json.loads((root / "ladder.json").read_text())
    assert {r["point"] for r in fresh["findings"]} == {"base", "size-tiny", "lr-3e-3"}
    assert all(f["seeds"] == 2 for f in fresh["facts"])
    assert (root / "ladder.md").exists() and list(root.glob("ladder_F*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("points/*/seed_*/stages/*.json") if p.stem != "report"}
    proc = _ladder("--ladder", str(spec), f"run.dir={root}", "--findings-only")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    redecided = json.loads((root / "ladder.json").read_text())
    assert redecided["findings"] == fresh["findings"] and redecided["points"] == fresh["points"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing but the report stage ran again


def test_finding_rows_read_family_verdicts_effects_and_skip_measurements():
    """One row per finding overall and per cell: the cell's family verdict (after Holm) beside its unadjusted one,
    the main target's effect and interval (F4: the main attack's; F3: the Cox log-HR of memorization and its
    interval), n; a block that is not a finding (replicate_spread) gives no row."""
    import math

    from unlearnbench.ladder_report import finding_rows

    cell = {"cell": "r16 canary", "repetitions": 16, "ood_kind": "canary", "main": "0.5", "verdict": "reversed",
            "family_verdict": "not significant",
            "by_target": {"0.5": {"mean": -0.61, "lo": -0.69, "hi": -0.53, "n_informative": 6},
                          "0.8": {"mean": 9.0, "lo": 8.0, "hi": 10.0, "n_informative": 4}}}
    f4 = {**cell, "main": "relearn_forget_fraction", "verdict": "reproduced (OOD recovers more)",
          "family_verdict": "OOD recovers more",
          "by_target": {"relearn_forget_fraction": {"mean": 0.29, "lo": 0.10, "hi": 0.48, "n_informative": 6}}}
    cox = {"coef": math.log(0.5), "coef_lo": math.log(0.25), "coef_hi": math.log(1.0), "hr": 0.5}
    summary = {"findings": {"F1": {"verdict": "not reproduced", "unit": "groups", "contrasts": [cell]},
                            "F3": {"verdict": "reproduced", "unit": "examples within requests",
                                   "kinds": [{"kind": "id", "verdict": "reproduced", "family_verdict": "reproduced",
                                              "cox": {"memorization": cox}, "n": 40}]},
                            "replicate_spread": {"cells": []}},
               "attacks": {"findings": {"F4": {"verdict": "partly reproduced", "unit": "groups", "contrasts": [f4]}}}}
    rows = {(r["finding"], r["where"]): r for r in finding_rows(summary)}
    assert sorted(rows) == [("F1", "overall"), ("F1", "r16 canary"), ("F3", "id"), ("F3", "overall"),
                            ("F4", "overall"), ("F4", "r16 canary")]
    r = rows[("F1", "r16 canary")]
    assert (r["verdict"], r["unadjusted"], r["effect"], r["lo"], r["hi"], r["n"]) == (
        "not significant", "reversed", -0.61, -0.69, -0.53, 6)
    assert rows[("F1", "overall")]["verdict"] == "not reproduced" and rows[("F1", "overall")]["effect"] is None
    r = rows[("F4", "r16 canary")]
    assert (r["verdict"], r["effect"], r["lo"], r["hi"]) == ("OOD recovers more", 0.29, 0.10, 0.48)
    r = rows[("F3", "id")]
    assert r["effect"] == pytest.approx(-0.6931, abs=1e-4) and r["lo"] == pytest.approx(-1.3863, abs=1e-4)
    assert r["hi"] == 0.0 and r["n"] == 40 and r["unit"] == "examples within requests"


def test_ladder_figure_reads_and_passes_the_figure_checks(tmp_path):
    """The ladder figure of a crafted table: a tick per finished point (the params axis on a log scale without
    minor labels), no text outside the canvas, no overlapping or missing tick labels, legend entries for what is
    drawn (a verdict's colour, an inconclusive cell's cross, an interval open on one side) and nothing else."""
    import pandas as pd

    from figure_checks import figure_problems
    from unlearnbench.ladder_report import figure

    spec = load_spec(_spec(tmp_path, TINY))
    pts = points(spec, tmp_path / "lad", [])
    names = [p.name for p in pts]
    assert names == ["base", "size-32", "lr-3e-3"]
    rows = []
    for p, params, (e, lo, hi, v) in zip(names, (40_000, 12_000, 40_000), [(0.5, 0.1, 0.9, "reproduced"),
                                                                           (0.2, -0.3, None, "not significant"),
                                                                           (None, None, None, "inconclusive")]):
        rows += [{"point": p, "params": params, "finding": "F1", "where": "overall", "verdict": v, "effect": None,
                  "lo": None, "hi": None, "measure": "OOD − ID log(1 + steps)"},
                 {"point": p, "params": params, "finding": "F1", "where": "r16 canary", "verdict": v, "effect": e,
                  "lo": lo, "hi": hi, "measure": None}]
    fig = figure(spec, pts, pd.DataFrame(rows), "F1", tmp_path / "ladder_F1.png")
    assert (tmp_path / "ladder_F1.png").exists()
    assert figure_problems(fig) == []
    size_ax, lr_ax = fig.axes[0], fig.axes[1]
    assert size_ax.get_xscale() == "log" and [t.get_text() for t in size_ax.get_xticklabels()] == ["64", "32"]
    assert [t.get_text() for t in lr_ax.get_xticklabels()] == ["1e-3", "3e-3"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["reproduced", "not significant", "inconclusive (no interval)", "interval open on this side",
                      "0: no difference"]
    assert "OOD − ID log(1 + steps)" in fig._suptitle.get_text()
