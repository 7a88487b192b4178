"""The per-request evaluator of the unlearning loop (`evaluation.RequestEvaluator`) on the smoke study: e₀ and e_r
from the score stage, step 0 = θ₀ (UQ 0 and utility drop 0 exactly), the seeded in-loop sample, the full check.

Every expected number is recomputed here from the score stage's stored scores (`scores/original.parquet`,
`scores/oracle.parquet`) with the pure metrics, not taken from the evaluator.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import smoke_config


@pytest.fixture(scope="module")
def study(smoke_study):
    """The smoke study's inputs to an evaluator, loaded once: data, forget scores, stored scores, models."""
    from unlearnbench.data.build import load_examples
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.evaluation import eval_subset
    from unlearnbench.models import load_trained

    _, run = smoke_study
    subset = eval_subset(load_examples(run / "data"))
    return {"run": run, "subset": subset, "acc": make_accelerator(),
            "meta": subset.select_columns(["example_id", "kind", "repetitions", "split"]).to_pandas(),
            "forget_scores": pd.read_parquet(run / "scores/forget.parquet"),
            "original": pd.read_parquet(run / "scores/original.parquet").set_index("example_id"),
            "oracle": pd.read_parquet(run / "scores/oracle.parquet").set_index("example_id"),
            "theta0": load_trained(run, "original", "float32"), "theta_r": load_trained(run, "oracle", "float32")}


def _ids(study, kind="canary", reps=16) -> list[str]:
    t = study["forget_scores"]
    return sorted(t[(t.kind == kind) & (t.repetitions == reps)].example_id)


def _evaluator(study, ids, *overrides):
    from unlearnbench.evaluation import RequestEvaluator

    cfg = smoke_config(study["run"], *overrides)
    return (RequestEvaluator(study["acc"], cfg, ids, study["subset"], study["meta"], study["forget_scores"], 0, True),
            cfg)


def _ppl(scores: pd.DataFrame, ids) -> float:
    part = scores.loc[list(ids)]
    return float(np.exp(part.nll_sum.sum() / part.n_tokens.sum()))


SAMPLED = ("unlearn.eval_references=64", "unlearn.eval_utility=40")


def test_e0_and_er_are_the_score_stage_exposures(study):
    ids = _ids(study)
    ev, _ = _evaluator(study, ids, *SAMPLED)
    t = study["forget_scores"].set_index("example_id").loc[ids]
    assert ev.sampled
    np.testing.assert_array_equal(ev.e_0, t.exposure_extrapolated_original.to_numpy())
    np.testing.assert_array_equal(ev.e_r, t.exposure_extrapolated_oracle.to_numpy())
    rank, _ = _evaluator(study, ids, *SAMPLED, "metrics.exposure=rank")
    np.testing.assert_array_equal(rank.e_0, t.exposure_rank_original.to_numpy())
    np.testing.assert_array_equal(rank.e_r, t.exposure_rank_oracle.to_numpy())


def test_step_zero_on_theta0_is_the_score_stage_uq_0_and_no_utility_drop(study):
    """Step 0 on θ₀: UQ exactly 0 and utility drop exactly 0, exposures the score stage's (every reference), and
    only the request's own examples are scored (the check that the model is θ₀)."""
    ids = _ids(study)
    ev, _ = _evaluator(study, ids, *SAMPLED)
    row, traj = ev.evaluate(study["theta0"], 0)
    t = study["forget_scores"].set_index("example_id").loc[ids]
    assert row["gap"] >= 1.0  # canary_r16 has something to forget, so UQ₀ = 0 is not the floor's doing
    assert row["uq"] == 0.0 and row["utility_drop"] == 0.0
    assert list(traj.example_id) == ids and (traj.step == 0).all()
    np.testing.assert_array_equal(traj.exposure.to_numpy(), t.exposure_extrapolated_original.to_numpy())
    np.testing.assert_array_equal(traj.exposure_rank.to_numpy(), t.exposure_rank_original.to_numpy())
    assert row["exposure_mean"] == pytest.approx(t.exposure_extrapolated_original.mean(), rel=1e-12)
    # θ₀'s perplexity on the utility sample, from its stored scores
    sample = ev.meta[(ev.meta.split == "holdout") & (ev.meta.kind == "id")].example_id
    assert len(sample) == 40
    assert ev.ppl_0 == pytest.approx(_ppl(study["original"], sample), rel=1e-12)
    assert row["id_holdout_ppl"] == ev.ppl_0
    n_tokens = sum(len(x) for x in study["subset"].select(
        np.nonzero(study["meta"].example_id.isin(ids).to_numpy())[0])["input_ids"])
    assert ev.tokens_scored == n_tokens  # only the request's examples were scored


