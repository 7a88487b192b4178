"""Every finding function on crafted request results: exact verdicts and numbers for censored, collapsed,
nothing-to-forget, tied, single-replicate and confounded cases."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from unlearnbench.findings import (aggregate_seeds, finding_f1, finding_f2, finding_f3, finding_f4, overall_verdict,
                                   replicate_pairs, survival)


def result(kind, reps, rep, outcome="unlearned", step=10.0, auc=0.5, log_ppl=0.1, nothing=False, targets=None):
    """A request's result.json as the unlearn stage writes it; `targets` overrides single targets."""
    outs = {}
    for t in ("0.5", "0.8", "0.9"):
        o, s = (targets or {}).get(t, (outcome, step))
        outs[t] = {"outcome": o, "step": s, "log_ppl_ratio": log_ppl if o == "unlearned" else None}
    return {"request": f"{kind}_r{reps}_g{rep}", "kind": kind, "repetitions": reps, "group": rep,
            "outcome": outs["0.9"]["outcome"], "outcomes": outs, "uq_auc": auc, "nothing_to_forget": nothing}


def t_half(values):
    v = np.asarray(values, float)
    return stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))


def contrast(f, reps=16, kind="canary"):
    return next(c for c in f["contrasts"] if c["repetitions"] == reps and c["ood_kind"] == kind)


def test_f1_three_replicates_all_later_is_reproduced_with_the_t_interval():
    res = [result("id", 16, j, step=s) for j, s in enumerate((8.0, 10.0, 9.0))]
    res += [result("canary", 16, j, step=s) for j, s in enumerate((13.0, 16.0, 16.0))]
    c = contrast(finding_f1(res, 0.9))
    e = c["by_target"]["uq_0.9"]
    diffs = [5.0, 6.0, 7.0]
    assert e["mean"] == pytest.approx(np.mean(diffs))
    assert e["hi"] - e["mean"] == pytest.approx(t_half(diffs))
    assert e["lo"] > 0 and e["verdict"] == "reproduced" and c["verdict"] == "reproduced"
    assert e["counts"] == {"supports": 3, "against": 0, "tie": 0, "inconclusive": 0}
    # the area summary: same auc everywhere -> three ties, an interval of zero width at 0: not reproduced
    assert c["by_target"]["auc"]["verdict"] == "not reproduced"
    assert not c["stable_across_targets"] and c["across_targets"] == "depends on target"


def test_a_collapsed_side_is_never_evidence_and_both_censored_is_inconclusive():
    res = [result("id", 4, 0, step=10.0), result("domain", 4, 0, "collapsed", 40.0),   # collapse: no evidence
           result("id", 4, 1, "censored", 100.0), result("domain", 4, 1, "censored", 100.0),  # both censored
           result("id", 4, 2, step=10.0), result("domain", 4, 2, "censored", 100.0)]  # censored after: a bound
    c = contrast(finding_f1(res, 0.9), 4, "domain")
    e = c["by_target"]["uq_0.9"]
    assert [p["class"] for p in e["pairs"]] == ["inconclusive", "inconclusive", "ood_later"]
    assert e["pairs"][0]["reason"] == "collapsed"
    assert e["pairs"][2]["difference"] == 90.0 and e["pairs"][2]["bound"]
    assert e["n_informative"] == 1 and e["verdict"] == "inconclusive"  # one informative pair is not a finding
    assert e["counts"] == {"supports": 1, "against": 0, "tie": 0, "inconclusive": 2}
    assert c["by_target"]["auc"]["counts"]["inconclusive"] == 1  # the collapsed pair again


