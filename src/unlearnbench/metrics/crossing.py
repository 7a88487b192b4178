"""Crossing steps and threshold-free summaries of unlearning curves, without grid artefacts.

Evaluations sit on a log-spaced schedule (docs/definitions.md, section 7), so a crossing reported as "the
first evaluated step" jumps between grid points (8 -> 10 -> 13) and makes two requests that crossed
a hair apart look 25% apart. Everything here interpolates linearly in x = log(1 + step), the axis
the schedule is uniform in (docs/findings.md, "Crossing steps without grid artefacts").
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["UQ_TARGETS", "interpolated_crossing", "value_at_step", "uq_auc"]

# The UQ targets every request's outcome and every finding are reported at, besides `metrics.uq_target`.
UQ_TARGETS = (0.5, 0.8, 0.9)


def _curve(steps, values) -> tuple[np.ndarray, np.ndarray]:
    """Validated (steps, values) as float arrays; steps must be non-negative and strictly increasing."""
    s = np.asarray(steps, dtype=float).ravel()
    v = np.asarray(values, dtype=float).ravel()
    if s.shape != v.shape:
        raise ValueError(f"steps and values must have the same length, got {s.size} and {v.size}")
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("steps must be finite")
    if s.size and s[0] < 0:
        raise ValueError(f"steps must be non-negative, got {s[0]}")
    # An unsorted or repeated step would make "the last evaluation below" ambiguous; the callers
    # hold one history per request, so this is a bug upstream rather than something to repair.
    if s.size > 1 and not np.all(np.diff(s) > 0):
        raise ValueError("steps must be strictly increasing")
    return s, v


def interpolated_crossing(steps, values, threshold: float) -> float | None:
    """First step where values reach threshold, interpolated linearly in log(1+step); None if never."""
    s, v = _curve(steps, values)
    with np.errstate(invalid="ignore"):
        # NaN >= t is False, so a NaN evaluation (a broken score) never counts as reached.
        at_or_above = v >= threshold
    # Step 0 is where unlearning starts, not a result of it: a request already at the target
    # before any step (nothing left to forget) must not be reported as unlearned at step 0.
    at_or_above &= s > 0
    hit = np.flatnonzero(at_or_above)
    if hit.size == 0:
        return None
    j = int(hit[0])
    if j == 0:
        # No evaluation before the first one (the history does not start at 0): nothing to
        # interpolate from, so the observed step is the best statement we can make.
        return float(s[j])
    s_lo, v_lo, s_hi, v_hi = s[j - 1], v[j - 1], s[j], v[j]
    # The preceding evaluation is either below (the normal case), NaN (treated as below but with no
    # value to interpolate from) or step 0 already at/above. In the last two cases the crossing lies
    # somewhere in (s_lo, s_hi] with no way to place it, so report the observed step.
    if not (np.isfinite(v_lo) and np.isfinite(v_hi)) or v_lo >= threshold:
        return float(s_hi)
    frac = (threshold - v_lo) / (v_hi - v_lo)
    if frac >= 1.0:
        # Exactly on the threshold: return the grid step itself, free of log/exp round-off.
        return float(s_hi)
    x = math.log1p(s_lo) + frac * (math.log1p(s_hi) - math.log1p(s_lo))
    return math.expm1(x)


def value_at_step(steps, values, step: float) -> float:
    """Value at a (possibly fractional) step, interpolated linearly in log(1+step).

    For utility read at an interpolated crossing, pass log-perplexity (NLL), not perplexity:
    perplexity is exponential in it, so interpolating perplexity itself would bias it upwards.
    Raises ValueError for a step outside the evaluated range (no extrapolation).
    """
    s, v = _curve(steps, values)
    if s.size == 0:
        raise ValueError("empty curve")
    step = float(step)
    if not (s[0] <= step <= s[-1]):
        raise ValueError(f"step {step} is outside the evaluated range [{s[0]}, {s[-1]}]")
    exact = np.flatnonzero(s == step)
    if exact.size:
        # On a grid point, return it untouched even if a neighbour is NaN.
        return float(v[exact[0]])
    j = int(np.searchsorted(s, step))  # s[j-1] < step < s[j]
    x0, x1, x = math.log1p(s[j - 1]), math.log1p(s[j]), math.log1p(step)
    w = (x - x0) / (x1 - x0)
    return float((1.0 - w) * v[j - 1] + w * v[j])


def uq_auc(steps, uq, horizon: float) -> float:
    """Mean of the running maximum of UQ (clipped to [0, 1]) over x = log(1+step) on [0, log(1+horizon)]; higher =
    unlearned faster.

    The running maximum is what the request had reached by each step, so a request that forgot fast and then
    overshot (UQ falling again as unlearning goes past the oracle) keeps the credit for its speed: the area reads
    speed, not overshoot. Trapezoid rule on the evaluations, which are clipped before interpolating. The last
    (maximal) value is carried forward to the horizon when the curve stops earlier; the first value is carried
    back to step 0 when the curve starts later. NaN counts as UQ 0 (no credit for a broken score). Evaluations
    past the horizon are ignored.
    """
    s, v = _curve(steps, uq)
    if s.size == 0:
        raise ValueError("empty curve")
    horizon = float(horizon)
    if not (np.isfinite(horizon) and horizon > 0):
        raise ValueError(f"horizon must be a positive finite step, got {horizon}")
    v = np.maximum.accumulate(np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0))
    x = np.log1p(s)
    x_end = math.log1p(horizon)
    inside = x < x_end
    grid = np.concatenate(([0.0], x[inside & (x > 0)], [x_end]))
    # np.interp holds the end values constant outside the evaluated range, which is exactly the
    # carry-forward (and carry-back) rule above.
    y = np.interp(grid, x, v)
    area = float(np.sum(np.diff(grid) * (y[:-1] + y[1:]) / 2.0))
    return area / x_end