def test_step_zero_measures_a_model_that_is_not_theta0(study):
    """θᵣ passed at step 0 fails the θ₀ check and is measured against every reference: its exposures are the
    score stage's θᵣ numbers, so UQ is 1; the utility drop is θᵣ's perplexity over θ₀'s on the same sample."""
    ids = _ids(study)
    ev, _ = _evaluator(study, ids, *SAMPLED)
    assert ev.is_theta0(study["theta0"]) and not ev.is_theta0(study["theta_r"])
    row, traj = ev.evaluate(study["theta_r"], 0)
    t = study["forget_scores"].set_index("example_id").loc[ids]
    np.testing.assert_allclose(traj.exposure.to_numpy(), t.exposure_extrapolated_oracle.to_numpy(), rtol=1e-5)
    assert row["uq"] == pytest.approx(1.0, abs=1e-5)
    sample = ev.meta[(ev.meta.split == "holdout") & (ev.meta.kind == "id")].example_id
    expected = _ppl(study["oracle"], sample) / _ppl(study["original"], sample) - 1
    assert row["utility_drop"] == pytest.approx(expected, rel=1e-5)


def test_steps_after_zero_score_the_sample(study):
    """At a later step the exposure is against the sampled references, refitted: recomputed by hand from θ₀'s
    stored losses (the model is still θ₀), UQ against the score stage's e₀ and e_r."""
    from unlearnbench import metrics

    ids = _ids(study)
    ev, cfg = _evaluator(study, ids, *SAMPLED)
    ev.evaluate(study["theta0"], 0)
    row, traj = ev.evaluate(study["theta0"], 1)
    o = study["original"]
    refs = ev.meta[ev.meta.split == "reference"].example_id
    assert len(refs) == 64
    e_t = metrics.extrapolated_exposure(o.loc[ids, "nll"].to_numpy(), o.loc[refs, "nll"].to_numpy())
    np.testing.assert_allclose(traj.exposure.to_numpy(), e_t, rtol=1e-5)
    uq = metrics.unlearning_quality(e_t, ev.e_0, ev.e_r, cfg.metrics.uq_min_gap_bits).uq
    assert row["uq"] == pytest.approx(uq, abs=1e-5)
    assert row["utility_drop"] == pytest.approx(0.0, abs=1e-6)  # same model, same utility sample


def test_sample_is_seeded_and_shared_by_every_evaluator(study):
    """Per (split, kind) a fixed seeded sample: the same for the same request, the same utility sample for a
    request of another kind or another reference cap; another run.seed draws another sample."""
    canary, _ = _evaluator(study, _ids(study), *SAMPLED)
    again, _ = _evaluator(study, _ids(study), *SAMPLED)
    ident, _ = _evaluator(study, _ids(study, "id", 4), *SAMPLED)
    other_cap, _ = _evaluator(study, _ids(study), "unlearn.eval_references=0", "unlearn.eval_utility=40")
    reseeded, _ = _evaluator(study, _ids(study), *SAMPLED, "run.seed=1")

    def util(ev):
        return list(ev.meta[ev.meta.split.isin(["holdout", "retain"])].example_id)

    m = canary.meta
    assert (m.split == "reference").sum() == 64 and set(m[m.split == "reference"].kind) == {"canary"}
    assert m[m.split == "holdout"].groupby("kind").size().to_dict() == {"domain": 40, "id": 40}
    assert (m.split == "retain").sum() == 40
    assert list(again.meta.example_id) == list(m.example_id)
    assert util(ident) == util(canary) == util(other_cap)
    assert set(ident.meta[ident.meta.split == "reference"].kind) == {"id"}
    assert util(reseeded) != util(canary)
    all_refs = (study["meta"].split == "reference") & (study["meta"].kind == "canary")
    assert (other_cap.meta.split == "reference").sum() == all_refs.sum()


