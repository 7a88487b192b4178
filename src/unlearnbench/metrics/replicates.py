"""Effects over replicates, built from outcomes rather than sentinel numbers (docs/findings.md: "Outcomes, never
sentinel numbers", "Comparing a pair", "Effect, interval and verdict").

A request ends unlearned, censored or collapsed. Writing "max_steps" (or inf) for the last two
and averaging would turn "the budget ran out" and "the model blew up" into "needed many steps",
which is exactly the evidence F1 looks for. Here each pair of sides is classified first, only
pairs that carry evidence get a number, and every pair is counted in the result.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "OUTCOME_KINDS", "COMPARISON_CLASSES", "Outcome", "compare_steps", "mean_interval",
    "paired_effect", "verdict_across", "f3_verdict",
]

OUTCOME_KINDS = ("unlearned", "censored", "collapsed")
COMPARISON_CLASSES = ("ood_later", "id_later", "tie", "inconclusive")


@dataclass(frozen=True)
class Outcome:
    """How a request ended at a target: kind in OUTCOME_KINDS, at (possibly interpolated) step."""

    kind: str
    step: float

    def __post_init__(self):
        if self.kind not in OUTCOME_KINDS:
            raise ValueError(f"outcome kind must be one of {OUTCOME_KINDS}, got {self.kind!r}")
        step = float(self.step)
        if not (math.isfinite(step) and step >= 0):
            raise ValueError(f"outcome step must be finite and non-negative, got {self.step!r}")
        object.__setattr__(self, "step", step)


def _comparison(cls: str, difference: float | None, bound: bool, reason: str) -> dict:
    return {"class": cls, "difference": difference, "bound": bound, "reason": reason}


def _by_sign(d: float) -> str:
    return "ood_later" if d > 0 else "id_later" if d < 0 else "tie"


def compare_steps(id_side: Outcome, ood_side: Outcome) -> dict:
    """Classify one ID/OOD pair for "OOD needs more steps": {class, difference (ood-id), bound, reason}."""
    if id_side.kind == "collapsed" or ood_side.kind == "collapsed":
        # Divergence ends a request for reasons unrelated to how much forgetting it needs.
        return _comparison("inconclusive", None, False, "collapsed")
    if id_side.kind == "unlearned" and ood_side.kind == "unlearned":
        d = ood_side.step - id_side.step
        return _comparison(_by_sign(d), d, False, "both unlearned")
    if id_side.kind == "censored" and ood_side.kind == "censored":
        return _comparison("inconclusive", None, False, "both censored")
    # One side censored at c, the other unlearned at s. The censored side needs more than c steps,
    # so it is later only if c > s; and c - s is a lower bound on the gap, conservative toward 0.
    censored, event = (ood_side, id_side) if ood_side.kind == "censored" else (id_side, ood_side)
    if censored.step <= event.step:
        return _comparison("inconclusive", None, False,
                           "censored at or before the other side's event")
    gap = censored.step - event.step
    d = gap if censored is ood_side else -gap
    return _comparison(_by_sign(d), d, True,
                       f"{'ood' if censored is ood_side else 'id'} censored after the other side's event")


def _finite_values(values) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(x)):
        # A NaN or inf here is a sentinel that slipped through; dropping it would hide a pair.
        raise ValueError("values must be finite; classify censored/collapsed outcomes instead")
    return x


def mean_interval(values, confidence: float = 0.95) -> dict:
    """Mean and Student-t interval: {mean, lo, hi, n}; n=1 gives NaN bounds, n=0 gives None."""
    x = _finite_values(values)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(x.mean())
    if n == 1:
        # One replicate says nothing about spread; a zero-width interval would claim certainty.
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def paired_effect(differences: Sequence[float | None], classes: Sequence[str],
                  min_pairs: int = 3, confidence: float = 0.95,
                  bounds: Sequence[bool] | None = None) -> dict:
    """Effect over replicate pairs with a verdict: {mean, lo, hi, n_informative, n_pairs, counts, verdict}.

    Differences must be oriented so that positive supports the finding (ood - id for F1);
    None marks a pair without evidence. The mean and t-interval are over the informative pairs
    (exact differences and censoring bounds alike; bounds shrink the effect toward 0). Verdict:
    fewer than `min_pairs` informative pairs -> "inconclusive"; lo > 0 -> "reproduced";
    hi < 0 -> "reversed"; else "not reproduced". `counts` tallies every pair by class, and
    `n_bound` (when `bounds` is given) how many informative differences are only bounds.
    """
    if len(differences) != len(classes):
        raise ValueError(f"differences and classes differ in length: {len(differences)} vs {len(classes)}")
    if bounds is not None and len(bounds) != len(differences):
        raise ValueError("bounds must have one flag per pair")
    counts = {c: 0 for c in COMPARISON_CLASSES}
    informative: list[float] = []
    n_bound = 0
    for i, (d, c) in enumerate(zip(differences, classes)):
        if c not in counts:
            raise ValueError(f"unknown class {c!r}; expected one of {COMPARISON_CLASSES}")
        # A difference on an inconclusive pair (or none on a conclusive one) means the caller
        # mixed up its bookkeeping; guessing which side is right would hide it.
        if (c == "inconclusive") != (d is None):
            raise ValueError(f"pair {i}: class {c!r} does not match difference {d!r}")
        counts[c] += 1
        if d is not None:
            informative.append(float(d))
            n_bound += bool(bounds[i]) if bounds is not None else 0
    r = mean_interval(informative, confidence)
    n_inf = r["n"]
    lo, hi = r["lo"], r["hi"]
    if n_inf < min_pairs or lo is None or math.isnan(lo):
        verdict = "inconclusive"
    elif lo > 0:
        verdict = "reproduced"
    elif hi < 0:
        verdict = "reversed"
    else:
        verdict = "not reproduced"
    out = {"mean": r["mean"], "lo": lo, "hi": hi, "n_informative": n_inf,
           "n_pairs": len(differences), "counts": counts, "verdict": verdict}
    if bounds is not None:
        out["n_bound"] = n_bound
    return out


def verdict_across(verdicts: Mapping[str, str]) -> dict:
    """Combine verdicts at several targets: {verdict, stable, by_target}; "depends on target" if they differ."""
    if not verdicts:
        raise ValueError("no verdicts to combine")
    by_target = dict(verdicts)
    distinct = set(by_target.values())
    stable = len(distinct) == 1
    return {"verdict": next(iter(distinct)) if stable else "depends on target",
            "stable": stable, "by_target": by_target}


def f3_verdict(cox_result: Mapping[str, Mapping], covariate: str = "memorization") -> str:
    """F3 from a Cox fit of the hazard of forgetting: a whole 95% interval below 0 -> "reproduced".

    More steps to forget means a *lower* hazard of being forgotten, so the finding "steps to
    forget rises with the covariate" is a negative coefficient; an interval above 0 is
    "reversed", one covering 0 "not reproduced", and a NaN fit "inconclusive".
    """
    r = cox_result[covariate]
    coef, lo, hi = (float(r[k]) for k in ("coef", "lo", "hi"))
    if any(math.isnan(v) for v in (coef, lo, hi)):
        return "inconclusive"
    if hi < 0:
        return "reproduced"
    if lo > 0:
        return "reversed"
    return "not reproduced"
