"""The findings of a run and of several seeds, as the report stage decides them (the rules themselves are tested in
test_verdicts.py and test_contrast.py): crafted request results and run directories, exact numbers by hand."""


import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import smoke_config, write_seed
from unlearnbench.findings import aggregate_seeds, cell_interval, flatten_findings, run_findings, survival
from unlearnbench.results import with_identity
from unlearnbench.verdicts import decide_f4


def result(kind, reps, group, outcome="unlearned", step=10.0, auc=0.5, log_ppl=0.1, nothing=False, targets=None):
    """A request's result.json as the unlearn stage writes it; `targets` overrides single targets."""
    outs = {}
    for t in ("0.5", "0.8", "0.9"):
        o, s = (targets or {}).get(t, (outcome, step))
        outs[t] = {"outcome": o, "step": s, "log_ppl_ratio": log_ppl if o == "unlearned" else None}
    return {"request": f"{kind}_r{reps}_g{group}", "kind": kind, "repetitions": reps, "group": group,
            "outcome": outs["0.9"]["outcome"], "outcomes": outs, "uq_auc": auc, "nothing_to_forget": nothing,
            "steps_to_unlearn": step if outs["0.9"]["outcome"] == "unlearned" else None}


def contrast(f, reps=16, kind="canary"):
    return next(c for c in f["contrasts"] if c["repetitions"] == reps and c["ood_kind"] == kind)


CFG = smoke_config("unused")


def test_run_findings_decide_f1_as_two_samples_with_the_points_behind_the_interval():
    """3 ID groups at 8, 10, 9 steps and 3 canary groups at 13, 16, 16: the F1 effect is the difference of the means
    of log(1 + steps), Welch's standard error, Hsu's df = min(n) - 1 = 2; the values behind it are listed."""
    res = [result("id", 16, j, step=s) for j, s in enumerate((8.0, 10.0, 9.0))]
    res += [result("canary", 16, j, step=s) for j, s in enumerate((13.0, 16.0, 16.0))]
    f = run_findings(CFG, res, pd.DataFrame())
    e = contrast(f["F1"])["by_target"]["uq_0.9"]
    a, b = np.log1p([8.0, 10.0, 9.0]), np.log1p([13.0, 16.0, 16.0])
    se = np.sqrt(a.var(ddof=1) / 3 + b.var(ddof=1) / 3)
    assert e["mean"] == pytest.approx(b.mean() - a.mean())
    assert e["hi"] - e["mean"] == pytest.approx(stats.t.ppf(0.975, 2) * se)
    assert e["ratio"] == pytest.approx(np.exp(b.mean() - a.mean())) and e["n_unit"] == "groups"
    assert [v["value"] for v in e["values"]["ood"]] == pytest.approx(list(b))
    assert {v["request"] for v in e["values"]["id"]} == {"id_r16_g0", "id_r16_g1", "id_r16_g2"}
    assert e["verdict"] == "reproduced" and f["F1"]["verdict"] == "reproduced"  # one contrast: Holm is the test
    assert set(f) == {"F1", "F2"}  # one seed: no replicate spread; no forgetting tables: no F3


def test_flat_view_for_trackers_names_bounds_on_their_own_scale():
    res = [result("id", 16, j, step=s) for j, s in enumerate((8.0, 10.0, 9.0))]
    res += [result("canary", 16, j, step=s) for j, s in enumerate((13.0, 16.0, 16.0))]
    flat = flatten_findings({"findings": run_findings(CFG, res, _forgetting(0.8))})
    assert flat["findings/F1/verdict"] == "reproduced" and flat["findings/F1/r16_canary/uq_0.9/n"] == 6
    cox = {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.startswith("findings/F3/id/memorization/")}
    assert set(cox) == {"hr", "hr_lo", "hr_hi", "p"} and cox["hr_lo"] <= cox["hr"] <= cox["hr_hi"] < 1


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
    f = run_findings(CFG, [], _forgetting(0.0))["F3"]
    k = f["kinds"][0]
    assert k["pooled_spearman_descriptive"]["memorization"]["rho"] > 0.6  # the confounded number
    assert k["verdict"] == "not reproduced" and f["verdict"] == "not reproduced"
    assert k["cox"]["memorization"]["coef_lo"] < 0 < k["cox"]["memorization"]["coef_hi"]


def test_f3_within_request_effect_is_reproduced_and_nothing_to_forget_is_left_out():
    df = _forgetting(0.8)
    df.loc[df.request == "id_r1", "nothing_to_forget"] = True
    f = run_findings(CFG, [], df)["F3"]
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


def test_cell_interval_has_the_seed_as_its_unit():
    """The issue's case: two seeds whose groups sit at 10 +- 0.1 and 20 +- 0.1. Over the six groups the interval is
    narrow; with the seed as the unit it is mean 15 +- t(0.975, 1) x sd(10, 20) / sqrt 2 = [-48.5, 78.5]."""
    def summary(values):
        return {"requests": [{"kind": "id", "repetitions": 4, "steps_to_unlearn": v, "nothing_to_forget": False}
                             for v in values]}
    two = [summary([10, 10.1, 9.9]), summary([20, 20.1, 19.9])]
    ci = cell_interval(two, "id", 4, "steps_to_unlearn")
    assert (ci["n"], ci["n_unit"]) == (2, "seeds")
    assert (ci["lo"], ci["hi"]) == (pytest.approx(-48.53, abs=0.01), pytest.approx(78.53, abs=0.01))
    one = cell_interval(two[:1], "id", 4, "steps_to_unlearn")  # one seed: its groups, a claim about the pair
    assert (one["n"], one["n_unit"]) == (3, "groups") and one["hi"] - one["mean"] == pytest.approx(
        stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))


