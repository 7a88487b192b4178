"""The metrics behind the verdicts that issue 24 changed: the area on the running maximum of UQ, the Cox fit's
within-stratum units and bound names, and the recovered-share bootstrap's count of unusable resamples."""
import math

import numpy as np
import pandas as pd
import pytest

from unlearnbench.metrics.crossing import interpolated_crossing, uq_auc
from unlearnbench.metrics.survival import stratified_cox

GRID = [0, 1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 65, 80, 100]


def test_area_reads_speed_not_overshoot():
    """canary_r1_g2's pattern: UQ 0.95 after one step (UQ 0.9 crossed at 2^(0.9/0.95) - 1 = 0.93 steps, the fastest
    request), then falling as unlearning overshoots. On the running maximum its area is 0.95 (1 - 0.5 ln 2 / ln 101)
    = 0.879; the plain curve gave 0.44 (0.32 on the default run), below a request that crossed 8x later."""
    fast = [0.0, 0.95, 0.8, 0.6, 0.5, 0.45, 0.4, 0.35, 0.33, 0.32, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    assert interpolated_crossing(GRID, fast, 0.9) == pytest.approx(2 ** (0.9 / 0.95) - 1)
    assert 2 ** (0.9 / 0.95) - 1 == pytest.approx(0.93, abs=0.005)
    area = uq_auc(GRID, fast, 100)
    assert area == pytest.approx(0.95 * (1 - 0.5 * math.log(2) / math.log(101)), rel=1e-12)
    # a request that climbs steadily and crosses 0.9 only at 7.65 steps reads slower
    slow = np.minimum(1.0, np.log1p(GRID) / math.log(11))
    assert interpolated_crossing(GRID, slow, 0.9) == pytest.approx(11 ** 0.9 - 1) and uq_auc(GRID, slow, 100) < area
    # what the old carry-forward of the falling curve read: the plain trapezoid of the clipped curve
    x = np.log1p(GRID)
    old = float(np.sum(np.diff(x) * (np.array(fast[:-1]) + np.array(fast[1:])) / 2) / math.log(101))
    assert old == pytest.approx(0.44, abs=0.005) and old < uq_auc(GRID, slow, 100)  # the fast one ranked slower


def _frame(seed=0, n=30):
    rng = np.random.default_rng(seed)
    parts = []
    for g, (mean, scale) in enumerate(((0.3, 5.0), (1.2, 20.0), (2.9, 80.0))):
        mem = rng.normal(mean, 0.2 * (g + 1), n)
        steps = rng.exponential(scale * np.exp(1.5 * (mem - mean) / (0.2 * (g + 1))))
        parts.append(pd.DataFrame({"steps": np.minimum(steps, 200.0), "forgotten": steps < 200, "memorization": mem,
                                   "difficulty": rng.normal(4, 0.3, n), "group": g}))
    return pd.concat(parts, ignore_index=True)


def test_cox_coefficients_are_per_within_stratum_sd_and_bounds_are_named_by_scale():
    df = _frame()
    a = stratified_cox(df, "steps", "forgotten", ["memorization", "difficulty"], "group")["memorization"]
    # a per-stratum shift and a per-stratum rescaling of memorization leave the within-stratum z unchanged
    moved = df.assign(memorization=df.memorization * (1 + df.group) * 3.0 + 10.0 * df.group)
    b = stratified_cox(moved, "steps", "forgotten", ["memorization", "difficulty"], "group")["memorization"]
    assert b["coef"] == pytest.approx(a["coef"], rel=1e-6) and a["usable"] and a["warning"] is None
    # the pooled z-score (the old unit) lets the gaps between strata set the scale: a different coefficient
    pooled = stratified_cox(moved, "steps", "forgotten", ["memorization", "difficulty"], "group",
                            standardize="pooled")["memorization"]
    assert abs(pooled["coef"] - a["coef"]) > 0.1
    assert (a["hr"], a["hr_lo"], a["hr_hi"]) == pytest.approx(
        (math.exp(a["coef"]), math.exp(a["coef_lo"]), math.exp(a["coef_hi"])))
    assert a["coef_lo"] < a["coef"] < a["coef_hi"] < 0 and "lo" not in a and "hi" not in a
    assert a["loglik"] > a["loglik_null"]


def test_cox_within_stratum_z_by_hand():
    """One stratum's z is (x - its mean) / its SD: fitting on hand-standardized values gives the same coefficient."""
    df = _frame(1)
    z = df.groupby("group").memorization.transform(lambda v: (v - v.mean()) / v.std(ddof=1))
    a = stratified_cox(df, "steps", "forgotten", ["memorization"], "group")["memorization"]
    b = stratified_cox(df.assign(memorization=z), "steps", "forgotten", ["memorization"], "group",
                       standardize="pooled")["memorization"]
    assert a["coef"] == pytest.approx(b["coef"] / float(z.std(ddof=1)), rel=1e-6)  # pooled: per SD of z


def test_cox_fit_that_warns_is_not_usable():
    # more memorized strictly slower inside every stratum: monotone likelihood, lifelines warns
    rows = [(g, m, s) for g in range(3) for m, s in ((0.1, 2), (0.2, 3), (0.3, 4))]
    df = pd.DataFrame(rows, columns=["group", "memorization", "steps"]).assign(forgotten=1)
    r = stratified_cox(df, "steps", "forgotten", ["memorization"], "group")["memorization"]
    assert r["warning"] and not r["usable"] and r["coef"] < 0


def test_recovered_share_reports_unusable_resamples():
    from unlearnbench.attacks import recovered_share
    from unlearnbench.metrics import bootstrap_ci

    # one example has a large gap, two have a negative one: resamples without the first have a gap <= 0
    e_att, e_r_att = np.array([5.0, 3.0, 4.0]), np.array([2.0, 2.0, 2.0])
    e_0, e_r = np.array([10.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])
    r = recovered_share(e_att, e_r_att, e_0, e_r, n_boot=400, seed=3)
    idx = np.random.default_rng(3).integers(0, 3, size=(400, 3))
    gaps = (e_0[idx] - e_r[idx]).mean(axis=1)
    assert r["n_boot_unusable"] == int((gaps <= 0).sum()) > 0
    assert r["recovered"] == pytest.approx(2.0 / (7.0 / 3))  # mean(e_att - e_r_att) = 2, gap (9 - 1 - 1) / 3

    def share(a, b, c, d):
        gap = float(np.mean(c - d))
        return float(np.mean(a - b)) / gap if gap > 0 else float("nan")
    # the interval is the one bootstrap_ci gives from the same draws (numbers unchanged by the count)
    assert (r["lo"], r["hi"]) == pytest.approx(bootstrap_ci(share, e_att, e_r_att, e_0, e_r, n_boot=400, seed=3))
