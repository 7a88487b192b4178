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
    nan = math.nan
    return {"coef": nan, "se": nan, "coef_lo": nan, "coef_hi": nan, "hr": nan, "hr_lo": nan, "hr_hi": nan,
            "p": nan, "n": n, "events": events, "loglik": nan, "loglik_null": nan,
            "error": error, "warning": warning, "usable": False}


def _exp(x: float) -> float:
    # near-separation can run a bound past exp's range (an OverflowError): the hazard ratio is then inf
    return math.exp(x) if x < 709.0 else math.inf


def _standardize(data: pd.DataFrame, covariates: list[str], strata: list[str], how: str) -> dict:
    """z-score each covariate within each stratum (how="stratum"; a stratum where it is constant gets 0, which a
    stratified fit ignores) or over the whole frame (how="pooled"); {covariate: error} for those left out."""
    errors = {}
    for c in covariates:
        x = data[c].astype(float)
        if not (len(x) > 1 and float(x.std(ddof=1)) > 0):
            errors[c] = "constant covariate"
            continue
        if strata and (data.groupby(strata, observed=True)[c].nunique() <= 1).all():
            # no within-stratum information; lifelines would fail on the singular Hessian and take the others down
            errors[c] = "no variation within strata"
            continue
        if how == "stratum" and strata:
            g = x.groupby([data[k] for k in strata], observed=True)
            sd = g.transform("std")  # NaN for a one-example stratum, like 0: that stratum's z is 0
            data[c] = ((x - g.transform("mean")) / sd.where(sd > 0)).fillna(0.0)
        else:
            data[c] = (x - x.mean()) / float(x.std(ddof=1))
    return errors


def stratified_cox(df: pd.DataFrame, duration_col: str, event_col: str,
                   covariates: Sequence[str], strata: str | Sequence[str] | None, standardize: str = "stratum") -> dict:
    """Cox model of the hazard of being forgotten, stratified; coefficients per within-stratum standard deviation.

    Each covariate is z-scored within each stratum (standardize="stratum", the default; "pooled": over the whole
    frame, which lets the spread between strata set the unit), so `coef` is the change in log hazard per
    within-stratum SD. Each stratum (e.g. the forget request) gets its own baseline hazard, so only differences
    inside strata inform the coefficients. Returns {covariate: {coef, se, coef_lo, coef_hi (95% interval of coef),
    hr, hr_lo, hr_hi (the same on the hazard-ratio scale), p (Wald), n, events, loglik (of the fit), loglik_null
    (all coefficients 0), error, warning, usable}}; `lo`/`hi` repeat coef_lo/coef_hi for readers of the old names.
    `usable` is False when the fit failed (`error`) or warned (`warning`: no convergence, near-separation): its
    Wald numbers are then not evidence. A covariate constant overall or within every stratum gets NaNs and an
    error while the others are still fitted. Rows with a missing value are left out (`n` counts those used).
    """
    covariates = list(covariates)
    strata = [] if strata is None else [strata] if isinstance(strata, str) else list(strata)
    if not covariates:
        raise ValueError("no covariates")
    if standardize not in ("stratum", "pooled"):
        raise ValueError(f"standardize must be 'stratum' or 'pooled', got {standardize!r}")
    missing = [c for c in [duration_col, event_col, *covariates, *strata] if c not in df.columns]
    if missing:
        raise ValueError(f"columns not in frame: {missing}")

    data = df[[duration_col, event_col, *covariates, *strata]].dropna().copy()
    data[event_col] = data[event_col].astype(bool).astype(int)
    n, events = int(len(data)), int(data[event_col].sum())
    if events == 0:
        return {c: _nan_row(n, events, "no events") for c in covariates}
    result = {c: _nan_row(n, events, e) for c, e in _standardize(data, covariates, strata, standardize).items()}
    usable = [c for c in covariates if c not in result]
    if not usable:
        return {c: result[c] for c in covariates}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cph = CoxPHFitter().fit(data[[duration_col, event_col, *usable, *strata]], duration_col=duration_col,
                                    event_col=event_col, strata=strata or None)
            lrt = cph.log_likelihood_ratio_test()
    except Exception as exc:  # lifelines raises ConvergenceError, LinAlgError, ValueError...
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        result.update({c: _nan_row(n, events, err) for c in usable})
        return {c: result[c] for c in covariates}
    # Warnings (no convergence, near-separation: the estimate runs off to infinity) do not stop the fit but make
    # its Wald numbers meaningless, so they travel with the result and mark it unusable.
    notes = sorted({str(w.message).strip().splitlines()[0] for w in caught
                    if "ConvergenceWarning" in type(w.message).__name__ or issubclass(w.category, RuntimeWarning)})
    warning = "; ".join(notes) or None
    loglik = float(cph.log_likelihood_)
    s = cph.summary
    for c in usable:
        coef, lo, hi = (float(s.loc[c, k]) for k in ("coef", "coef lower 95%", "coef upper 95%"))
        result[c] = {"coef": coef, "se": float(s.loc[c, "se(coef)"]), "coef_lo": lo, "coef_hi": hi, "hr": _exp(coef),
                     "hr_lo": _exp(lo), "hr_hi": _exp(hi), "p": float(s.loc[c, "p"]), "n": n,
                     "events": events, "loglik": loglik, "loglik_null": loglik - float(lrt.test_statistic) / 2,
                     "error": None, "warning": warning, "usable": warning is None}
    return {c: result[c] for c in covariates}