def test_censoring_before_the_other_event_is_inconclusive_and_after_it_is_against():
    res = [result("id", 16, 0, "censored", 6.0), result("canary", 16, 0, step=8.0),   # censored at 6 < 8: nothing
           result("id", 16, 1, "censored", 50.0), result("canary", 16, 1, step=8.0),  # ID slower for sure
           result("id", 16, 2, "censored", 50.0), result("canary", 16, 2, step=10.0),
           result("id", 16, 3, "censored", 50.0), result("canary", 16, 3, step=13.0)]
    e = contrast(finding_f1(res, 0.9))["by_target"]["uq_0.9"]
    assert e["pairs"][0]["class"] == "inconclusive"
    assert [p["difference"] for p in e["pairs"][1:]] == [-42.0, -40.0, -37.0]
    assert e["verdict"] == "reversed" and e["mean"] == pytest.approx(-119 / 3)


def test_nothing_to_forget_pairs_are_counted_not_used_and_one_replicate_is_inconclusive():
    res = [result("id", 1, 0, nothing=True), result("canary", 1, 0, step=30.0),
           result("id", 4, 0, step=5.0), result("canary", 4, 0, step=9.0)]
    f = finding_f1(res, 0.9)
    e1 = contrast(f, 1)["by_target"]["uq_0.9"]
    assert e1["n_informative"] == 0 and e1["reasons"] == ["ID had nothing to forget"]
    e4 = contrast(f, 4)["by_target"]["uq_0.9"]
    assert e4["mean"] == 4.0 and e4["n_informative"] == 1 and e4["verdict"] == "inconclusive"
    assert f["verdict"] == "inconclusive" and f["holds"] == 0 and f["of"] == 2


def test_f1_ties_and_mixed_signs_are_not_reproduced():
    res = [result("id", 16, j, step=s) for j, s in enumerate((10.0, 10.0, 10.0))]
    res += [result("domain", 16, j, step=s) for j, s in enumerate((10.0, 13.0, 8.0))]
    e = contrast(finding_f1(res, 0.9), 16, "domain")["by_target"]["uq_0.9"]
    assert e["counts"] == {"supports": 1, "against": 1, "tie": 1, "inconclusive": 0}
    assert e["mean"] == pytest.approx(1 / 3) and e["lo"] < 0 < e["hi"] and e["verdict"] == "not reproduced"


def test_f2_uses_log_cost_at_each_target_and_only_unlearned_pairs():
    res = [result("id", 16, j, log_ppl=v) for j, v in enumerate((1.0, 1.2, 0.9))]
    res += [result("canary", 16, j, log_ppl=v) for j, v in enumerate((0.1, 0.3, 0.2))]
    res.append(result("id", 16, 3, log_ppl=2.0))
    res.append(result("canary", 16, 3, targets={"0.9": ("censored", 100.0)}, log_ppl=0.5))
    c = contrast(finding_f2(res, 0.9))
    e = c["by_target"]["uq_0.9"]
    assert e["mean"] == pytest.approx(np.mean([0.9, 0.9, 0.7])) and e["verdict"] == "reproduced"
    assert e["counts"]["inconclusive"] == 1 and "OOD censored" in e["reasons"][0]
    # at 0.5 the fourth pair crossed too: 4 informative pairs
    assert c["by_target"]["uq_0.5"]["n_informative"] == 4 and c["stable_across_targets"]


def test_pairs_match_group_index_and_kind():
    res = [result("id", 4, 1), result("canary", 4, 0), result("canary", 4, 1), result("domain", 16, 0)]
    pairs = replicate_pairs(res)
    assert list(pairs) == [(4, "canary")]
    assert [(i["group"], o["group"]) for i, o in pairs[(4, "canary")]] == [(1, 1)]


@pytest.mark.parametrize("verdicts, expected", [
    (["reproduced", "reproduced", "inconclusive"], "reproduced"),
    (["reproduced", "not reproduced"], "partly reproduced"),
    (["reversed", "reversed"], "reversed"),
    (["reversed", "not reproduced"], "not reproduced"),
    (["inconclusive"], "inconclusive"),
    ([], "inconclusive"),
])
def test_overall_verdict(verdicts, expected):
    assert overall_verdict(verdicts) == expected


