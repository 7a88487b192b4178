"""The attack stage: relearning raises exposure, recovery is measured against the oracle, quantization is rescored,
membership inference per model, F4 from the numbers; requests that never became unlearned are skipped."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import smoke_config


def test_recovered_share_by_hand():
    from unlearnbench.attacks import recovered_share

    e_att, e_r_att = np.array([5.0, 3.0, 4.0]), np.array([2.0, 2.0, 2.0])
    e_0, e_r = np.array([10.0, 8.0, 9.0]), np.array([1.0, 1.0, 1.0])
    r = recovered_share(e_att, e_r_att, e_0, e_r, n_boot=200, seed=0)
    assert r["recovered"] == pytest.approx(2.0 / 8.0) and r["lo"] <= 0.25 <= r["hi"] and r["n"] == 3


def test_relearning_on_the_forget_examples_brings_exposure_back(smoke_study):
    """From the model saved at the unlearned step, fine-tuning on the request's own examples raises its exposure;
    the same steps from θ₀'s far side (the oracle) raise it less."""
    from unlearnbench.data.build import load_examples, load_tokenizer
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.evaluation import eval_subset
    from unlearnbench.models import load_pretrained, load_trained
    from unlearnbench.stages.attack import request_sets

    _, run = smoke_study
    cfg = smoke_config(run, "attack.relearn_steps=8", "attack.relearn_lr=3e-3")
    done = [p.parent.name for p in sorted((run / "unlearn").glob("*/model_unlearned"))]
    assert done, "the smoke study saves the model of every request that became unlearned"
    name = done[-1]
    ex = load_examples(run / "data")
    columns = ex.select_columns(["example_id", "input_ids", "score_start", "score_end", "split", "text"]).to_dict()
    meta = eval_subset(ex).select_columns(["example_id", "kind", "split"]).to_pandas()
    forget_scores = pd.read_parquet(run / "scores/forget.parquet")
    ids = list(pd.read_parquet(run / "unlearn" / name / "forgetting.parquet").example_id)
    sets = request_sets(cfg, ids, columns, meta, forget_scores)
    assert sorted(sets.seen + sets.held_out) == sorted(ids) and not set(sets.seen) & set(sets.held_out)
    from unlearnbench.attacks import relearning_curve

    row_of = {e: i for i, e in enumerate(columns["example_id"])}
    rows = [columns["input_ids"][row_of[e]] for e in ids]
    spans = [(columns["score_start"][row_of[e]], columns["score_end"][row_of[e]]) for e in ids]
    acc = make_accelerator()
    pad = load_tokenizer(run / "data").pad_token_id or 0
    unlearned = load_pretrained(str(run / "unlearn" / name / "model_unlearned"))
    before = {k: v.clone() for k, v in unlearned.state_dict().items()}
    c = relearning_curve(acc, unlearned, sets, rows, spans, cfg, pad)
    assert list(c.step) == [0, 1, 2, 4, 8]
    assert c.exposure_mean.iloc[-1] > c.exposure_mean.iloc[0] + 1.0  # relearning the forget set brings it back
    assert all(np.array_equal(before[k], v) for k, v in unlearned.state_dict().items())  # the start is untouched
    oracle = relearning_curve(acc, load_trained(run, "oracle"), sets, rows, spans, cfg, pad)
    assert oracle.exposure_mean.iloc[-1] > oracle.exposure_mean.iloc[0]  # the oracle learns them too: the yardstick


