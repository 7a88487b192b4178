"""Censoring-aware statistics for steps to forget (docs/findings.md: "Example level: the fraction not yet
forgotten" and "F3 — memorization and steps to forget").

An example that is still not forgotten at `max_steps`, or whose request collapsed first, has a
step count we only know a lower bound of. Treating that bound as the value (a sentinel) biases
every mean and correlation; survival analysis uses it for exactly what it is. All estimators come
from lifelines; this module only adapts inputs and outputs and turns degenerate cases (no events,
a constant covariate, a fit that does not converge) into NaNs with a reason instead of exceptions.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test

__all__ = ["kaplan_meier", "median_survival", "logrank", "stratified_cox"]

_KM_COLUMNS = ["step", "at_risk", "events", "survival", "lo", "hi"]


def _durations(durations, observed) -> tuple[np.ndarray, np.ndarray]:
    """Validated (durations, observed) arrays; observed is cast to bool."""
    d = np.asarray(durations, dtype=float).ravel()
    e = np.asarray(observed).ravel()
    if d.shape != e.shape:
        raise ValueError(f"durations and observed must have the same length, got {d.size} and {e.size}")
    if d.size and not (np.all(np.isfinite(d)) and np.all(d >= 0)):
        raise ValueError("durations must be finite and non-negative (censor instead of using inf)")
    return d, e.astype(bool)


def kaplan_meier(durations, observed) -> pd.DataFrame:
    """Kaplan-Meier table: step, at_risk, events, survival (fraction not yet forgotten), lo, hi (95%).

    One row per distinct duration plus a starting row at step 0 (survival 1). The interval is
    lifelines' exponential Greenwood interval, which stays inside [0, 1]. Empty input gives an
    empty table with the same columns.
    """
    d, e = _durations(durations, observed)
    if d.size == 0:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in _KM_COLUMNS})
    km = KaplanMeierFitter().fit(d, event_observed=e)
    table = km.event_table
    ci = km.confidence_interval_survival_function_
    out = pd.DataFrame({
        "step": table.index.to_numpy(dtype=float),
        "at_risk": table["at_risk"].to_numpy(dtype=int),
        "events": table["observed"].to_numpy(dtype=int),
        "survival": km.survival_function_.loc[table.index].iloc[:, 0].to_numpy(dtype=float),
        "lo": ci.loc[table.index].iloc[:, 0].to_numpy(dtype=float),
        "hi": ci.loc[table.index].iloc[:, 1].to_numpy(dtype=float),
    })
    return out


def median_survival(durations, observed) -> float:
    """Median steps to forget from Kaplan-Meier (first step with survival <= 0.5); inf if not reached, NaN if empty."""
    d, e = _durations(durations, observed)
    if d.size == 0:
        return math.nan
    return float(KaplanMeierFitter().fit(d, event_observed=e).median_survival_time_)


def logrank(durations_a, observed_a, durations_b, observed_b) -> dict:
    """Log-rank test of two groups: {statistic, p, n_a, n_b, events_a, events_b}; NaN without events."""
    da, ea = _durations(durations_a, observed_a)
    db, eb = _durations(durations_b, observed_b)
    out = {"statistic": math.nan, "p": math.nan, "n_a": int(da.size), "n_b": int(db.size),
           "events_a": int(ea.sum()), "events_b": int(eb.sum())}
    # With no events, or an empty group, there is nothing to compare; lifelines would report a
    # statistic of 0 and p = 1, which reads as "no difference" rather than "no information".
    if da.size == 0 or db.size == 0 or out["events_a"] + out["events_b"] == 0:
        return out
    res = logrank_test(da, db, event_observed_A=ea, event_observed_B=eb)
    out["statistic"] = float(res.test_statistic)
    out["p"] = float(res.p_value)
    return out


def _nan_row(n: int, events: int, error: str | None, warning: str | None = None) -> dict:
    return {"coef": math.nan, "hr": math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan,
            "n": n, "events": events, "error": error, "warning": warning}


def stratified_cox(df: pd.DataFrame, duration_col: str, event_col: str,
                   covariates: Sequence[str], strata: str | Sequence[str] | None) -> dict:
    """Cox model of the hazard of being forgotten, stratified; coefficients are per standard deviation.

    Each covariate is z-scored over the whole frame before fitting, so `coef` is the change in log
    hazard per (pooled) standard deviation and `hr = exp(coef)`. Each stratum (e.g. the forget
    request, or kind x repetitions) gets its own baseline hazard, so only covariate differences
    *within* strata inform the coefficients. Returns {covariate: {coef, hr, lo, hi, p, n, events,
    error, warning}} with lo/hi the 95% interval of coef. A covariate that is constant (overall or
    within every stratum) gets NaNs and an `error`, and the others are still fitted; a fit that
    fails gets NaNs and the `error` for every covariate. Rows with a missing value in any used
    column are left out, and `n` says how many were used. Empty or None strata: unstratified.
    """
    covariates = list(covariates)
    if strata is None:
        strata = []
    elif isinstance(strata, str):
        strata = [strata]
    else:
        strata = list(strata)
    if not covariates:
        raise ValueError("no covariates")
    missing = [c for c in [duration_col, event_col, *covariates, *strata] if c not in df.columns]
    if missing:
        raise ValueError(f"columns not in frame: {missing}")

    data = df[[duration_col, event_col, *covariates, *strata]].dropna().copy()
    data[event_col] = data[event_col].astype(bool).astype(int)
    n = int(len(data))
    events = int(data[event_col].sum())
    result: dict = {}
    if events == 0:
        return {c: _nan_row(n, events, "no events") for c in covariates}

    usable = []
    for c in covariates:
        x = data[c].astype(float)
        sd = float(x.std(ddof=1)) if n > 1 else 0.0
        if not (sd > 0):
            result[c] = _nan_row(n, events, "constant covariate")
            continue
        # A covariate that never varies inside a stratum carries no within-stratum information;
        # lifelines would fail on the singular Hessian and take the other covariates down with it.
        if strata and (data.groupby(strata, observed=True)[c].nunique() <= 1).all():
            result[c] = _nan_row(n, events, "no variation within strata")
            continue
        data[c] = (x - x.mean()) / sd
        usable.append(c)
    if not usable:
        return {c: result[c] for c in covariates}

    fit_frame = data[[duration_col, event_col, *usable, *strata]]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cph = CoxPHFitter().fit(fit_frame, duration_col=duration_col, event_col=event_col,
                                    strata=strata or None)
    except Exception as exc:  # lifelines raises ConvergenceError, LinAlgError, ValueError...
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        for c in usable:
            result[c] = _nan_row(n, events, err)
        return {c: result[c] for c in covariates}
    # Warnings (e.g. near-separation, where the estimate runs off to infinity) do not stop the
    # fit but make its numbers suspect, so they travel with the result instead of to stderr.
    notes = sorted({str(w.message).strip().splitlines()[0] for w in caught
                    if "ConvergenceWarning" in type(w.message).__name__ or
                    issubclass(w.category, RuntimeWarning)})
    warning = "; ".join(notes) or None
    s = cph.summary
    for c in usable:
        coef = float(s.loc[c, "coef"])
        # near-separation can run coef past exp's range (an OverflowError): the hazard ratio is then inf
        result[c] = {"coef": coef, "hr": math.exp(coef) if coef < 709.0 else math.inf,
                     "lo": float(s.loc[c, "coef lower 95%"]), "hi": float(s.loc[c, "coef upper 95%"]),
                     "p": float(s.loc[c, "p"]), "n": n, "events": events,
                     "error": None, "warning": warning}
    return {c: result[c] for c in covariates}
