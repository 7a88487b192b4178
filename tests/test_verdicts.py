"""unlearnbench.verdicts on crafted stored results: every case of issue 24 with hand-computed expectations, the
relabelling invariance, seeds as the unit, Holm over cells, F3 under separation, F4's skipped requests."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from unlearnbench.verdicts import decide_f1, decide_f2, decide_f3, decide_f4, replicate_spread

T2 = 4.302652729911275  # t(0.975, 2)


def result(kind, reps, g, outcome="unlearned", step=10.0, log_ppl=0.1, nothing=False, seed=None, auc=0.5):
    """A request's result.json as the unlearn stage writes it (with `seed` when seeds are pooled)."""
    o = {"outcome": outcome, "step": float(step), "log_ppl_ratio": log_ppl if outcome == "unlearned" else None}
    r = {"request": f"{kind}_r{reps}_g{g}", "kind": kind, "repetitions": reps, "group": g, "outcome": outcome,
         "outcomes": {t: dict(o) for t in ("0.5", "0.8", "0.9")}, "uq_auc": auc, "nothing_to_forget": nothing}
    return r if seed is None else {**r, "seed": seed}


def cell(f, reps=16, kind="canary"):
    return next(c for c in f["contrasts"] if c["repetitions"] == reps and c["ood_kind"] == kind)


def test_f1_two_sample_on_log_steps_reads_as_a_ratio():
    res = [result("id", 16, g, step=s) for g, s in enumerate((8.0, 10.0, 9.0))]
    res += [result("canary", 16, g, step=s) for g, s in enumerate((13.0, 16.0, 16.0))]
    f = decide_f1(res)
    e = cell(f)["by_target"]["uq_0.9"]
    ids, oods = np.log([9.0, 11.0, 10.0]), np.log([14.0, 17.0, 17.0])
    effect = oods.mean() - ids.mean()
    se = math.sqrt(ids.var(ddof=1) / 3 + oods.var(ddof=1) / 3)
    assert e["effect"] == pytest.approx(effect) and e["ratio"] == pytest.approx(math.exp(effect))
    assert (e["lo"], e["hi"]) == pytest.approx((effect - T2 * se, effect + T2 * se))
    assert e["ratio_lo"] == pytest.approx(math.exp(effect - T2 * se)) and e["n_unit"] == "groups"
    assert e["verdict"] == "reproduced" and f["verdict"] == "reproduced" and f["unit"] == "groups"
    assert "this pair" in f["unit_note"]
    # one cell: Holm changes nothing; the area readout has identical values on both sides: no evidence
    assert cell(f)["p_holm"] == pytest.approx(e["p"]) and cell(f)["family_verdict"] == "reproduced"
    assert cell(f)["by_target"]["auc"]["verdict"] == "inconclusive"
    assert not cell(f)["stable_across_targets"]


def test_relabelling_groups_changes_nothing():
    """Every permutation of the OOD and of the ID group labels gives the same effect, interval and verdict (the
    old pairing by index did not)."""
    ids = [(6.0, 0.4), (9.0, 0.9), (7.5, 0.3)]
    oods = [(12.0, 0.1), (8.0, 0.2), (15.0, 0.0)]
    seen = set()
    for p_id, p_ood in itertools.product(itertools.permutations(range(3)), repeat=2):
        res = [result("id", 4, p_id[j], step=s, log_ppl=c) for j, (s, c) in enumerate(ids)]
        res += [result("domain", 4, p_ood[j], step=s, log_ppl=c) for j, (s, c) in enumerate(oods)]
        out = []
        for f in (decide_f1(res), decide_f2(res)):
            e = cell(f, 4, "domain")["by_target"]["uq_0.9"]
            out += [round(e[k], 12) for k in ("effect", "lo", "hi", "p")] + [e["verdict"], f["verdict"]]
        seen.add(tuple(out))
    assert len(seen) == 1