def test_full_check_matches_the_score_stage(study):
    """`evaluate_full` scores every reference and the whole ID holdout: on θᵣ its numbers are the score stage's
    (UQ 1, its ID-holdout perplexity, the drop against θ₀'s); domain holdout and retain are not scored."""
    from unlearnbench import metrics

    ids = _ids(study)
    ev, cfg = _evaluator(study, ids, *SAMPLED)
    full = ev.evaluate_full(study["theta_r"])
    t = study["forget_scores"].set_index("example_id").loc[ids]
    uq = metrics.unlearning_quality(t.exposure_extrapolated_oracle, t.exposure_extrapolated_original,
                                    t.exposure_extrapolated_oracle, cfg.metrics.uq_min_gap_bits).uq
    assert uq == 1.0 and full["uq_final_all"] == pytest.approx(uq, abs=1e-5)
    assert full["exposure_final_all_mean"] == pytest.approx(t.exposure_extrapolated_oracle.mean(), rel=1e-5)
    assert full["forgotten_fraction_final_all"] == 1.0
    utility = json.loads((study["run"] / "scores/utility.json").read_text())
    assert full["id_holdout_ppl_final_all"] == pytest.approx(utility["oracle"]["id_holdout_ppl"], rel=1e-6)
    assert full["utility_drop_final_all"] == pytest.approx(
        utility["oracle"]["id_holdout_ppl"] / utility["original"]["id_holdout_ppl"] - 1, rel=1e-5)
    scored = study["meta"].set_index("example_id").loc[[*ev.full_data["example_id"]]]
    assert set(zip(scored.split, scored.kind)) == {("forget", "canary"), ("reference", "canary"), ("holdout", "id")}
    assert (scored.split == "holdout").sum() == ((study["meta"].split == "holdout") & (study["meta"].kind == "id")).sum()


def test_unsampled_and_rank_evaluators(study):
    """Caps of 0 score everything (no separate check needed); with rank exposure references are never sampled
    (a sample's ceiling log2(|R| + 1) would differ from e₀'s), utility still is."""
    ids = _ids(study)
    full, _ = _evaluator(study, ids, "unlearn.eval_references=0", "unlearn.eval_utility=0")
    assert not full.sampled and len(full.meta) == len(full.full_meta)
    row, _ = full.evaluate(study["theta0"], 0)
    assert row["uq"] == 0.0 and row["utility_drop"] == 0.0
    rank, _ = _evaluator(study, ids, *SAMPLED, "metrics.exposure=rank")
    all_refs = ((study["meta"].split == "reference") & (study["meta"].kind == "canary")).sum()
    assert rank.sampled and (rank.meta.split == "reference").sum() == all_refs
    assert (rank.meta.split == "retain").sum() == 40


def test_reference_sample_is_stratified_by_theta0_loss(study):
    """Sorted by θ₀'s loss, the canary references fall into 64 equal strata with exactly one sampled from each:
    the sample spans the whole range, both tails included."""
    ev, _ = _evaluator(study, _ids(study), *SAMPLED)
    m, o = study["meta"], study["original"]
    refs = m[(m.split == "reference") & (m.kind == "canary")].example_id.to_numpy()
    order = refs[np.lexsort((refs, o.loc[refs, "nll"].to_numpy()))]
    edges = np.linspace(0, len(order), 65).round().astype(int)
    picked = set(ev.meta[ev.meta.split == "reference"].example_id)
    assert [len(picked & set(order[a:b])) for a, b in zip(edges[:-1], edges[1:])] == [1] * 64


