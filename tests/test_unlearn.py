"""The unlearning loop and the smoke study end to end: outputs, UQ at step 0, stopping, collapse, 2 processes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import launch, smoke_config
from unlearnbench.errors import UserError
from unlearnbench.study import run_study
from unlearnbench.unlearn.request import eval_steps

REQUESTS = [f"{k}_r{r}" for k in ("canary", "domain", "id") for r in (1, 4, 16)]


def _copy(smoke_study, dest):
    shutil.copytree(smoke_study[1], dest)
    return dest


def test_eval_schedule():
    cfg = smoke_config("/tmp/x", "unlearn.max_steps=100")
    assert eval_steps(cfg) == [0, 1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 65, 80, 100]
    cfg = smoke_config("/tmp/x", "unlearn.max_steps=12", "unlearn.eval_schedule=every", "unlearn.eval_every=5")
    assert eval_steps(cfg) == [0, 5, 10, 12]


def test_smoke_study_writes_every_output(smoke_study):
    cfg, run = smoke_study
    for path in ["config.yaml", "data/manifest.json", "models/original/model.safetensors",
                 "models/oracle/model.safetensors", "scores/original.parquet", "scores/oracle.parquet",
                 "scores/forget.parquet", "unlearn/summary.json", "summary.json", "report/report.md",
                 "metrics.jsonl"]:
        assert (run / path).exists(), path
    forget_scores = pd.read_parquet(run / "scores/forget.parquet")
    assert len(forget_scores) == 9 * cfg.data.group_size
    for name in REQUESTS:
        d = run / "unlearn" / name
        result = json.loads((d / "result.json").read_text())
        curve = pd.read_parquet(d / "curve.parquet")
        traj = pd.read_parquet(d / "trajectory.parquet")
        assert curve.step.iloc[0] == 0
        if result["nothing_to_forget"]:  # the gap is below the floor: UQ_0 = 1 - |gap| / floor
            assert curve.uq.iloc[0] == pytest.approx(1 - abs(result["exposure_gap_bits"]) / cfg.metrics.uq_min_gap_bits)
        else:
            assert curve.uq.iloc[0] == 0.0  # as exposed as before, by definition
        assert set(traj.step) == set(curve.step)
        assert len(traj) == len(curve) * cfg.data.group_size
        assert set(traj.columns) >= {"example_id", "step", "nll", "exposure", "forgotten"}
        assert set(curve.columns) >= {"uq", "uq_lo", "uq_hi", "id_holdout_ppl", "utility_drop", "train_loss", "lr",
                                      "tokens_per_s", "forget_quality"}
        assert result["steps_run"] <= cfg.unlearn.max_steps
        forgetting = pd.read_parquet(d / "forgetting.parquet")
        assert forgetting.steps_to_forget.between(0, cfg.unlearn.max_steps).all()
        # never-forgotten examples are censored at the last valid evaluation (not the one that found a collapse)
        collapsed_there = result["collapsed"] and "perplexity" in result["stop_reason"]
        last = curve.step.iloc[-2] if collapsed_there else curve.step.iloc[-1]
        assert (forgetting.steps_to_forget[forgetting.censored] == last).all()
        # the outcome at the target agrees with the crossing, and is never a sentinel number
        o = result["outcomes"][f"{cfg.metrics.uq_target:g}"]
        assert o["outcome"] == result["outcome"]
        assert (o["outcome"] == "unlearned") == (result["steps_to_unlearn"] is not None)
        if o["outcome"] == "unlearned":
            assert o["grid_step"] == result["steps_to_unlearn"] and o["step"] <= o["grid_step"]
        assert (forgetting.steps_to_forget[~forgetting.censored].isin(curve.step)).all()
        # exposure under θ₀ measured in the loop equals the score stage's
        ex = forget_scores.set_index("example_id").loc[forgetting.example_id]
        np.testing.assert_allclose(forgetting.exposure_original, ex.exposure_original, rtol=1e-4, atol=1e-4)
    unlearn = json.loads((run / "unlearn" / "summary.json").read_text())
    assert [g["request"] for g in unlearn["requests"]] == REQUESTS  # (kind, repetitions) groups, in order
    assert sum(unlearn["outcomes"].values()) == len(REQUESTS)
    summary = json.loads((run / "summary.json").read_text())
    assert {g["request"] for g in summary["requests"]} == set(REQUESTS)
    for key in ("F1", "F2", "F3"):
        assert summary["findings"][key]["verdict"] in ("reproduced", "partly reproduced", "not reproduced",
                                                       "reversed", "inconclusive")
    # F1's verdict is what its cells say, and each cell's what its main target's effect says
    f1 = summary["findings"]["F1"]
    assert f1["holds"] == sum(c["verdict"] == "reproduced" for c in f1["contrasts"])
    assert all(c["verdict"] == c["by_target"][c["main"]]["verdict"] for c in f1["contrasts"])
    # one replicate per cell in the smoke preset: no interval, so every cell is inconclusive, never a verdict
    assert all(c["verdict"] == "inconclusive" for c in f1["contrasts"] + summary["findings"]["F2"]["contrasts"])


def test_ga_raises_uq_on_a_memorized_canary(smoke_study):
    _, run = smoke_study
    curve = pd.read_parquet(run / "unlearn/canary_r16/curve.parquet")
    assert curve.uq.iloc[0] == 0.0
    assert curve.uq.max() > 0.5
    assert curve.exposure_mean.iloc[0] > curve.exposure_oracle_mean.iloc[0] + 1.0  # memorized: > 1 bit above θᵣ
    assert curve.forget_nll.iloc[-1] > curve.forget_nll.iloc[0]  # gradient ascent raised the loss


def test_stopping_rules(smoke_study, tmp_path):
    run = _copy(smoke_study, tmp_path / "stop")
    cfg = smoke_config(run, "unlearn.request_kinds=[domain]", "unlearn.patience=2")
    run_study(cfg, "unlearn", force=True)
    statuses = []
    for r in (4, 16):
        res = json.loads((run / f"unlearn/domain_r{r}/result.json").read_text())
        statuses.append(res["status"])
        curve = pd.read_parquet(run / f"unlearn/domain_r{r}/curve.parquet")
        if res["status"] == "target":  # target held for 2 consecutive evaluations at some point, and (with
            # unlearn.until_all_forgotten, on by default) every example forgotten at the last one, then stopped
            above = (curve.uq >= cfg.metrics.uq_target).astype(int)
            assert (above + above.shift(1, fill_value=0) == 2).any()
            assert curve.forgotten_fraction.iloc[-1] == 1.0 and "every example is forgotten" in res["stop_reason"]
            assert res["steps_run"] == curve.step.iloc[-1]
    assert "target" in statuses  # the rule above was exercised
    cfg = smoke_config(run, "unlearn.request_kinds=[domain]", "unlearn.stop_on_target=false", "unlearn.max_steps=8")
    run_study(cfg, "unlearn", force=True)
    for r in (1, 4, 16):
        res = json.loads((run / f"unlearn/domain_r{r}/result.json").read_text())
        assert res["steps_run"] == 8 or res["collapsed"]


def test_huge_learning_rate_collapses_without_failing_the_study(smoke_study, tmp_path):
    run = _copy(smoke_study, tmp_path / "collapse")
    cfg = smoke_config(run, "unlearn.lr=50.0", "unlearn.request_kinds=[id,canary]")
    run_study(cfg, "unlearn", force=True)
    results = [json.loads((run / f"unlearn/{k}_r{r}/result.json").read_text()) for k in ("id", "canary")
               for r in (1, 4, 16)]
    assert all(r["collapsed"] for r in results)
    assert all(r["stop_reason"] for r in results)
    assert (run / "unlearn" / "summary.json").exists()


def test_bad_requests_fail_before_compute(smoke_study, tmp_path):
    run = _copy(smoke_study, tmp_path / "bad")
    cfg = smoke_config(run, "unlearn.requests=ids", "unlearn.example_ids=[nope-1]")
    with pytest.raises(UserError, match="nope-1"):
        run_study(cfg, "unlearn", force=True)
    # refused before anything was computed or removed: the earlier results are all still there
    assert len(list((run / "unlearn").glob("*/result.json"))) == 9 and (run / "unlearn" / "summary.json").exists()


def test_rerun_is_skipped_and_other_config_refused(smoke_study, tmp_path, capsys):
    cfg, _ = smoke_study
    run = _copy(smoke_study, tmp_path / "rerun")
    run_study(smoke_config(run), "unlearn")
    assert "already done" in capsys.readouterr().out
    with pytest.raises(UserError, match="different config"):
        run_study(smoke_config(run, "unlearn.lr=0.01"), "unlearn")


def test_job_parallel_is_identical_to_sequential(smoke_study, tmp_path):
    overrides = ["unlearn.request_kinds=[canary]", "unlearn.max_steps=6"]
    one = _copy(smoke_study, tmp_path / "seq")
    run_study(smoke_config(one, *overrides), "unlearn", force=True)
    two = _copy(smoke_study, tmp_path / "par")
    res = launch("unlearn", "--preset", "smoke", "--force", f"run.dir={two}", "unlearn.parallel=jobs", *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "job-parallel" in res.stdout
    for r in (1, 4, 16):
        a = pd.read_parquet(one / f"unlearn/canary_r{r}/trajectory.parquet")
        b = pd.read_parquet(two / f"unlearn/canary_r{r}/trajectory.parquet")
        # the same computation on one process each: identical up to thread-level float reordering
        np.testing.assert_allclose(a.nll, b.nll, rtol=1e-5)
        assert (a.forgotten == b.forgotten).all()
    s1, s2 = (json.loads((d / "unlearn" / "summary.json").read_text()) for d in (one, two))
    assert [g["steps_to_unlearn"] for g in s1["requests"]] == [g["steps_to_unlearn"] for g in s2["requests"]]
    # every process saves the models of the requests it ran (transformers saves on rank 0 only unless told)
    for g in s2["requests"]:
        if g["steps_to_unlearn"] is not None:
            assert list((two / "unlearn" / g["request"] / "model_unlearned").glob("model*.safetensors")), g["request"]


def test_two_process_unlearn_matches_one(smoke_study, tmp_path):
    overrides = ["unlearn.request_kinds=[canary]", "unlearn.max_steps=6", "unlearn.parallel=data"]
    one = _copy(smoke_study, tmp_path / "one")
    run_study(smoke_config(one, *overrides), "unlearn", force=True)
    two = _copy(smoke_study, tmp_path / "two")
    res = launch("unlearn", "--preset", "smoke", "--force", f"run.dir={two}", *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    for r in (1, 4, 16):
        a = pd.read_parquet(one / f"unlearn/canary_r{r}/curve.parquet")
        b = pd.read_parquet(two / f"unlearn/canary_r{r}/curve.parquet")
        assert list(a.step) == list(b.step)
        # Same global batch and loss normalisation; the all-reduce only reorders float sums, so after 6 Adam
        # steps exposures agree to ~1e-4 bits and perplexities to ~1e-5 relative.
        np.testing.assert_allclose(a.exposure_mean, b.exposure_mean, atol=1e-2)
        np.testing.assert_allclose(a.id_holdout_ppl, b.id_holdout_ppl, rtol=1e-3)
        np.testing.assert_allclose(a.uq, b.uq, atol=1e-2)
        np.testing.assert_allclose(a.train_loss.dropna(), b.train_loss.dropna(), rtol=1e-4)


def test_in_loop_reference_sample_is_consistent(smoke_study, tmp_path):
    """A sampled evaluation: e₀ and θᵣ's exposure are the score stage's (every reference); the full final check
    agrees with the score stage; the sample is the same for every evaluator; result.json carries both."""
    from unlearnbench import metrics
    from unlearnbench.data.build import load_examples
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.models import load_pretrained, load_trained
    from unlearnbench.evaluation import RequestEvaluator, eval_subset
    from unlearnbench.rundir import Context
    from unlearnbench.scoring import score_pass

    _, run = smoke_study
    cfg = smoke_config(run, "unlearn.eval_references=64", "unlearn.eval_utility=40")
    subset = eval_subset(load_examples(run / "data"))
    meta = subset.select_columns(["example_id", "kind", "repetitions", "split"]).to_pandas()
    forget_scores = pd.read_parquet(run / "scores/forget.parquet")
    ids = sorted(forget_scores[(forget_scores.kind == "canary") & (forget_scores.repetitions == 16)].example_id)
    ctx = Context(cfg=cfg, run_dir=run, acc=make_accelerator())

    def evaluator():
        return RequestEvaluator(ctx.acc, cfg, ids, subset, meta, forget_scores, 0, True)

    ev = evaluator()
    m = ev.meta
    assert ev.sampled and (m.split == "reference").sum() == 64 and (m.kind == "canary").sum() == 64 + len(ids)
    assert m[m.split == "holdout"].groupby("kind").size().to_dict() == {"domain": 40, "id": 40}
    assert (m.split == "retain").sum() == 40
    assert list(evaluator().meta.example_id) == list(m.example_id)  # seeded: the same sample every time
    t = forget_scores.set_index("example_id").loc[ids]
    np.testing.assert_array_equal(ev.e_r, t.exposure_extrapolated_oracle.to_numpy())
    np.testing.assert_array_equal(ev.e_0, t.exposure_extrapolated_original.to_numpy())
    model = load_trained(run, "original", "float32")
    full = ev.evaluate_full(model)  # θ₀ against every reference: the score stage's numbers, UQ 0
    assert abs(full["uq_final_all"]) < 1e-6
    assert full["exposure_final_all_mean"] == pytest.approx(
        forget_scores.set_index("example_id").loc[ids, "exposure_extrapolated_original"].mean(), rel=1e-6)
    utility = json.loads((run / "scores/utility.json").read_text())["original"]
    assert full["id_holdout_ppl_final_all"] == pytest.approx(utility["id_holdout_ppl"], rel=1e-6)

    run2 = _copy(smoke_study, tmp_path / "sampled")
    run_study(smoke_config(run2, "unlearn.eval_references=64", "unlearn.eval_utility=40", "unlearn.save_model=true",
                           "unlearn.request_kinds=[canary]", "unlearn.max_steps=4"), "unlearn", force=True)
    res = json.loads((run2 / "unlearn/canary_r16/result.json").read_text())
    assert res["in_loop_sample"] == {"examples": len(m), "all": len(ev.full_meta)}
    # the full final check, assembled by hand from the saved final model's scores on every example
    final = load_pretrained(str(run2 / "unlearn/canary_r16/model"))
    scores, _ = score_pass(ctx.acc, final, subset, batch_size=64)
    sc = meta.merge(scores, on="example_id").set_index("example_id")
    refs = sc[(sc.split == "reference") & (sc.kind == "canary")].nll.to_numpy()
    e_t = metrics.extrapolated_exposure(sc.loc[ids, "nll"].to_numpy(), refs)
    t = forget_scores.set_index("example_id").loc[ids]
    uq = metrics.unlearning_quality(e_t, t.exposure_extrapolated_original.to_numpy(),
                                    t.exposure_extrapolated_oracle.to_numpy(), cfg.metrics.uq_min_gap_bits).uq
    # this pass batches every example, the check only the request's sets: other batch shapes round differently
    # (about 1e-6 nats per example, README "Scoring"), which moved UQ by 3.7e-6 on an Intel Xeon (and 0 on an EPYC)
    assert res["uq_final_all"] == pytest.approx(uq, abs=2e-5)
    assert res["exposure_final_all_mean"] == pytest.approx(e_t.mean(), rel=1e-5)
    hold = sc[(sc.split == "holdout") & (sc.kind == "id")]
    assert res["id_holdout_ppl_final_all"] == pytest.approx(np.exp(hold.nll_sum.sum() / hold.n_tokens.sum()), rel=1e-6)
    plain = json.loads((smoke_study[1] / "unlearn/canary_r16/result.json").read_text())
    # the defaults score every reference in the loop and sample only the utility sets: the check's UQ is the loop's
    assert plain["in_loop_sample"]["examples"] < plain["in_loop_sample"]["all"]
    assert plain["uq_final_all"] == pytest.approx(plain["uq_final"], abs=1e-6)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_exploding_gradient_stops_the_request_and_keeps_the_last_good_state(smoke_study, tmp_path):
    """A gradient norm over unlearn.max_grad_norm at the first step: collapsed, the reason names the limit, and the
    saved model is θ₀ untouched (the offending update is never applied)."""
    run = _copy(smoke_study, tmp_path / "explode")
    run_study(smoke_config(run, "unlearn.max_grad_norm=1e-6", "unlearn.request_kinds=[canary]",
                           "unlearn.save_model=true"), "unlearn", force=True)
    for r in (1, 4, 16):
        res = json.loads((run / f"unlearn/canary_r{r}/result.json").read_text())
        assert res["status"] == "collapsed" and res["steps_run"] == 0
        assert "gradient norm" in res["stop_reason"] and "max_grad_norm=1e-06" in res["stop_reason"]
        assert list(pd.read_parquet(run / f"unlearn/canary_r{r}/curve.parquet").step) == [0]
    saved, original = _weights(run / "unlearn/canary_r16/model"), _weights(run / "models/original")
    assert saved.keys() == original.keys()
    assert all((saved[k] == original[k]).all() for k in saved)
    assert (run / "unlearn" / "summary.json").exists()  # the study went on to its summary


def test_non_finite_loss_keeps_the_state_before_that_step(smoke_study, tmp_path, monkeypatch):
    """A NaN loss at step 3: the request stops there, and its saved model is bit-identical to a run that simply
    stopped after 3 steps."""
    import dataclasses

    import unlearnbench.unlearn.request as loop

    base = ["unlearn.request_kinds=[canary]", "unlearn.save_model=true", "unlearn.stop_on_target=false"]
    clean = _copy(smoke_study, tmp_path / "clean")
    run_study(smoke_config(clean, *base, "unlearn.max_steps=3"), "unlearn", force=True)

    real = loop.get_method

    def poisoned(name):
        spec, calls = real(name), {"n": 0}

        def fn(inputs, params):
            loss, stats = spec.fn(inputs, params)
            calls["n"] += 1
            return (loss * float("nan") if calls["n"] == 4 else loss), stats  # the 4th call is step 3
        return dataclasses.replace(spec, fn=fn)

    monkeypatch.setattr(loop, "get_method", poisoned)
    nan = _copy(smoke_study, tmp_path / "nan")
    run_study(smoke_config(nan, *base, "unlearn.max_steps=10"), "unlearn", force=True)
    for r in (1, 4, 16):
        res = json.loads((nan / f"unlearn/canary_r{r}/result.json").read_text())
        assert res["status"] == "collapsed" and res["steps_run"] == 3 and "non-finite loss" in res["stop_reason"]
        a, b = _weights(nan / f"unlearn/canary_r{r}/model"), _weights(clean / f"unlearn/canary_r{r}/model")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], w) for k, w in _weights(nan / "models/original").items())  # it did move


def test_stop_rule_continues_past_the_target_until_every_example_is_forgotten():
    """The request's target is reached at step 4 but one example is still exposed: the run goes on and stops at
    the first evaluation where every example is forgotten; a perplexity past its limit (a collapse) stops it first;
    without until_all_forgotten it stops at the target."""
    from unlearnbench.unlearn.request import StopRule

    cfg = smoke_config(Path("/tmp/x"), "metrics.uq_target=0.9", "unlearn.max_steps=20")
    rows = [(0, 0.0, 0.0), (1, 0.5, 0.5), (4, 0.95, 0.9), (6, 0.8, 0.95), (8, 0.97, 1.0)]
    rule = StopRule(cfg)
    stops = [rule.check({"uq": uq, "forgotten_fraction": f, "id_holdout_ppl": 10.0}, s, 10.0) for s, uq, f in rows]
    assert stops[:4] == [None] * 4 and stops[4][0] == "target" and "every example" in stops[4][1]
    early = StopRule(smoke_config(Path("/tmp/x"), "unlearn.until_all_forgotten=false"))
    assert [early.check({"uq": uq, "forgotten_fraction": f, "id_holdout_ppl": 10.0}, s, 10.0) is None
            for s, uq, f in rows[:3]] == [True, True, False]
    collapse = StopRule(cfg)
    assert collapse.check({"uq": 0.95, "forgotten_fraction": 1.0, "id_holdout_ppl": 1e9}, 3, 10.0)[0] == "collapsed"
    assert StopRule(cfg).check({"uq": 0.1, "forgotten_fraction": 0.0, "id_holdout_ppl": 10.0}, 20, 10.0)[0] == "max_steps"


def test_request_outcome_interpolates_the_crossing_and_the_cost_there():
    """UQ 0.6 at step 8 and 1.0 at step 10: the 0.9 crossing is 3/4 of the way in log(1+step); the log
    perplexity ratio is read at the same point; never reaching the target is censored, diverging is collapsed."""
    from unlearnbench.unlearn.outcome import request_outcome

    curve = pd.DataFrame({"step": [0, 8, 10], "uq": [0.0, 0.6, 1.0], "utility_drop": [0.0, np.e - 1, np.e ** 3 - 1]})
    o = request_outcome(curve, 0.9, False, 10)
    x = np.log(9) + 0.75 * (np.log(11) - np.log(9))
    assert o["outcome"] == "unlearned" and o["step"] == pytest.approx(np.exp(x) - 1) and o["grid_step"] == 10
    assert o["log_ppl_ratio"] == pytest.approx(1 + 0.75 * 2) and o["utility_drop"] == pytest.approx(np.exp(2.5) - 1)
    never = curve.assign(uq=[0.0, 0.2, 0.3])
    assert request_outcome(never, 0.9, False, 10)["outcome"] == "censored"
    assert request_outcome(never, 0.9, True, 10) == {"outcome": "collapsed", "step": 10.0, "grid_step": None,
                                                      "log_ppl_ratio": None, "utility_drop": None}


def test_a_request_with_nothing_to_forget_can_stop_at_step_zero():
    """unlearn.skip_nothing_to_forget (the default preset): a gap under the floor at step 0 stops the request before
    any update, with the reason; without the flag it runs like any other."""
    from unlearnbench.unlearn.request import StopRule

    row = {"uq": 0.4, "forgotten_fraction": 0.2, "id_holdout_ppl": 10.0, "nothing_to_forget": True}
    stop = StopRule(smoke_config(Path("/tmp/x"), "unlearn.skip_nothing_to_forget=true")).check(row, 0, 10.0)
    assert stop[0] == "max_steps" and "nothing to forget" in stop[1] and "uq_min_gap_bits=1" in stop[1]
    assert StopRule(smoke_config(Path("/tmp/x"))).check(row, 0, 10.0) is None
