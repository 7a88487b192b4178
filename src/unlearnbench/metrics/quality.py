"""Unlearning quality, forgetting and steps-to-forget (docs/definitions.md).

All functions take per-example exposures (bits) of one request's forget set F under the model
after t steps (e_t), the original model (e_0) and the oracle (e_r), as paired 1-D arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

__all__ = [
    "UQResult",
    "bootstrap_ci",
    "first_crossing",
    "forget_quality_ks",
    "forgotten",
    "steps_to_forget",
    "unlearning_quality",
    "uq_example",
    "uq_with_ci",
]


@dataclass(frozen=True)
class UQResult:
    """Group-mean unlearning quality; ``gap`` = mean(e_0) - mean(e_r) before flooring."""

    uq: float
    nothing_to_forget: bool
    gap: float


def _paired(*arrays) -> list[np.ndarray]:
    """Float 1-D copies of equal-length arrays, keeping only positions finite in all of them."""
    arrs = [np.asarray(a, dtype=float).ravel() for a in arrays]
    n = {a.size for a in arrs}
    if len(n) > 1:
        raise ValueError(f"paired arrays must have equal length, got sizes {[a.size for a in arrs]}")
    keep = np.logical_and.reduce([np.isfinite(a) for a in arrs])
    return [a[keep] for a in arrs]


def unlearning_quality(e_t, e_0, e_r, min_gap_bits: float = 1.0) -> UQResult:
    """UQ = 1 - |mean e_t - mean e_r| / max(mean e_0 - mean e_r, min_gap_bits).

    Flags ``nothing_to_forget`` when the gap is below the floor (the request was barely
    memorized, so its UQ is reported but not meaningful). Examples with a non-finite exposure in
    any of the three arrays are dropped pairwise; with none left UQ is NaN.
    """
    t, o, r = _paired(e_t, e_0, e_r)
    if t.size == 0:
        return UQResult(uq=float("nan"), nothing_to_forget=True, gap=float("nan"))
    gap = float(o.mean() - r.mean())
    denom = max(gap, float(min_gap_bits))
    # min_gap_bits <= 0 leaves a non-positive denominator possible; UQ is undefined there.
    uq = 1.0 - abs(float(t.mean() - r.mean())) / denom if denom > 0 else float("nan")
    return UQResult(uq=float(uq), nothing_to_forget=bool(gap < min_gap_bits), gap=gap)


def uq_example(e_t, e_0, e_r) -> float:
    """Per-example UQ: 1 - mean|e_t - e_r| / mean|e_0 - e_r|; NaN when the denominator is 0."""
    t, o, r = _paired(e_t, e_0, e_r)
    denom = float(np.abs(o - r).mean()) if o.size else 0.0
    if denom == 0.0:
        return float("nan")
    return 1.0 - float(np.abs(t - r).mean()) / denom


def forget_quality_ks(e_t, e_r) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test between {e_t} and {e_r} (NaNs dropped)."""
    t = np.asarray(e_t, dtype=float).ravel()
    r = np.asarray(e_r, dtype=float).ravel()
    t, r = t[~np.isnan(t)], r[~np.isnan(r)]
    if t.size == 0 or r.size == 0:
        return float("nan")
    return float(stats.ks_2samp(t, r).pvalue)


def bootstrap_ci(stat_fn: Callable[..., float], *arrays, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat_fn(*arrays)``, resampling examples jointly.

    The arrays are paired (same length along axis 0) and one index draw is applied to all of
    them. Non-finite replicate statistics are dropped; with none left, or no examples, the
    interval is (nan, nan). Deterministic for a given seed.
    """
    arrs = [np.asarray(a) for a in arrays]
    if not arrs:
        raise ValueError("bootstrap_ci needs at least one array")
    n = arrs[0].shape[0] if arrs[0].ndim else 0
    if any((a.shape[0] if a.ndim else 0) != n for a in arrs):
        raise ValueError("bootstrap_ci arrays must have equal length along axis 0")
    if n == 0 or n_boot < 1:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    with np.errstate(all="ignore"):
        reps = np.array([float(stat_fn(*(a[i] for a in arrs))) for i in idx])
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def uq_with_ci(e_t, e_0, e_r, min_gap_bits: float = 1.0, n_boot: int = 1000, seed: int = 0,
               alpha: float = 0.05) -> dict:
    """UQ, per-example UQ (each with a 1 - alpha bootstrap interval over F) and KS forget quality."""
    t, o, r = _paired(e_t, e_0, e_r)
    res = unlearning_quality(t, o, r, min_gap_bits)
    uq_lo, uq_hi = bootstrap_ci(lambda a, b, c: unlearning_quality(a, b, c, min_gap_bits).uq,
                                t, o, r, n_boot=n_boot, alpha=alpha, seed=seed)
    ex_lo, ex_hi = bootstrap_ci(uq_example, t, o, r, n_boot=n_boot, alpha=alpha, seed=seed)
    return {
        "uq": res.uq, "uq_lo": uq_lo, "uq_hi": uq_hi,
        "uq_example": uq_example(t, o, r), "uq_example_lo": ex_lo, "uq_example_hi": ex_hi,
        "forget_quality": forget_quality_ks(e_t, e_r),
        "nothing_to_forget": res.nothing_to_forget, "gap": res.gap,
    }


def forgotten(e_t, e_r, tolerance_bits: float = 0.5) -> np.ndarray:
    """Boolean array: e_t <= e_r + tolerance_bits (NaN compares False, i.e. not forgotten)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(e_t, dtype=float) <= np.asarray(e_r, dtype=float) + tolerance_bits


def steps_to_forget(steps, forgotten_matrix, max_steps) -> tuple[np.ndarray, np.ndarray]:
    """First evaluated step at which each example is forgotten, with a censoring flag.

    ``steps``: increasing 1-D array of evaluated steps; ``forgotten_matrix``: bool [n_steps,
    n_examples]. Examples never forgotten get ``max_steps`` and censored=True.
    """
    steps = np.asarray(steps)
    m = np.asarray(forgotten_matrix, dtype=bool)
    if steps.ndim != 1 or m.ndim != 2 or m.shape[0] != steps.size:
        raise ValueError(f"need steps [n_steps] and forgotten_matrix [n_steps, n_examples]; "
                         f"got {steps.shape} and {m.shape}")
    if steps.size > 1 and np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing")
    ever = m.any(axis=0)
    first = np.argmax(m, axis=0)  # index of the first True (0 when there is none, masked below)
    dtype = np.result_type(steps.dtype, np.asarray(max_steps).dtype)
    out = np.full(m.shape[1], max_steps, dtype=dtype)
    if steps.size:
        out[ever] = steps[first[ever]]
    return out, ~ever


def first_crossing(steps, values, threshold: float):
    """First step whose value is >= threshold (NaN never crosses), or None."""
    steps = np.asarray(steps)
    v = np.asarray(values, dtype=float)
    if steps.shape != v.shape:
        raise ValueError(f"steps and values must have the same shape, got {steps.shape} and {v.shape}")
    with np.errstate(invalid="ignore"):
        hit = np.flatnonzero(v >= threshold)
    return steps[hit[0]].item() if hit.size else None
