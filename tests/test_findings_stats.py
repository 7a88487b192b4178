"""Statistics behind findings F1-F3: crossings and survival (docs/findings.md).

Expected values are worked out by hand (in the comments) or by a route independent of the code
under test, so each assertion can fail.
"""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from unlearnbench.metrics.crossing import interpolated_crossing, uq_auc, value_at_step
from unlearnbench.metrics.survival import kaplan_meier, logrank, median_survival, stratified_cox

EXACT = dict(rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------- crossings

def test_crossing_interpolates_in_log_one_plus_step():
    # 0.9 is halfway between 0.8 (step 8) and 1.0 (step 10) -> halfway between log 9 and log 11.
    got = interpolated_crossing([0, 8, 10], [0.0, 0.8, 1.0], 0.9)
    assert got == pytest.approx(math.exp(math.log(9) + 0.5 * (math.log(11) - math.log(9))) - 1, **EXACT)
    assert 8 < got < 10 and got == pytest.approx(math.sqrt(99) - 1, **EXACT)


def test_crossing_exactly_on_a_grid_point_returns_that_step():
    assert interpolated_crossing([0, 8, 10, 13], [0.0, 0.5, 0.9, 1.0], 0.9) == 10.0


def test_first_evaluation_already_above_interpolates_from_step_zero():
    # 0.9 sits 0.7/0.75 of the way from 0.2 (step 0) to 0.95 (step 4) -> x = (14/15) log 5.
    got = interpolated_crossing([0, 4, 10], [0.2, 0.95, 1.0], 0.9)
    assert got == pytest.approx(5 ** (14 / 15) - 1, **EXACT)


def test_step_zero_never_counts_as_a_crossing():
    # Already at the target before any step: reported at the first real step, not at 0.
    assert interpolated_crossing([0, 4, 10], [0.95, 0.97, 1.0], 0.9) == 4.0
    # ...and a value at 0 that later falls below never counts at all.
    assert interpolated_crossing([0, 4, 10], [0.95, 0.1, 0.2], 0.9) is None


def test_crossing_never_reached_is_none():
    assert interpolated_crossing([0, 1, 2, 4], [0.0, 0.3, 0.89, 0.5], 0.9) is None
    assert interpolated_crossing([], [], 0.9) is None


def test_nan_counts_as_below():
    # The NaN at step 2 is not a crossing; the crossing is observed at 4, and with no value at 2
    # to interpolate from, step 4 itself is reported.
    assert interpolated_crossing([0, 2, 4, 8], [0.0, np.nan, 0.95, 1.0], 0.9) == 4.0
    # A NaN elsewhere does not disturb an ordinary interpolation (0.9 halfway 0.8 -> 1.0, 8 -> 10).
    assert interpolated_crossing([0, 2, 8, 10], [0.0, np.nan, 0.8, 1.0], 0.9) == pytest.approx(
        math.sqrt(99) - 1, **EXACT)
    assert interpolated_crossing([0, 1, 2], [np.nan, np.nan, np.nan], 0.5) is None


def test_crossing_rejects_unsorted_steps():
    with pytest.raises(ValueError):
        interpolated_crossing([0, 10, 8], [0.0, 1.0, 0.8], 0.9)


def test_value_at_step_interpolates_in_log_one_plus_step():
    steps, v = [0, 9, 99], [1.0, 2.0, 3.0]
    assert value_at_step(steps, v, 9) == 2.0
    assert value_at_step(steps, v, 0) == 1.0
    # sqrt(10) - 1 sits at x = log(10)/2, halfway between log 1 and log 10.
    assert value_at_step(steps, v, math.sqrt(10) - 1) == pytest.approx(1.5, **EXACT)
    # log(1+s) = 1.5 log 10 is halfway between log 10 and log 100 -> halfway between 2 and 3.
    assert value_at_step(steps, v, 10 ** 1.5 - 1) == pytest.approx(2.5, **EXACT)
    with pytest.raises(ValueError):
        value_at_step(steps, v, 100)


def test_value_at_crossing_reads_utility_at_the_interpolated_step():
    steps = [0, 8, 10]
    s = interpolated_crossing(steps, [0.0, 0.8, 1.0], 0.9)
    # Same fraction along the log axis as the UQ crossing: halfway between 3.0 and 4.0.
    assert value_at_step(steps, [2.0, 3.0, 4.0], s) == pytest.approx(3.5, **EXACT)


def test_uq_auc_constant_curve():
    assert uq_auc([0, 10, 100], [0.5, 0.5, 0.5], 100) == pytest.approx(0.5, **EXACT)


def test_uq_auc_step_curve_by_hand():
    # x: 0, log 10, log 100 = 2 log 10. Area = 0.5 log 10 (ramp) + 1 * log 10 (flat) = 1.5 log 10,
    # divided by the width 2 log 10 -> 0.75.
    assert uq_auc([0, 9, 99], [0.0, 1.0, 1.0], 99) == pytest.approx(0.75, **EXACT)
    # Curve stops at 9: the last value is carried forward to the horizon -> same area.
    assert uq_auc([0, 9], [0.0, 1.0], 99) == pytest.approx(0.75, **EXACT)
    # Values outside [0, 1] are clipped before integrating.
    assert uq_auc([0, 9, 99], [-0.4, 1.3, 2.0], 99) == pytest.approx(0.75, **EXACT)
    # Horizon before the end: only [0, log 10] counts -> the ramp alone, mean 0.5.
    assert uq_auc([0, 9, 99], [0.0, 1.0, 1.0], 9) == pytest.approx(0.5, **EXACT)
    # Horizon between evaluations: ramp 0 -> 1 up to log 10, then the interpolated curve, here
    # flat at 1 until log 50: (0.5 log 10 + log 5) / log 50.
    assert uq_auc([0, 9, 99], [0.0, 1.0, 1.0], 49) == pytest.approx(
        (0.5 * math.log(10) + math.log(5)) / math.log(50), **EXACT)


def test_uq_auc_nan_gets_no_credit_and_empty_raises():
    # NaN at step 9 counts as 0: a ramp from 0 at log 10 to 1 at log 100 -> 0.5 log 10 / 2 log 10.
    assert uq_auc([0, 9, 99], [0.0, np.nan, 1.0], 99) == pytest.approx(0.25, **EXACT)
    with pytest.raises(ValueError):
        uq_auc([], [], 10)


# ---------------------------------------------------------------------------- survival

def test_kaplan_meier_five_points_by_hand():
    # durations 2, 3, 3+, 5, 8+ (+ = censored):
    #   t=2: 5 at risk, 1 event -> S = 4/5 = 0.8
    #   t=3: 4 at risk, 1 event (one censored at 3) -> S = 0.8 * 3/4 = 0.6
    #   t=5: 2 at risk, 1 event -> S = 0.6 * 1/2 = 0.3
    #   t=8: 1 at risk, 0 events -> S = 0.3
    km = kaplan_meier([2, 3, 3, 5, 8], [1, 1, 0, 1, 0])
    assert list(km.columns) == ["step", "at_risk", "events", "survival", "lo", "hi"]
    assert km["step"].tolist() == [0.0, 2.0, 3.0, 5.0, 8.0]
    assert km["at_risk"].tolist() == [5, 5, 4, 2, 1]
    assert km["events"].tolist() == [0, 1, 1, 1, 0]
    assert km["survival"].tolist() == pytest.approx([1.0, 0.8, 0.6, 0.3, 0.3], **EXACT)
    # Exponential Greenwood at t=2: V = d / (n (n - d)) = 1/20, CI = S^exp(-+z sqrt(V) / log S).
    z = stats.norm.ppf(0.975)
    s, v = 0.8, 1 / 20
    lo = math.exp(-math.exp(math.log(-math.log(s)) - z * math.sqrt(v) / math.log(s)))
    hi = math.exp(-math.exp(math.log(-math.log(s)) + z * math.sqrt(v) / math.log(s)))
    assert (km["lo"][1], km["hi"][1]) == pytest.approx((lo, hi), rel=1e-9)
    assert (km["lo"] <= km["survival"]).all() and (km["survival"] <= km["hi"]).all()


def test_median_survival():
    assert median_survival([2, 3, 3, 5, 8], [1, 1, 0, 1, 0]) == 5.0   # S drops 0.6 -> 0.3 at 5
    assert median_survival([1, 2, 3, 4], [1, 1, 1, 1]) == 2.0         # S(2) = 0.5 exactly
    assert median_survival([2, 3, 5], [1, 0, 0]) == math.inf           # S stays at 2/3


def test_logrank_matches_hand_chi_square():
    # A: 1, 3 (both events). B: 2, 4+ (4 censored). At each event time (O_A, E_A, V):
    #   t=1: n=4 (2 A), d=1, O_A=1, E_A=2/4,  V = 2*2*1*3/(16*3) = 1/4
    #   t=2: n=3 (1 A), d=1, O_A=0, E_A=1/3,  V = 1*2*1*2/(9*2)  = 2/9
    #   t=3: n=2 (1 A), d=1, O_A=1, E_A=1/2,  V = 1*1*1*1/(4*1)  = 1/4
    # O - E = 2 - 4/3 = 2/3; V = 13/18; chi2 = (4/9) / (13/18) = 8/13.
    r = logrank([1, 3], [1, 1], [2, 4], [1, 0])
    assert r["statistic"] == pytest.approx(8 / 13, rel=1e-10)
    assert r["p"] == pytest.approx(stats.chi2.sf(8 / 13, 1), rel=1e-10)
    assert (r["n_a"], r["n_b"], r["events_a"], r["events_b"]) == (2, 2, 2, 1)


def test_logrank_without_events_is_nan():
    r = logrank([5, 5], [0, 0], [5, 5], [0, 0])
    assert math.isnan(r["statistic"]) and math.isnan(r["p"])
    assert (r["n_a"], r["events_a"], r["events_b"]) == (2, 0, 0)


def _strata_frame(rising: bool, seed: int = 0, n: int = 40, budget: float = 200.0) -> pd.DataFrame:
    """Three strata with memorization means 0.3/1.2/2.9 and mean steps 5/20/80 (confounded)."""
    rng = np.random.default_rng(seed)
    parts = []
    for g, (mem_mean, scale) in enumerate(zip([0.3, 1.2, 2.9], [5.0, 20.0, 80.0])):
        mem = rng.normal(mem_mean, 0.2, n)
        if rising:
            # Within the stratum, each +0.2 (one within-stratum sd) multiplies the scale by e^3.
            steps = rng.exponential(scale * np.exp(15.0 * (mem - mem_mean)))
        else:
            steps = rng.exponential(scale, n)  # independent of mem inside the stratum
        parts.append(pd.DataFrame({"steps": np.minimum(steps, budget), "forgotten": steps < budget,
                                   "memorization": mem, "group": g}))
    return pd.concat(parts, ignore_index=True)


def test_stratified_cox_sees_through_confounding_across_strata():
    df = _strata_frame(rising=False)
    rho = stats.spearmanr(df["memorization"], df["steps"]).statistic
    assert rho > 0.6  # pooled over strata, memorization looks strongly tied to steps
    res = stratified_cox(df, "steps", "forgotten", ["memorization"], strata="group")
    r = res["memorization"]
    assert r["coef_lo"] < 0 < r["coef_hi"] and r["error"] is None
    assert (r["n"], r["events"]) == (120, int(df["forgotten"].sum()))
    assert r["hr"] == pytest.approx(math.exp(r["coef"]), **EXACT)
    assert r["hr_lo"] == pytest.approx(math.exp(r["coef_lo"])) and r["hr_hi"] == pytest.approx(math.exp(r["coef_hi"]))
    # The same data without strata (and standardized over all rows) is fooled by the between-strata trend.
    pooled = stratified_cox(df, "steps", "forgotten", ["memorization"], None, standardize="pooled")["memorization"]
    assert pooled["coef_hi"] < 0


def test_stratified_cox_detects_a_within_stratum_rise():
    df = _strata_frame(rising=True)
    res = stratified_cox(df, "steps", "forgotten", ["memorization"], strata=["group"])
    assert res["memorization"]["coef_hi"] < 0 and res["memorization"]["hr_hi"] < 1


def test_stratified_cox_coefficients_are_per_standard_deviation():
    df = _strata_frame(rising=True)
    a = stratified_cox(df, "steps", "forgotten", ["memorization"], "group")["memorization"]
    df["memorization"] = 1000.0 * df["memorization"] - 7.0  # units must not matter after z-scoring
    b = stratified_cox(df, "steps", "forgotten", ["memorization"], "group")["memorization"]
    assert b["coef"] == pytest.approx(a["coef"], rel=1e-6)


def test_stratified_cox_constant_and_failing_covariates_give_nans():
    df = _strata_frame(rising=False)
    df["const"] = 1.0
    df["per_group"] = df["group"] * 1.0  # varies only between strata
    res = stratified_cox(df, "steps", "forgotten", ["memorization", "const", "per_group"], "group")
    assert math.isnan(res["const"]["coef"]) and res["const"]["error"] == "constant covariate"
    assert math.isnan(res["per_group"]["coef"]) and res["per_group"]["error"] == "no variation within strata"
    assert math.isnan(res["const"]["hr_lo"]) and not res["const"]["usable"]
    # The usable covariate is still fitted, and matches a fit of it alone.
    alone = stratified_cox(df, "steps", "forgotten", ["memorization"], "group")["memorization"]
    assert res["memorization"]["coef"] == pytest.approx(alone["coef"], rel=1e-9)
    # Perfectly collinear covariates: lifelines cannot converge -> NaNs and an error, no exception.
    df["difficulty"] = 2.0 * df["memorization"] + 1.0
    bad = stratified_cox(df, "steps", "forgotten", ["memorization", "difficulty"], "group")
    for c in ("memorization", "difficulty"):
        assert math.isnan(bad[c]["coef"]) and bad[c]["error"].startswith("ConvergenceError")
