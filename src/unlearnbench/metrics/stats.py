"""Intervals for the findings: Spearman with a bootstrap interval, and the Student-t interval of a mean."""
from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["mean_ci", "spearman_with_ci"]


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows; NaN for rows with zero variance."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / den, np.nan)


def spearman_with_ci(x, y, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Spearman rho, its p-value and a paired percentile-bootstrap interval.

    Pairs with a NaN on either side are dropped. Fewer than 3 pairs or a constant side give
    rho = lo = hi = p = NaN instead of an exception or warning. Returns {rho, lo, hi, p, n}.
    Bootstrap replicates that come out constant are skipped; deterministic for a given seed.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.size != y.size:
        raise ValueError(f"x and y must have equal length, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    nan = float("nan")
    out = {"rho": nan, "lo": nan, "hi": nan, "p": nan, "n": int(x.size)}
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    res = stats.spearmanr(x, y)
    out["rho"], out["p"] = float(res.statistic), float(res.pvalue)
    if n_boot >= 1:
        # Spearman = Pearson on ranks; ranking all replicates at once keeps 1000 draws cheap.
        idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
        reps = _row_pearson(stats.rankdata(x[idx], axis=1), stats.rankdata(y[idx], axis=1))
        reps = reps[np.isfinite(reps)]
        if reps.size:
            lo, hi = np.percentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out["lo"], out["hi"] = float(lo), float(hi)
    return out


def mean_ci(values, alpha: float = 0.05) -> dict:
    """Mean and Student-t (1 - alpha) interval of a sample: {mean, lo, hi, n}; n = 0 gives Nones.

    One value, or identical values, give lo = hi = mean: nothing to estimate a spread from.
    """
    vals = np.asarray(values, dtype=float).ravel()
    if vals.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(vals.mean())
    if vals.size < 2 or np.all(vals == vals[0]):
        return {"mean": mean, "lo": mean, "hi": mean, "n": int(vals.size)}
    half = float(stats.t.ppf(1 - alpha / 2, vals.size - 1) * vals.std(ddof=1) / np.sqrt(vals.size))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(vals.size)}