def test_full_check_reuses_the_last_evaluation_of_the_same_state(study):
    """When the model is still in the last evaluated state, the check scores only what that evaluation did not
    (plus the small pass that tells the state), with the numbers of a check that scores everything; after step 0
    on θ₀ it needs no pass beyond that, and its numbers are the score stage's."""
    ids = _ids(study)
    n_target = sum(len(x) for x in study["subset"].select(
        np.nonzero(study["meta"].example_id.isin(ids).to_numpy())[0])["input_ids"])
    ev, _ = _evaluator(study, ids, *SAMPLED)
    ev.evaluate(study["theta0"], 0)
    before = ev.tokens_scored
    full = ev.evaluate_full(study["theta0"])
    assert ev.tokens_scored - before == n_target
    utility = json.loads((study["run"] / "scores/utility.json").read_text())
    assert full["uq_final_all"] == 0.0 and full["utility_drop_final_all"] == 0.0
    assert full["id_holdout_ppl_final_all"] == pytest.approx(utility["original"]["id_holdout_ppl"], rel=1e-9)

    ev.evaluate(study["theta_r"], 1)  # a sampled evaluation of another state
    before = ev.tokens_scored
    reused = ev.evaluate_full(study["theta_r"])
    fresh, _ = _evaluator(study, ids, *SAMPLED)
    scratch = fresh.evaluate_full(study["theta_r"])
    assert reused.keys() == scratch.keys()
    for key in reused:
        assert reused[key] == pytest.approx(scratch[key], rel=1e-5, abs=1e-6)
    check = set(ev.full_data["example_id"])
    rest = [len(x) for e, x in zip(ev.full_data["example_id"], ev.full_data["input_ids"])
            if e not in set(ev.meta.example_id)]
    assert len(rest) < len(check) and ev.tokens_scored - before == n_target + sum(rest)
    ev.evaluate(study["theta0"], 2)
    other = ev.evaluate_full(study["theta_r"])  # not the last evaluated state: everything is scored
    assert other["uq_final_all"] == pytest.approx(scratch["uq_final_all"], abs=1e-6)


def _same_row(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), k  # equal, or both NaN


def test_state_dict_round_trip_gives_the_same_next_evaluation(study):
    """An evaluator restored from another's `state_dict`, passed through JSON as a request checkpoint keeps it, gives
    the next evaluation and the final check of the original to the bit: after step 0 on θ₀ (its last scores are θ₀'s
    stored ones, named "theta0" rather than copied) and after a sampled step (the scores themselves, which let the
    final check score only what that step did not)."""
    ids = _ids(study)
    ev, _ = _evaluator(study, ids, *SAMPLED)
    ev.evaluate(study["theta0"], 0)
    state = json.loads(json.dumps(ev.state_dict()))
    assert state["last"] == "theta0" and state["tokens_scored"] == ev.tokens_scored > 0
    back, _ = _evaluator(study, ids, *SAMPLED)
    back.load_state_dict(state)
    assert back.seconds == ev.seconds and back.tokens_scored == ev.tokens_scored and back.ppl_0 == ev.ppl_0
    a, b = ev.evaluate(study["theta_r"], 1), back.evaluate(study["theta_r"], 1)
    _same_row(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1], check_exact=True)

    state = json.loads(json.dumps(ev.state_dict()))
    assert sorted(state["last"]) == sorted(["example_id", "nll_sum", "n_tokens", "n_correct", "nll"])
    assert len(state["last"]["example_id"]) == len(ev.meta)
    restored, _ = _evaluator(study, ids, *SAMPLED)
    restored.load_state_dict(state)
    before = restored.tokens_scored
    _same_row(ev.evaluate_full(study["theta_r"]), restored.evaluate_full(study["theta_r"]))
    assert restored.tokens_scored == ev.tokens_scored  # the same passes: the last scores were reused, not rescored
    assert restored.tokens_scored - before < sum(len(x) for x in restored.full_data["input_ids"])


def test_state_dict_carries_the_measured_theta0_numbers(study):
    """Without the score stage's θ₀ exposures step 0 measures e₀ and ppl₀: the state carries them, and a restored
    evaluator's next evaluation is the original's."""
    no_theta0 = study["forget_scores"].drop(columns=[c for c in study["forget_scores"] if c.endswith("_original")])
    ids = _ids(study)
    cfg = smoke_config(study["run"], *SAMPLED)

    def make():
        from unlearnbench.evaluation import RequestEvaluator

        return RequestEvaluator(study["acc"], cfg, ids, study["subset"], study["meta"], no_theta0, 0, True)

    ev = make()
    assert ev.e_0 is None and ev.ppl_0 is None
    ev.evaluate(study["theta0"], 0)
    state = json.loads(json.dumps(ev.state_dict()))
    back = make()
    back.load_state_dict(state)
    np.testing.assert_array_equal(back.e_0, ev.e_0)
    assert back.ppl_0 == ev.ppl_0 is not None
    a, b = ev.evaluate(study["theta_r"], 2), back.evaluate(study["theta_r"], 2)
    _same_row(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1], check_exact=True)