def test_attack_stage_outputs_and_f4(smoke_study):
    _, run = smoke_study
    summary = json.loads((run / "attacks" / "summary.json").read_text())
    results = {r["request"]: r for r in summary["requests"]}
    unlearned = {p.parent.name for p in (run / "unlearn").glob("*/model_unlearned")}
    rows = json.loads((run / "unlearn" / "summary.json").read_text())["requests"]
    top = max(g["repetitions"] for g in rows)  # the smoke preset attacks the highest repetitions only
    attacked = {g["request"] for g in rows
                if g["outcome"] == "unlearned" and not g["nothing_to_forget"] and g["repetitions"] == top}
    assert set(results) == attacked and attacked <= unlearned
    # the others of the highest repetitions are skipped, each with its reason (the outcome it ended with)
    skipped = {x["request"]: x["reason"] for x in summary["skipped"]}
    assert set(skipped) == {g["request"] for g in rows if g["repetitions"] == top} - attacked
    for g in rows:
        if g["request"] in skipped:
            assert skipped[g["request"]] == ("it had nothing to forget" if g["nothing_to_forget"] else
                                             f"it never became unlearned (outcome {g['outcome']})")
    assert "findings" not in summary  # F4 is decided by the report stage, from these results
    for r in results.values():
        assert set(r["quantization"]) >= {"none", "int8", "int4"}
        for model in ("original", "unlearned", "oracle"):
            assert set(r["mia"][model]) == {"loss", "zlib", "min_k", "min_k_pp"}
            assert all(0.0 <= v <= 1.0 for v in r["mia"][model].values())
        assert r["mia"]["priv_leak"]["loss"] == pytest.approx(
            (r["mia"]["unlearned"]["loss"] - r["mia"]["oracle"]["loss"]) / r["mia"]["oracle"]["loss"])
        curve = pd.read_parquet(run / "attacks" / r["request"] / "relearning.parquet")
        assert set(curve.variant) == {"retain", "forget_fraction"} and set(curve.start) == {"unlearned", "oracle"}
    f4 = json.loads((run / "summary.json").read_text())["attacks"]["findings"]["F4"]
    assert f4["verdict"] in ("reproduced", "partly reproduced", "not reproduced", "reversed", "inconclusive")
    assert f4["of"] == len(f4["contrasts"])
    md = (run / "report" / "report.md").read_text()
    assert "## Does forgetting last?" in md and f"**F4: {f4['verdict']}**" in md


def test_attack_stage_writes_nothing_outside_attacks(smoke_study, tmp_path):
    """One writer per file: rerunning the attack stage changes files under attacks/ only (besides its own record,
    the resolved config and the shared metrics log every stage appends to)."""
    import hashlib
    import shutil

    from unlearnbench.study import run_study

    def files(run):
        return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in run.rglob("*") if p.is_file() and ".cache" not in p.relative_to(run).parts}

    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run, symlinks=True)
    shutil.rmtree(run / "attacks")
    (run / "stages" / "attack.json").unlink()
    before = files(run)
    run_study(smoke_config(run), "attack")
    after = files(run)
    changed = {f for f in set(before) | set(after) if before.get(f) != after.get(f)}
    assert any(f.startswith("attacks/") for f in changed)
    assert {f for f in changed if not f.startswith("attacks/")} <= {"stages/attack.json", "config.yaml", "metrics.jsonl"}
    assert before["summary.json"] == after["summary.json"] and before["stages/unlearn.json"] == after["stages/unlearn.json"]