def test_aggregate_seeds_decides_once_from_every_seeds_requests(tmp_path):
    """Three seeds, each with 2 ID and 2 canary groups, canaries slower by a seed-dependent margin: F1 is one
    contrast per seed, then a t-interval over the three seeds (never the seeds' verdicts counted); every outcome of
    every seed is counted in its cell, and the replicate spread is reported."""
    margins = {0: 2.0, 1: 3.0, 2: 2.5}
    dirs = []
    for seed, m in margins.items():
        res = [result("id", 16, j, step=8.0 + j) for j in range(2)]
        res += [result("canary", 16, j, step=(8.0 + j) * m) for j in range(2)]
        if seed == 2:
            res.append(result("canary", 16, 2, "collapsed", 30.0))
        d = tmp_path / f"seed_{seed}"
        write_seed(d, seed, res)
        dirs.append(d)
    agg = aggregate_seeds(smoke_config(tmp_path), dirs)
    e = contrast(agg["findings"]["F1"])["by_target"]["uq_0.9"]
    per_seed = [np.mean(np.log1p([8 * m, 9 * m])) - np.mean(np.log1p([8, 9])) for m in margins.values()]
    assert (e["n"], e["n_unit"]) == (3, "seeds") and e["mean"] == pytest.approx(np.mean(per_seed))
    assert e["hi"] - e["mean"] == pytest.approx(stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3))
    assert e["counts"]["ood_left_out"] == {"collapsed": 1}
    assert agg["findings"]["F1"]["unit"] == "seeds" and "replicate_spread" in agg["findings"]
    canary = next(c for c in agg["cells"] if c["kind"] == "canary")
    assert canary["outcomes"] == {"unlearned": 6, "collapsed": 1} and canary["requests"] == 7
    assert canary["steps_to_unlearn"]["n_unit"] == "seeds" and canary["steps_to_unlearn"]["n"] == 3


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

    def res(kind, j, outcomes):
        return {"request": f"{kind}_r4_g{j}", "kind": kind, "repetitions": 4, "group": j, "outcomes": outcomes,
                "uq_auc": 0.5, "outcome": outcomes["0.95"]["outcome"]}
    results = [res("id", j, out) for j in range(3)] + [res("canary", j, out) for j in range(3)]
    f = run_findings(smoke_config("unused", "metrics.uq_target=0.95"), results, pd.DataFrame())
    c = f["F1"]["contrasts"][0]
    assert c["main"] == "uq_0.95" and set(c["by_target"]) >= {"uq_0.5", "uq_0.8", "uq_0.9", "uq_0.95"}
    assert c["by_target"]["uq_0.95"]["verdict"] == "inconclusive"  # identical sides: no spread is no evidence
    assert f["F2"]["contrasts"][0]["main"] == "uq_0.95"


def _attack_result(kind, j, recovered, baseline="oracle"):
    share = {"recovered": recovered}
    return {"request": f"{kind}_r16_g{j}", "kind": kind, "repetitions": 16, "group": j, "baseline": baseline,
            "relearn_forget_fraction": share, "relearn_retain": share, "quantization": {"int8": share, "int4": share}}


def test_f4_counts_skipped_requests_and_no_oracle_results():
    """OOD recovers 0.4, 0.45, 0.5 against ID's 0.2, 0.22, 0.18: a difference, named "OOD recovers more"; a
    request the attack stage skipped is counted on its side with its reason, never dropped; the same numbers
    measured against the unattacked held-out-reference e_r (no oracle) are not evidence."""
    res = [_attack_result("id", j, v) for j, v in enumerate((0.2, 0.22, 0.18))]
    res += [_attack_result("canary", j, v) for j, v in enumerate((0.4, 0.45, 0.5))]
    skipped = [{"request": "canary_r16_g3", "kind": "canary", "repetitions": 16, "group": 3,
                "reason": "it never became unlearned (outcome censored)"}]
    f4 = decide_f4(res, skipped)
    c = contrast(f4)
    e = c["by_target"]["relearn_forget_fraction"]
    assert e["mean"] == pytest.approx(0.45 - 0.2) and c["family_verdict"] == "OOD recovers more"
    assert e["counts"]["ood_left_out"] == {"skipped: it never became unlearned (outcome censored)": 1}
    assert f4["skipped"] == 1 and f4["excluded_without_oracle"] == 0
    blind = decide_f4([{**r, "baseline": "held_out_references"} for r in res], [])
    assert blind["verdict"] == "inconclusive" and blind["excluded_without_oracle"] == 6


def test_skipped_requests_stored_by_name_only_get_their_identity_from_the_unlearn_results():
    """An attacks/summary.json written before 0.2 kept a skipped request's name and reason only; `load_run` gives
    it the kind, repetitions and group of its unlearn result, so F4 counts it on its side."""
    requests = [{"request": "canary_r16_g3", "kind": "canary", "repetitions": 16, "group": 3, "outcome": "censored"},
                {"request": "id_r16_g0", "kind": "id", "repetitions": 16, "group": 0, "outcome": "unlearned"}]
    stored = [{"request": "canary_r16_g3", "reason": "it never became unlearned (outcome censored)"}]
    assert with_identity(stored, requests) == [{"request": "canary_r16_g3", "kind": "canary", "repetitions": 16,
                                                "group": 3, "reason": stored[0]["reason"]}]
    res = [_attack_result("id", j, v) for j, v in enumerate((0.2, 0.22, 0.18))]
    res += [_attack_result("canary", j, v) for j, v in enumerate((0.4, 0.45, 0.5))]
    c = contrast(decide_f4(res, with_identity(stored, requests)))
    assert c["by_target"]["relearn_forget_fraction"]["counts"]["ood_left_out"] == {
        "skipped: it never became unlearned (outcome censored)": 1}