def _forgetting(within_slope: float, seed: int = 0) -> pd.DataFrame:
    """Three requests (repetitions 1/4/16) with mean memorization 0.3/1.2/2.9 and mean steps 5/20/80: related across
    requests; within each, steps depend on memorization with `within_slope` (0 = unrelated)."""
    rng = np.random.default_rng(seed)
    rows = []
    for reps, m_mean, s_mean in ((1, 0.3, 5.0), (4, 1.2, 20.0), (16, 2.9, 80.0)):
        mem = rng.normal(m_mean, 0.2, 40)
        steps = s_mean * np.exp(within_slope * (mem - m_mean) / 0.2 + rng.normal(0, 0.3, 40))
        for m, s in zip(mem, steps):
            rows.append({"kind": "id", "repetitions": reps, "request": f"id_r{reps}", "memorization": m,
                         "difficulty": rng.normal(4, 0.3), "steps_to_forget": float(np.ceil(min(s, 200))),
                         "censored": s >= 200, "nothing_to_forget": False})
    return pd.DataFrame(rows)


def test_f3_confounded_by_repetitions_is_not_reproduced_while_pooled_rho_is_large():
    f = finding_f3(_forgetting(0.0), n_boot=100, seed=0)
    k = f["kinds"][0]
    assert k["pooled_spearman_descriptive"]["memorization"]["rho"] > 0.6  # the confounded number
    assert k["verdict"] == "not reproduced" and f["verdict"] == "not reproduced"
    assert k["cox"]["memorization"]["lo"] < 0 < k["cox"]["memorization"]["hi"]


def test_f3_within_request_effect_is_reproduced_and_nothing_to_forget_is_left_out():
    df = _forgetting(0.8)
    df.loc[df.request == "id_r1", "nothing_to_forget"] = True
    f = finding_f3(df, n_boot=100, seed=0)
    assert f["kinds"][0]["verdict"] == "reproduced" and f["excluded_requests"] == ["id_r1"]
    assert f["kinds"][0]["n"] == 80 and f["kinds"][0]["cox"]["memorization"]["hr"] < 1


def test_survival_counts_and_logrank_direction():
    df = pd.DataFrame({"kind": ["id"] * 4 + ["canary"] * 4, "repetitions": 16,
                       "steps_to_forget": [1.0, 2.0, 2.0, 3.0, 10.0, 13.0, 16.0, 20.0],
                       "censored": [False] * 7 + [True], "nothing_to_forget": False, "request": "x"})
    s = survival(df)
    km = {c["kind"]: c for c in s["kaplan_meier"]}
    assert km["id"]["median_steps"] == 2.0 and km["canary"]["events"] == 3 and km["canary"]["median_steps"] == 13.0
    t = s["logrank"][0]
    assert (t["ood_kind"], t["median_ood"], t["median_id"]) == ("canary", 13.0, 2.0) and t["p"] < 0.01


def test_aggregate_seeds_counts_every_outcome(tmp_path):
    import json

    def summary(seed, outcome, steps):
        g = {"request": "id_r4", "kind": "id", "repetitions": 4, "outcome": outcome, "steps_to_unlearn": steps,
             "nothing_to_forget": False, "uq_final": 0.9}
        return {"seed": seed, "requests": [g], "findings": {"F1": {"verdict": "reproduced"}}}
    dirs = []
    for seed, outcome, steps in ((0, "unlearned", 8), (1, "censored", None), (2, "collapsed", None)):
        d = tmp_path / f"seed_{seed}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(summary(seed, outcome, steps)))
        dirs.append(d)
    agg = aggregate_seeds(dirs)
    g = agg["cells"][0]
    assert g["outcomes"] == {"unlearned": 1, "censored": 1, "collapsed": 1} and g["requests"] == 3
    assert g["steps_to_unlearn"]["n"] == 1  # the mean is over the unlearned seed only, and the counts say so
    assert agg["findings"]["F1"] == {"verdicts": ["reproduced"] * 3, "reproduced_in": 3, "of": 3,
                                     "verdict": "reproduced"}