def test_seeds_are_the_unit_and_intervals_say_what_n_counts():
    # F2 (no transform): ID costs 10, 10.1, 9.9 in seed 0 and 20, 20.1, 19.9 in seed 1, OOD 0: [-48.53, 78.53]
    res = [result("id", 4, g, log_ppl=v, seed=0) for g, v in enumerate((10.0, 10.1, 9.9))]
    res += [result("id", 4, g, log_ppl=v, seed=1) for g, v in enumerate((20.0, 20.1, 19.9))]
    res += [result("canary", 4, g, log_ppl=0.0, seed=s) for g in range(3) for s in (0, 1)]
    f = decide_f2(res)
    e = cell(f, 4)["by_target"]["uq_0.9"]
    assert (e["n_unit"], e["n"], e["seed_effects"]) == ("seeds", 2, [10.0, 20.0])
    assert (e["lo"], e["hi"]) == pytest.approx((15 - 12.706204736 * 5, 15 + 12.706204736 * 5))
    assert f["unit"] == "seeds" and e["verdict"] == "not reproduced"


def _partly_seed(seed: int, shift: float) -> list[dict]:
    """One seed where r4 canary is clearly ID-costlier and r16 canary is too, but with a wide ID spread: alone, the
    seed reads 'partly reproduced'."""
    res = [result("id", 4, g, log_ppl=1.0 + shift + d, seed=seed) for g, d in enumerate((0.0, 0.1, -0.1))]
    res += [result("canary", 4, g, log_ppl=d, seed=seed) for g, d in enumerate((0.0, 0.1, -0.1))]
    res += [result("id", 16, g, log_ppl=1.0 + 2 * shift + d, seed=seed) for g, d in enumerate((-1.0, 0.0, 1.0))]
    res += [result("canary", 16, g, log_ppl=d, seed=seed) for g, d in enumerate((0.0, 0.1, -0.1))]
    return res


def test_partly_reproduced_seeds_pool_into_one_effect_per_cell_not_a_vote():
    """Each seed alone: r4 significant, r16 not -> 'partly reproduced' (the old vote over such seeds read 'not
    reproduced'). Pooled with the seed as the unit: r16's seed contrasts 1.0, 1.1, 0.9 (mean 1, se 0.1/sqrt 3) and
    r4's 1.0, 1.05, 0.95 are both clear -> 'reproduced'."""
    seeds = [_partly_seed(s, x) for s, x in enumerate((0.0, 0.05, -0.05))]
    for one in seeds:
        assert decide_f2([{**r, "seed": 0} for r in one])["verdict"] == "partly reproduced"
    f = decide_f2([r for one in seeds for r in one])
    e16 = cell(f, 16)["by_target"]["uq_0.9"]
    assert e16["seed_effects"] == pytest.approx([1.0, 1.1, 0.9]) and e16["n_unit"] == "seeds"
    t = 1.0 / (0.1 / math.sqrt(3))
    assert e16["p"] == pytest.approx(2 * stats.t.sf(t, 2))
    # Holm over the two cells: both p-values x 2 stay under 0.05
    assert f["verdict"] == "reproduced" and all(c["family_verdict"] == "reproduced" for c in f["contrasts"])


def test_opposite_cells_are_mixed_and_a_lone_reversal_is_partly_reversed():
    fast, slow = (3.0, 3.2, 2.8), (30.0, 32.0, 28.0)
    res = [result("id", 4, g, step=s) for g, s in enumerate(fast)] + \
        [result("canary", 4, g, step=s) for g, s in enumerate(slow)] + \
        [result("id", 16, g, step=s) for g, s in enumerate(slow)] + \
        [result("canary", 16, g, step=s) for g, s in enumerate(fast)]
    f = decide_f1(res)
    assert f["verdict"] == "mixed" and f["detail"] == "reproduced in r4 canary; reversed in r16 canary"
    assert (f["supporting"], f["against"]) == (["r4 canary"], ["r16 canary"])
    # r4: nothing either way (the same steps on both sides, with spread); r16 reversed: the old rule's
    # "not reproduced" is "partly reversed"
    res = [r for r in res if r["repetitions"] == 16] + [result("id", 4, g, step=s) for g, s in enumerate(fast)] + \
        [result("canary", 4, g, step=s) for g, s in enumerate((3.1, 2.9, 3.3))]
    assert decide_f1(res)["verdict"] == "partly reversed"


