"""Contrasts of exchangeable forget groups and the rules that turn them into verdicts (docs/findings.md, "How a
finding is decided"). Pure: arrays in, dicts out.

- Two samples, not pairs: nothing links ID group g to OOD group g, so a cell is a Welch contrast of the two sides'
  groups (Welch's statistic, Hsu's conservative degrees of freedom), which no relabelling of groups can change.
- Seeds as the unit: with two or more seeds, each seed gives one contrast (mean of its other-side groups minus mean
  of its reference-side groups: inside a seed both sides share the trained pair) and the interval is a one-sample t
  over seeds (`ttest_1samp`, n = seeds). Per-seed verdicts are never counted as votes.
- Censoring as a bound: a censored request needed more than its censoring step. It enters at that step, which can
  only understate its side; so evidence that the other side is *larger* may use censored other-side values but none
  on the reference side, and the mirror for *smaller*. A direction whose bound would point the wrong way is not
  tested (its one-sided p is 1, its interval end infinite).
- Family-wise control: Holm over a finding's cells on two-sided p-values; the overall verdict counts reversed
  cells exactly as it counts reproduced ones.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

__all__ = ["ALPHA", "two_sample", "over_seeds", "holm", "overall_verdict", "variance_components"]

ALPHA = 0.05
# a standard error this small relative to the effect is identical values, not precision: never evidence by itself
_ZERO_SE = 1e-12


def _arrays(values, censored) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=float).ravel()
    c = np.zeros(x.shape, bool) if censored is None else np.asarray(censored, dtype=bool).ravel()
    if x.shape != c.shape:
        raise ValueError(f"values and censored flags differ in length: {x.size} vs {c.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite: leave collapsed or missing requests out and count them")
    return x, c


def _empty(unit: str, n: int, reason: str, **extra) -> dict:
    return {"effect": None, "lo": None, "hi": None, "se": None, "df": None, "p": None, "p_up": None,
            "p_down": None, "direction": None, "untested": None, "n_unit": unit, "n": n, "reason": reason, **extra}


def _decide(effect: float, se: float, df: float, up_ok: bool, down_ok: bool, alpha: float, unit: str, n: int,
            extra: dict) -> dict:
    """One contrast from its t statistic: one-sided tests in the directions the censoring allows, the two-sided p
    by the union bound (2 min(p_up, p_down), valid whichever directions are tested), the (1 - alpha) interval from
    the two one-sided (1 - alpha/2) bounds (an untested direction leaves its end infinite)."""
    if not (up_ok or down_ok):
        return _empty(unit, n, "censored requests on both sides: neither direction has a bound", **extra)
    if not se > _ZERO_SE * max(1.0, abs(effect)):
        return _empty(unit, n, "no spread: identical values give a zero-width interval, which is not evidence",
                      effect=effect, **extra)
    t, half = effect / se, float(stats.t.ppf(1 - alpha / 2, df)) * se
    p_up = float(stats.t.sf(t, df)) if up_ok else 1.0
    p_down = float(stats.t.cdf(t, df)) if down_ok else 1.0
    lo = effect - half if up_ok else -math.inf
    hi = effect + half if down_ok else math.inf
    direction = "up" if lo > 0 else "down" if hi < 0 else None
    untested = None if up_ok and down_ok else ("up" if down_ok else "down")
    return {"effect": effect, "lo": lo, "hi": hi, "se": se, "df": df, "p": min(1.0, 2 * min(p_up, p_down)),
            "p_up": p_up, "p_down": p_down, "direction": direction, "untested": untested, "n_unit": unit, "n": n,
            "reason": None, **extra}


def two_sample(ref, other, ref_censored=None, other_censored=None, alpha: float = ALPHA,
               min_per_side: int = 2) -> dict:
    """Welch contrast mean(other) - mean(ref) over groups (one seed) with Hsu's df = min(n_ref, n_other) - 1,
    censored values entering as lower bounds.

    Returns {effect, lo, hi, se, df, p (two-sided), p_up, p_down, direction ("up": interval above 0, "down": below,
    None), untested (the direction censoring left without a bound: its interval end is infinite), n_unit "groups",
    n, n_ref, n_other, n_bound_ref, n_bound_other, reason (why there is no interval)}.
    """
    a, ca = _arrays(ref, ref_censored)
    b, cb = _arrays(other, other_censored)
    extra = {"n_ref": int(a.size), "n_other": int(b.size), "n_bound_ref": int(ca.sum()), "n_bound_other": int(cb.sum())}
    n = int(a.size + b.size)
    if a.size < min_per_side or b.size < min_per_side:
        return _empty("groups", n, f"fewer than {min_per_side} usable groups on a side", **extra)
    # Welch's statistic with Hsu's degrees of freedom, min(n_ref, n_other) - 1: with 2-3 groups a side and spreads
    # that differ 10-100x between kinds (benchmarks/results/replicate_spread.json), Welch-Satterthwaite's estimated
    # df is liberal (a 3-vs-2 cell rejects 8.5% of true nulls at 5% when the smaller side is 30x more variable);
    # Hsu's df keeps the level for every variance ratio (conservative). From the formula, not scipy's ttest_ind,
    # because the calibration harness calls this millions of times and scipy's result objects cost 10x the
    # arithmetic.
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se, df = math.sqrt(va + vb), float(min(a.size, b.size) - 1)
    # a censored reference value bounds the reference from below: it can only make "other is larger" look larger
    return _decide(float(b.mean() - a.mean()), se, df, up_ok=not ca.any(), down_ok=not cb.any(), alpha=alpha,
                   unit="groups", n=n, extra=extra)


def over_seeds(per_seed: Sequence[tuple], alpha: float = ALPHA, min_seeds: int = 2) -> dict:
    """Contrast with the seed as the unit: per seed, mean(other groups) - mean(ref groups); then a one-sample t over
    seeds. `per_seed`: one (ref, other, ref_censored, other_censored) per seed (censored flags may be None).

    Returns the keys of `two_sample` with n_unit "seeds", n = seeds used, `seed_effects` (one per seed used) and
    `seeds_without_both_sides` (seeds left out because a side had no usable group).
    """
    effects, up_ok, down_ok, dropped = [], True, True, 0
    n_ref = n_other = n_bound_ref = n_bound_other = 0
    for ref, other, ref_c, other_c in per_seed:
        a, ca = _arrays(ref, ref_c)
        b, cb = _arrays(other, other_c)
        if a.size == 0 or b.size == 0:
            dropped += 1
            continue
        effects.append(float(b.mean() - a.mean()))
        # a seed's contrast with a censored reference group has no upper bound on its reference mean: it cannot
        # be evidence for "other is larger", and leaving that seed out would keep only the seeds where the
        # reference was fast (a bias toward "larger"), so the whole direction is untested
        up_ok &= not ca.any()
        down_ok &= not cb.any()
        n_ref, n_other = n_ref + a.size, n_other + b.size
        n_bound_ref, n_bound_other = n_bound_ref + int(ca.sum()), n_bound_other + int(cb.sum())
    d = np.asarray(effects)
    extra = {"n_ref": n_ref, "n_other": n_other, "n_bound_ref": n_bound_ref, "n_bound_other": n_bound_other,
             "seed_effects": d.tolist(), "seeds_without_both_sides": dropped}
    if d.size < min_seeds:
        return _empty("seeds", int(d.size), f"fewer than {min_seeds} seeds with a usable group on both sides",
                      **extra)
    se = float(d.std(ddof=1) / math.sqrt(d.size))  # scipy.stats.ttest_1samp's numbers (a test checks)
    return _decide(float(d.mean()), se, float(d.size - 1), up_ok, down_ok, alpha, "seeds", int(d.size), extra)


def holm(pvalues: Mapping[str, float | None], alpha: float = ALPHA) -> dict[str, dict]:
    """Holm's step-down adjustment over the named p-values that exist (None: not in the family):
    {name: {p, p_holm, reject}}; p_holm_(i) = max over j <= i of min(1, (m - j + 1) p_(j)), reject when < alpha.

    Hand-written (eight lines) rather than statsmodels' multipletests: the project does not depend on statsmodels
    and Holm alone does not justify a new dependency; a test checks it against a hand computation.
    """
    named = sorted(((float(p), k) for k, p in pvalues.items() if p is not None), key=lambda t: t[0])
    m = len(named)
    out = {k: {"p": None, "p_holm": None, "reject": False} for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(named):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = {"p": p, "p_holm": running, "reject": running < alpha}
    return out


def overall_verdict(cells: Mapping[str, str | None], informative: Sequence[str], two_sided_claim: bool = False,
                    names: tuple[str, str] = ("reproduced", "reversed")) -> dict:
    """A finding over its cells from each cell's family-wise decision ("up", "down" or None) and the cells that
    were testable (`informative`). For a directional claim "up" supports it: reproduced (every informative cell
    up), partly reproduced (some up, none down), reversed / partly reversed (the mirror), mixed (both, with the
    cells named), not reproduced (none), inconclusive (no informative cell). For a two-sided claim (F4) either
    direction supports it, and cells that disagree in direction make it "mixed"; `names` then name the directions.
    Returns {verdict, up, down, informative, direction, detail}.
    """
    up = [c for c in informative if cells.get(c) == "up"]
    down = [c for c in informative if cells.get(c) == "down"]
    out = {"up": up, "down": down, "informative": list(informative), "direction": None, "detail": None}
    if not informative:
        return {**out, "verdict": "inconclusive", "detail": "no cell had enough usable requests"}
    if up and down:
        return {**out, "verdict": "mixed",
                "detail": f"{names[0]} in {', '.join(up)}; {names[1]} in {', '.join(down)}"}
    if not (up or down):
        return {**out, "verdict": "not reproduced"}
    hit, which = (up, 0) if up else (down, 1)
    every = len(hit) == len(informative)
    if two_sided_claim:
        return {**out, "verdict": "reproduced" if every else "partly reproduced", "direction": names[which],
                "detail": f"{names[which]} in {', '.join(hit)}"}
    verdict = ("reproduced" if every else "partly reproduced") if which == 0 else \
        ("reversed" if every else "partly reversed")
    return {**out, "verdict": verdict, "detail": f"{names[which]} in {', '.join(hit)}"}


def variance_components(values_by_seed: Sequence[Sequence[float]]) -> dict | None:
    """How much spread each replicate source adds, from `values_by_seed[seed][group]` (one-way ANOVA estimator):
    {within_seed_group_var, between_seed_var (variance of the seed means beyond what the group variance explains,
    floored at 0), seed_means, seed_share, values}; None with fewer than two seeds or three values in all."""
    vals = [np.asarray(v, float) for v in values_by_seed if len(v) >= 1]
    if len(vals) < 2 or sum(len(v) for v in vals) < 3:
        return None
    within = [float(v.var(ddof=1)) for v in vals if len(v) >= 2]
    sw = float(np.mean(within)) if within else float("nan")
    means = np.array([v.mean() for v in vals])
    nbar = float(np.mean([len(v) for v in vals]))
    sb = max(float(means.var(ddof=1)) - (sw / nbar if within else 0.0), 0.0)
    total = sb + sw
    return {"within_seed_group_var": sw, "between_seed_var": sb, "seed_means": means.tolist(),
            "seed_share": sb / total if total > 0 else None, "values": [v.tolist() for v in vals]}