def test_a_target_off_the_reported_grid_gets_outcomes_everywhere_the_findings_look():
    """uq_target 0.95: each request's outcomes cover 0.5, 0.8, 0.9 and 0.95, and F1/F2 decide at 0.95 (they read
    every reported target; a missing 0.9 used to raise KeyError)."""
    from unlearnbench.unlearn.outcome import request_outcomes

    # UQ 0, 0.6, 0.92, 0.97 at steps 0, 1, 3, 7: 0.95 is crossed between steps 3 and 7
    curve = pd.DataFrame({"step": [0, 1, 3, 7], "uq": [0.0, 0.6, 0.92, 0.97],
                          "utility_drop": [0.0, 0.01, 0.05, 0.2]})
    out = request_outcomes(curve, 0.95, collapsed=False, last_step=7)
    assert sorted(out) == ["0.5", "0.8", "0.9", "0.95"]
    x3, x7 = np.log1p(3), np.log1p(7)
    step95 = np.expm1(x3 + (0.95 - 0.92) / (0.97 - 0.92) * (x7 - x3))  # linear in log(1 + step)
    assert out["0.95"]["outcome"] == "unlearned" and out["0.95"]["step"] == pytest.approx(step95)
    assert out["0.95"]["grid_step"] == 7
    late = request_outcomes(curve.assign(uq=[0.0, 0.5, 0.9, 0.93]), 0.95, collapsed=True, last_step=7)
    assert late["0.95"] == {"outcome": "collapsed", "step": 7.0, "grid_step": None, "log_ppl_ratio": None,
                            "utility_drop": None}

    def result(kind, j, outcomes):
        return {"kind": kind, "repetitions": 4, "group": j, "outcomes": outcomes, "uq_auc": 0.5,
                "outcome": outcomes["0.95"]["outcome"]}
    results = [result("id", j, out) for j in range(3)] + [result("canary", j, out) for j in range(3)]
    f1 = finding_f1(results, 0.95)
    contrast = f1["contrasts"][0]
    assert contrast["main"] == "uq_0.95" and set(contrast["by_target"]) >= {"uq_0.5", "uq_0.8", "uq_0.9", "uq_0.95"}
    assert contrast["by_target"]["uq_0.95"]["counts"]["tie"] == 3  # identical sides: three ties, no evidence
    assert finding_f2(results, 0.95)["contrasts"][0]["main"] == "uq_0.95"


def _attack_result(kind, j, recovered, baseline="oracle"):
    share = {"recovered": recovered}
    return {"kind": kind, "repetitions": 16, "group": j, "baseline": baseline,
            "relearn_forget_fraction": share, "relearn_retain": share, "quantization": {"int8": share, "int4": share}}


def test_f4_paired_recovered_share_and_no_oracle_results_left_out():
    # OOD recovers 0.2, 0.25, 0.3 more than ID in three replicate pairs: t-interval by hand (half-width
    # 4.303 x 0.05 / sqrt 3 = 0.124), excludes 0; with 0.1, 0.2, 0.3 (half-width 0.248) it would not
    res = [_attack_result("id", j, 0.2) for j in range(3)] + \
          [_attack_result("canary", j, 0.2 + d) for j, d in enumerate((0.2, 0.25, 0.3))]
    f4 = finding_f4(res)
    effect = f4["contrasts"][0]["by_attack"]["relearn_forget_fraction"]
    half = stats.t.ppf(0.975, 2) * np.std([0.2, 0.25, 0.3], ddof=1) / np.sqrt(3)
    assert half == pytest.approx(0.124, abs=1e-3)
    assert effect["mean"] == pytest.approx(0.25) and effect["lo"] == pytest.approx(0.25 - half)
    assert effect["verdict"] == "reproduced" and effect["direction"] == "OOD recovers more"
    assert f4["excluded_without_oracle"] == 0
    # the same numbers measured against the unattacked held-out-reference e_r (no oracle): not evidence
    blind = [{**r, "baseline": "held_out_references"} for r in res]
    f4 = finding_f4(blind)
    assert f4["contrasts"] == [] and f4["verdict"] == "inconclusive" and f4["excluded_without_oracle"] == 6