def test_identical_differences_are_never_evidence():
    # [2, 2, 2]: every ID group costs 2 more than every OOD group, with no spread on either side
    res = [result("id", 16, g, log_ppl=2.0) for g in range(3)] + [result("domain", 16, g, log_ppl=0.0) for g in range(3)]
    f = decide_f2(res)
    c = cell(f, 16, "domain")
    assert c["verdict"] == "inconclusive" and "no spread" in c["by_target"]["uq_0.9"]["reasons"][0]
    assert f["verdict"] == "inconclusive"


def test_censored_sides_are_bounds_that_cannot_push_toward_reproduction():
    # the numbers: OOD 3.0-3.6 steps later than ID in four groups, plus an ID group censored at 100 and an
    # OOD one unlearned at 99.9 (the pair rule read a bound of -0.1 and "reproduced" [0.71, 4.53])
    res = [result("id", 4, g, step=10.0 + 0.5 * g) for g in range(4)] + [result("id", 4, 4, "censored", 100.0)]
    res += [result("canary", 4, g, step=10.0 + 0.5 * g + d) for g, d in enumerate((3.0, 3.2, 3.4, 3.6))]
    res += [result("canary", 4, 4, step=99.9)]
    e = cell(decide_f1(res), 4)["by_target"]["uq_0.9"]
    assert e["lo"] == -math.inf and e["untested"] == "up" and e["verdict"] != "reproduced"
    assert e["counts"]["id_censored"] == 1 and e["n_bound_ref"] == 1


def test_collapsed_and_nothing_to_forget_stay_out_and_are_counted():
    res = [result("id", 1, 0, nothing=True), result("id", 1, 1, "collapsed", 40.0), result("id", 1, 2, step=5.0),
           result("canary", 1, 0, step=9.0), result("canary", 1, 1, step=8.0), result("canary", 1, 2, step=7.0)]
    e = cell(decide_f1(res), 1)["by_target"]["uq_0.9"]
    assert e["counts"]["id_left_out"] == {"nothing to forget": 1, "collapsed": 1} and e["counts"]["id_used"] == 1
    assert e["verdict"] == "inconclusive" and "fewer than 2 usable groups on a side" in e["reasons"]
    f2 = cell(decide_f2(res), 1)["by_target"]["uq_0.9"]
    assert f2["counts"]["id_left_out"] == {"nothing to forget": 1, "collapsed: no cost at a crossing": 1}


def test_holm_over_cells_by_hand():
    """Three F2 cells with p-values worked out from their t statistics; Holm rejects only those under the
    step-down thresholds, and the overall verdict reads the adjusted decisions."""
    def cell_rows(reps, ood, effect, spread):
        return [result("id", reps, g, log_ppl=effect + d) for g, d in enumerate((0.0, spread, -spread))] + \
            [result(ood, reps, g, log_ppl=d) for g, d in enumerate((0.0, 0.1, -0.1))]
    res = cell_rows(1, "canary", 1.0, 0.1) + cell_rows(4, "canary", 0.45, 0.1) + cell_rows(16, "canary", 0.0, 0.1)
    f = decide_f2(res)
    se = math.sqrt(2 * 0.01 / 3)
    p = {1: 2 * stats.t.sf(1.0 / se, 2), 4: 2 * stats.t.sf(0.45 / se, 2), 16: 1.0}
    got = {c["repetitions"]: c for c in f["contrasts"]}
    assert got[1]["p"] == pytest.approx(p[1]) and got[4]["p"] == pytest.approx(p[4])
    # sorted p1 < p4 < p16 (m = 3): 3 p1, max(3 p1, 2 p4), 1
    assert got[1]["p_holm"] == pytest.approx(3 * p[1]) and got[4]["p_holm"] == pytest.approx(max(3 * p[1], 2 * p[4]))
    assert p[4] < 0.05 < 2 * p[4]  # r4 alone would read reproduced; not after the family's correction
    assert got[4]["verdict"] == "reproduced" and got[4]["family_verdict"] == "not significant"
    assert f["verdict"] == "partly reproduced" and f["supporting"] == ["r1 canary"]