def test_attack_columns_in_summary_json_and_curves_in_metrics_jsonl(smoke_study):
    """The report stage's summary.json gives the attacked requests' rows the attack columns and an `attacks` block
    with F4; metrics.jsonl holds each relearning curve on its own step axis, whose last recovered share is the
    result's."""
    cfg, run = smoke_study
    attack_summary = json.loads((run / "attacks" / "summary.json").read_text())
    results = {r["request"]: r for r in attack_summary["requests"]}
    assert results
    summary = json.loads((run / "summary.json").read_text())
    assert summary["attacks"]["requests"] == sorted(results)
    assert summary["attacks"]["relearn_steps"] == cfg.attack.relearn_steps
    assert summary["attacks"]["selection"] == attack_summary["selection"] == cfg.attack.requests
    for g in summary["requests"]:
        assert g["attacked"] == (g["request"] in results)
        if not g["attacked"]:
            assert not [k for k in g if k.startswith("attack_")]
            continue
        r = results[g["request"]]
        assert g["attack_relearn_retain_recovered"] == pytest.approx(r["relearn_retain"]["recovered"], nan_ok=True)
        assert g["attack_relearn_forget_fraction_recovered"] == pytest.approx(
            r["relearn_forget_fraction"]["recovered"], nan_ok=True)
        assert "attack_quant_int8_recovered" in g and "attack_quant_int4_uq" in g
        for model in ("original", "unlearned", "oracle"):
            for att in ("loss", "zlib", "min_k", "min_k_pp"):
                assert g[f"attack_mia_{att}_auc_{model}"] == r["mia"][model][att]
        assert g["attack_mia_loss_priv_leak"] == r["mia"]["priv_leak"]["loss"]

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for name, r in results.items():
        for v in ("retain", "forget_fraction"):
            key = f"attack/relearn/{name}/{v}/recovered"
            curve = [(rec["attack/step"], rec[key]) for rec in records if key in rec]
            assert [s for s, _ in curve] == [0, 1, 2, 4], key  # relearn_steps=4 in the smoke preset
            assert curve[-1][1] == pytest.approx(r[f"relearn_{v}"]["recovered"], rel=1e-6, nan_ok=True)
            for start in ("unlearned", "oracle"):
                assert any(f"attack/relearn/{name}/{v}/{start}/exposure_mean" in rec for rec in records)
        assert any(rec.get("record") == "summary" and f"attack/{name}/attack_mia_loss_auc_unlearned" in rec
                   for rec in records)


def test_assign_keeps_kinds_together_and_covers_every_request_once():
    """Job-parallel attacks: contiguous runs of the kind-sorted requests, near-equal in length, so a process
    meets few kinds (each kind's θ₀/θᵣ work is done once per process that meets it)."""
    from unlearnbench.stages.attack import assign

    names = ["id_r16_g2", "canary_r16_g1", "domain_r16_g0", "id_r16_g0", "canary_r16_g0", "domain_r16_g2",
             "canary_r16_g2", "id_r16_g1"]
    reqs = [{"request": n} for n in names]
    kinds = {n: (n.split("_")[0],) for n in names}
    got = [[r["request"] for r in assign(reqs, kinds, 2, rank)] for rank in range(2)]
    assert got == [["canary_r16_g0", "canary_r16_g1", "canary_r16_g2", "domain_r16_g0"],
                   ["domain_r16_g2", "id_r16_g0", "id_r16_g1", "id_r16_g2"]]
    got3 = [[r["request"] for r in assign(reqs, kinds, 3, rank)] for rank in range(3)]
    assert got3 == [["canary_r16_g0", "canary_r16_g1", "canary_r16_g2"], ["domain_r16_g0", "domain_r16_g2"],
                    ["id_r16_g0", "id_r16_g1", "id_r16_g2"]]  # cuts at 3 and 5, nearest to 8/3 and 16/3
    assert [len(assign(reqs[:1], kinds, 4, rank)) for rank in range(4)] == [0, 0, 1, 0]
    assert [r["request"] for r in assign(reqs, kinds, 1, 0)] == sorted(names, key=lambda n: (n.split("_")[0], n))
    # weighted by cost (tokens a pass reads: canary 14, domain 19, id 22; total 146): the cut nearest 73 is after
    # the domain requests (80) rather than after the first (61)
    cost = {n: {"canary": 14, "domain": 19, "id": 22}[n.split("_")[0]] for n in names}
    got_w = [[r["request"] for r in assign(reqs, kinds, 2, rank, cost)] for rank in range(2)]
    assert got_w == [["canary_r16_g0", "canary_r16_g1", "canary_r16_g2", "domain_r16_g0", "domain_r16_g2"],
                     ["id_r16_g0", "id_r16_g1", "id_r16_g2"]]