NINE = [(1, 0.05, 4), (1, 0.10, 3), (1, 0.15, 2), (4, 0.45, 10), (4, 0.50, 9), (4, 0.55, 8),
        (16, 1.40, 25), (16, 1.50, 20), (16, 1.60, 16)]


def _nine(steps_sign: int = 1) -> pd.DataFrame:
    rows = []
    for reps, mem, steps in NINE:
        rows.append({"kind": "id", "request": f"id_r{reps}", "memorization": mem, "difficulty": 4.0,
                     "steps_to_forget": steps, "censored": False, "nothing_to_forget": False})
    df = pd.DataFrame(rows)
    if steps_sign < 0:  # the mirror: more memorized strictly slower inside every request
        df["steps_to_forget"] = df.groupby("request").steps_to_forget.transform(lambda s: s.to_numpy()[::-1])
    return df


def test_f3_the_docs_nine_examples_read_reversed():
    """docs/findings.md's nine examples: inside each request the more memorized forget faster. The partial likelihood
    is monotone (each request's order is perfectly explained), so the Wald numbers are meaningless; the
    likelihood-ratio statistic is finite: 2 (0 - 3 log(1/6)) = 6 log 6 = 10.75, p = 0.00104 -> reversed."""
    f = decide_f3(_nine())
    k = f["kinds"][0]
    assert k["test"] == "likelihood ratio" and k["lr"] == pytest.approx(6 * math.log(6), rel=1e-5)
    assert k["p"] == pytest.approx(stats.chi2.sf(6 * math.log(6), 1), rel=1e-4)
    assert k["verdict"] == "reversed" and f["verdict"] == "reversed"
    assert not k["cox"]["memorization"]["usable"] and "not estimable" in k["reason"]


def test_f3_strictly_slower_inside_every_request_is_never_not_reproduced():
    k = decide_f3(_nine(-1))["kinds"][0]
    assert k["verdict"] == "reproduced" and k["test"] == "likelihood ratio"