def test_shared_baselines_match_a_per_request_computation(smoke_study, tmp_path):
    """θᵣ's retain relearning, quantized θ₀ and θ₀'s MIA scores are measured once per kind on the union of its
    attacked requests; what a request records from that union equals the same attacks run on the request alone."""
    import shutil

    from unlearnbench import attacks
    from unlearnbench.data.build import load_examples, load_tokenizer
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.evaluation import eval_subset
    from unlearnbench.metrics import mia
    from unlearnbench.models import load_trained
    from unlearnbench.quantize import quantize_model
    from unlearnbench.rundir import Context
    from unlearnbench.scoring import token_score_pass
    from unlearnbench.stages.attack import Attacker, kinds_of, request_sets

    cfg, smoke_run = smoke_study
    run = tmp_path / "run"  # a copy: the request's files are rewritten
    shutil.copytree(smoke_run, run, symlinks=True)
    cfg = smoke_config(run)
    r = json.loads((run / "attacks" / "summary.json").read_text())["requests"][0]
    ex = load_examples(run / "data")
    columns = ex.select_columns(["example_id", "input_ids", "score_start", "score_end", "split", "text"]).to_dict()
    meta = eval_subset(ex).select_columns(["example_id", "kind", "split"]).to_pandas()
    forget_scores = pd.read_parquet(run / "scores/forget.parquet")
    ids = list(pd.read_parquet(run / "unlearn" / r["request"] / "forgetting.parquet").example_id)
    kinds = kinds_of(forget_scores, ids)
    others = list(forget_scores[(forget_scores.kind == r["kind"]) & ~forget_scores.example_id.isin(ids)].example_id)
    assert others, "another group of the same kind makes the union larger than the request"
    sets = request_sets(cfg, ids, columns, meta, forget_scores)
    acc, tok = make_accelerator(), load_tokenizer(run / "data")
    pad = tok.pad_token_id or 0
    res = Attacker(Context(cfg=cfg, run_dir=run, acc=acc), columns, meta, forget_scores, tok,
                   {kinds: others[:8] + ids + others[8:]}).request(r, sets, kinds)
    oracle, original = load_trained(run, "oracle"), load_trained(run, "original")

    retain = [i for i, s in enumerate(columns["split"]) if s == "retain"]
    alone = attacks.relearning_curve(acc, oracle, sets, [columns["input_ids"][i] for i in retain],
                                     [(columns["score_start"][i], columns["score_end"][i]) for i in retain], cfg, pad)
    curve = pd.read_parquet(run / "attacks" / r["request"] / "relearning.parquet")
    shared = curve[(curve.variant == "retain") & (curve.start == "oracle")]
    assert list(shared.step) == list(alone.step) == [0, 1, 2, 4]
    np.testing.assert_allclose(shared.exposure_mean, alone.exposure_mean, atol=1e-5)
    np.testing.assert_allclose(shared.exposure_held_out_mean, alone.exposure_held_out_mean, atol=1e-5)

    m = cfg.metrics
    e8 = attacks.exposure_of(acc, quantize_model(original, 8), sets, m.loss, m.exposure, cfg.score.batch_size, pad)
    assert res["quantization"]["int8"]["exposure_original_mean"] == pytest.approx(float(e8.mean()), abs=1e-5)

    scored = sets.meta[["example_id"]].merge(token_score_pass(acc, original, sets.data, cfg.score.batch_size, pad,
                                                              local=True), on="example_id")
    member = scored.example_id.isin(ids).to_numpy()
    nll = scored.nll.to_numpy()
    assert res["mia"]["original"]["loss"] == pytest.approx(mia.auc(-nll[member], -nll[~member]), abs=1e-9)
    # and the whole result is the one the stage recorded when the union was the request itself
    for key in ("relearn_retain", "relearn_forget_fraction"):
        assert res[key]["recovered"] == pytest.approx(r[key]["recovered"], abs=1e-5)
    for model, aucs in r["mia"].items():
        assert res["mia"][model] == pytest.approx(aucs, abs=1e-9), model