def _examples(within_slope: float, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    """Three requests with memorization means 0.3 / 1.2 / 2.9 (+ shift x index) and steps 5 / 20 / 80: confounded
    across requests; within each, steps rise with memorization by `within_slope` (0: unrelated)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (reps, m_mean, s_mean) in enumerate(((1, 0.3, 5.0), (4, 1.2, 20.0), (16, 2.9, 80.0))):
        mem = rng.normal(m_mean, 0.2, 40)
        steps = s_mean * np.exp(within_slope * (mem - m_mean) / 0.2 + rng.normal(0, 0.3, 40))
        for m, s in zip(mem, steps):
            rows.append({"kind": "id", "request": f"id_r{reps}", "memorization": m + shift * i,
                         "difficulty": rng.normal(4, 0.3), "steps_to_forget": float(np.ceil(min(s, 200))),
                         "censored": s >= 200, "nothing_to_forget": False})
    return pd.DataFrame(rows)


def test_f3_examples_forgotten_at_step_0_are_counted_not_events():
    df = _examples(0.0)
    low = df.memorization < df.groupby("request").memorization.transform("quantile", 0.2)
    df.loc[low, "steps_to_forget"] = 0.0  # the least memorized already forgotten: no evidence about unlearning
    k = decide_f3(df)["kinds"][0]
    assert k["forgotten_at_start"] == int(low.sum()) and k["n"] == len(df) - int(low.sum())
    assert k["verdict"] == "not reproduced"


def test_f3_units_are_within_request_sds():
    """Growing the gaps between requests' memorization changes nothing (the coefficient is per within-request SD)."""
    a = decide_f3(_examples(0.8))["kinds"][0]
    b = decide_f3(_examples(0.8, shift=5.0))["kinds"][0]
    assert a["cox"]["memorization"]["coef"] == pytest.approx(b["cox"]["memorization"]["coef"], rel=1e-6)
    assert a["verdict"] == "reproduced" and a["test"] == "wald"
    m = a["cox"]["memorization"]
    assert m["hr_lo"] == pytest.approx(math.exp(m["coef_lo"])) and m["hr_hi"] < 1


def test_f3_a_failed_fit_is_inconclusive_with_its_reason():
    df = _examples(0.8)
    df["difficulty"] = 3.0 * df["memorization"] - 1.0  # collinear: lifelines cannot fit
    k = decide_f3(df)["kinds"][0]
    assert k["verdict"] == "inconclusive" and k["p"] is None and k["reason"].startswith("Cox fit unusable")


def _attack(kind, g, recovered, seed=0, baseline="oracle"):
    share = {"recovered": recovered}
    return {"request": f"{kind}_r16_g{g}", "kind": kind, "repetitions": 16, "group": g, "seed": seed,
            "baseline": baseline, "relearn_forget_fraction": share, "relearn_retain": share,
            "quantization": {"int8": share, "int4": share}}


def test_f4_counts_skipped_requests_and_keeps_directions_apart():
    res = [_attack("id", g, 0.2 + d) for g, d in enumerate((0.0, 0.01, -0.01))]
    res += [_attack("canary", g, 0.5 + d) for g, d in enumerate((0.0, 0.01, -0.01))]  # canaries recover more
    res += [_attack("domain", g, -0.1 + d) for g, d in enumerate((0.0, 0.01))]  # the domain recovers less
    skipped = [{"request": "domain_r16_g2", "kind": "domain", "repetitions": 16, "group": 2, "seed": 0,
                "reason": "it never became unlearned (outcome censored)"}]
    f = decide_f4(res, skipped)
    dom = cell(f, 16, "domain")["by_target"]["relearn_forget_fraction"]
    assert dom["counts"]["ood_left_out"] == {"skipped: it never became unlearned (outcome censored)": 1}
    assert dom["counts"]["ood_used"] == 2 and f["skipped"] == 1
    assert cell(f, 16, "canary")["family_verdict"] == "OOD recovers more"
    assert cell(f, 16, "domain")["family_verdict"] == "ID recovers more"
    assert f["verdict"] == "mixed" and f["detail"] == ("OOD recovers more in r16 canary; "
                                                       "ID recovers more in r16 domain")
    blind = decide_f4([{**r, "baseline": "held_out_references"} for r in res])
    assert blind["excluded_without_oracle"] == 8 and blind["verdict"] == "inconclusive"


def test_replicate_spread_and_the_findings_of_pooled_seeds():
    # id r4 at UQ 0.9: log(1 + steps) 1, 2, 3 in seed 0 and 4, 5, 6 in seed 1 -> the components by hand
    res = [result("id", 4, g, step=math.expm1(v), seed=0) for g, v in enumerate((1.0, 2.0, 3.0))]
    res += [result("id", 4, g, step=math.expm1(v), seed=1) for g, v in enumerate((4.0, 5.0, 6.0))]
    res += [result("canary", 4, g, step=5.0, seed=s) for g in range(3) for s in (0, 1)]
    r = replicate_spread(res)["log1p_steps"]["id_r4 uq 0.9"]
    assert r["within_seed_group_var"] == pytest.approx(1.0) and r["between_seed_var"] == pytest.approx(4.5 - 1 / 3)
    from unlearnbench.config import load_config
    from unlearnbench.findings import run_findings

    out = run_findings(load_config("smoke"), res, pd.DataFrame())  # the report stage's entry, seeds pooled
    assert set(out) == {"F1", "F2", "replicate_spread"} and out["F1"]["unit"] == "seeds"
    assert out["replicate_spread"] == replicate_spread(res)
