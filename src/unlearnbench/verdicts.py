"""Deciding the study's findings F1-F4 from stored per-request results, with a known error rate (docs/findings.md,
"How a finding is decided"; calibrated by benchmarks/verdict_calibration.py).

- The unit: forget groups are nested in seeds. With one seed the groups are the units (the claim is about that
  trained pair); with two or more, each seed gives one contrast and the interval is over seeds.
- Two samples, never pairs by label: OOD and ID groups are exchangeable (metrics.contrast).
- Outcomes: censored requests enter as bounds that cannot push a verdict either way; collapsed and nothing-to-
  forget requests stay out and are counted; requests the attack stage skipped are counted with their reason.
- Family-wise control: Holm over a finding's cells; the overall verdict counts reversals like reproductions.
  Per-cell verdicts and readouts at other targets are unadjusted, and labelled so.

Every field of a stored result is read through `request_view`, `attack_view` or `example_view`, so renaming a key of
result.json or forgetting.parquet is a change in one place.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from unlearnbench.metrics import contrast
from unlearnbench.metrics.crossing import UQ_TARGETS
from unlearnbench.metrics.survival import stratified_cox

__all__ = ["OOD_KINDS", "F4_ATTACKS", "request_view", "attack_view", "example_view", "decide_f1", "decide_f2",
           "decide_f3", "decide_f4", "replicate_spread"]

OOD_KINDS = ("canary", "domain")
ALPHA = contrast.ALPHA
F1_STATEMENT = "OOD requests need more unlearning steps than ID requests of the same repetitions"
F2_STATEMENT = "At the step a request becomes unlearned, ID requests cost more utility than OOD ones"
F3_STATEMENT = ("Within a forget request, examples with more memorization take longer to forget (Cox model of "
                "forgetting stratified by request: hazard ratio per within-request SD of memorization < 1); "
                "difficulty is reported with its sign")
F4_STATEMENT = ("After unlearning, ID and OOD requests of the same repetitions differ in how much of the forgotten "
                "exposure a relearning or quantization attack brings back (beyond what the oracle picks up)")
F4_ATTACKS = {"relearn_forget_fraction": "relearning on part of the request's forget examples",
              "relearn_retain": "relearning on retain data only", "int8": "int8 weight-only reload",
              "int4": "4-bit weight-only reload"}
UNIT_NOTE = {"groups": "forget groups inside one trained θ₀/θᵣ pair (one seed): the claim is about this pair",
             "seeds": "seeds: each seed's contrast over its own groups, then an interval over seeds (n = seeds)"}
UNADJUSTED = "unadjusted: this cell's own 95% interval, not corrected for the finding's other cells"


# ----------------------------------------------------------------------------------------- the one adapter


def _finite(x) -> float | None:
    return None if x is None or not np.isfinite(float(x)) else float(x)


def _identity(r: dict) -> dict:
    return {"request": r["request"], "kind": r["kind"], "repetitions": int(r["repetitions"]),
            "group": int(r.get("group", 0)), "seed": r.get("seed", 0)}


def request_view(result: dict) -> dict:
    """What the verdicts read from one unlearn/<request>/result.json (plus `seed` when seeds are pooled): identity,
    nothing_to_forget, the threshold-free area, and per UQ target the outcome, its step and log(ppl/ppl_0)."""
    return {**_identity(result), "nothing_to_forget": bool(result.get("nothing_to_forget", False)),
            "area": _finite(result.get("uq_auc")),
            "outcomes": {t: {"outcome": o["outcome"], "step": float(o["step"]),
                             "log_ppl_ratio": _finite(o.get("log_ppl_ratio"))}
                         for t, o in result["outcomes"].items()}}


def attack_view(result: dict) -> dict:
    """What F4 reads from one attacks/<request>/result.json: identity, baseline and the recovered share per attack."""
    def share(attack):
        v = result.get(attack) or result.get("quantization", {}).get(attack) or {}
        return _finite(v.get("recovered"))
    return {**_identity(result), "baseline": result.get("baseline", "oracle"),
            "recovered": {a: share(a) for a in F4_ATTACKS}}


def example_view(frame: pd.DataFrame) -> pd.DataFrame:
    """What F3 reads from the per-example rows (forgetting.parquet plus request, nothing_to_forget, seed): kind,
    stratum (seed x request), duration, event, memorization, difficulty, nothing_to_forget, forgotten_at_start."""
    seed = frame["seed"].astype(str) if "seed" in frame else pd.Series("0", index=frame.index)
    event = ~frame["censored"].astype(bool)
    steps = frame["steps_to_forget"].astype(float)
    return pd.DataFrame({"kind": frame["kind"], "request": frame["request"], "stratum": seed + "/" + frame["request"],
                         "duration": steps, "event": event.astype(int),
                         "memorization": frame["memorization"].astype(float),
                         "difficulty": frame["difficulty"].astype(float),
                         "nothing_to_forget": frame.get("nothing_to_forget", pd.Series(False, index=frame.index))
                         .astype(bool), "forgotten_at_start": event & (steps <= 0)})


# ----------------------------------------------------------------------------------------- values per request


def _steps_at(target: str):
    """F1 at a target: log(1 + interpolated steps); censored requests as bounds, collapsed ones out."""
    def value(v):
        if v["nothing_to_forget"]:
            return None, False, "nothing to forget"
        o = v["outcomes"].get(target)
        if o is None or o["outcome"] == "collapsed":
            return None, False, "collapsed" if o else f"no outcome at UQ {target}"
        return math.log1p(o["step"]), o["outcome"] == "censored", None
    return value


def _area(main: str):
    """F1 threshold-free: the area under the running maximum of UQ; a collapsed request is out."""
    def value(v):
        if v["nothing_to_forget"]:
            return None, False, "nothing to forget"
        if v["outcomes"].get(main, {}).get("outcome") == "collapsed":
            return None, False, "collapsed"
        return (v["area"], False, None) if v["area"] is not None else (None, False, "no area")
    return value


def _cost_at(target: str):
    """F2 at a target: log(ppl/ppl_0) at the crossing; a request without a crossing has no cost there."""
    def value(v):
        if v["nothing_to_forget"]:
            return None, False, "nothing to forget"
        o = v["outcomes"].get(target)
        if o is None or o["outcome"] != "unlearned":
            return None, False, f"{o['outcome'] if o else 'no outcome'}: no cost at a crossing"
        return (o["log_ppl_ratio"], False, None) if o["log_ppl_ratio"] is not None else \
            (None, False, "no utility at the crossing")
    return value


def _recovered(attack: str):
    def value(v):
        if "skipped" in v:
            return None, False, v["skipped"]
        x = v["recovered"][attack]
        return (x, False, None) if x is not None else (None, False, "no recovered share (exposure gap <= 0)")
    return value


# ----------------------------------------------------------------------------------------- cells


def _side(views: list[dict], kind: str, reps: int, value) -> tuple[list[tuple], dict]:
    rows, out = [], {}
    for v in views:
        if v["kind"] == kind and v["repetitions"] == reps:
            x, censored, reason = value(v)
            if x is None:
                out[reason] = out.get(reason, 0) + 1
            else:
                rows.append((v["seed"], x, censored, v["request"]))
    return rows, out


def _contrast(ref: list[tuple], other: list[tuple], by_seed: bool, alpha: float) -> dict:
    def cols(rows):
        return [r[1] for r in rows], [r[2] for r in rows]
    if not by_seed:
        (a, ca), (b, cb) = cols(ref), cols(other)
        return contrast.two_sample(a, b, ca, cb, alpha)
    seeds = sorted({r[0] for r in ref + other}, key=str)
    per_seed = []
    for s in seeds:
        (a, ca), (b, cb) = cols([r for r in ref if r[0] == s]), cols([r for r in other if r[0] == s])
        per_seed.append((a, b, ca, cb))
    return contrast.over_seeds(per_seed, alpha)


def _readout(views, reps, ood, value, ref_is_id: bool, by_seed: bool, alpha: float, ratio: bool = False) -> dict:
    """One cell at one target: the contrast, every request counted, the unadjusted verdict."""
    ids, id_out = _side(views, "id", reps, value)
    oods, ood_out = _side(views, ood, reps, value)
    ref, other = (ids, oods) if ref_is_id else (oods, ids)
    e = _contrast(ref, other, by_seed, alpha)
    verdict = "inconclusive" if e["p"] is None else \
        {"up": "reproduced", "down": "reversed"}.get(e["direction"], "not reproduced")
    out = {**e, "mean": e["effect"], "n_informative": len(ids) + len(oods), "verdict": verdict,
           "counts": {"id_used": len(ids), "ood_used": len(oods), "id_censored": sum(r[2] for r in ids),
                      "ood_censored": sum(r[2] for r in oods), "id_left_out": id_out, "ood_left_out": ood_out},
           # the points behind the interval: every request's value (a censored one is its bound)
           "values": {side: [{"request": r[3], "seed": r[0], "value": r[1], "censored": bool(r[2])} for r in rows]
                      for side, rows in (("id", ids), ("ood", oods))},
           "reasons": sorted(set(id_out) | set(ood_out) | ({e["reason"]} if e["reason"] else set()))}
    if ratio:  # log(1 + steps) differences read as ratios of (1 + steps)
        out.update({k: None if e[s] is None else math.exp(e[s]) for k, s in
                    (("ratio", "effect"), ("ratio_lo", "lo"), ("ratio_hi", "hi"))})
    return out


def _cells(views: list[dict]) -> list[tuple[int, str]]:
    have = {(v["kind"], v["repetitions"]) for v in views}
    return sorted((reps, k) for k, reps in have if k in OOD_KINDS and ("id", reps) in have)


def _unit(views: list[dict]) -> str:
    return "seeds" if len({v["seed"] for v in views}) > 1 else "groups"


def _family(rows: list[dict], alpha: float, two_sided: bool = False,
            names: tuple[str, str] = ("reproduced", "reversed")) -> dict:
    """Holm over the rows' (cells') p-values: each row gets `p_holm` and its `family_verdict`; returns the overall
    verdict (`contrast.overall_verdict`) of the rows' family-wise decisions."""
    adj = contrast.holm({r["cell"]: r["p"] for r in rows}, alpha)
    decisions = {}
    for r in rows:
        a = adj[r["cell"]]
        decisions[r["cell"]] = r["direction"] if a["reject"] else None
        r.update(p_holm=a["p_holm"], family_verdict="inconclusive" if r["p"] is None else
                 "not significant" if not a["reject"] else names[0] if r["direction"] == "up" else names[1])
    informative = [r["cell"] for r in rows if r["p"] is not None]
    return contrast.overall_verdict(decisions, informative, two_sided, names)


def _finding(statement: str, effect: str, rows: list[dict], unit: str, alpha: float, two_sided: bool = False,
             names: tuple[str, str] = ("reproduced", "reversed")) -> dict:
    """Holm over the cells' main p-values, each cell's family-wise decision, and the overall verdict."""
    o = _family(rows, alpha, two_sided, names)
    return {"statement": statement, "effect": effect, "unit": unit, "unit_note": UNIT_NOTE[unit], "alpha": alpha,
            "family": f"Holm over the {len(rows)} cells' two-sided p-values: the overall verdict's false-positive "
                      f"rate under no effect is at most {alpha:g}",
            "contrasts": rows, "verdict": o["verdict"], "direction": o["direction"], "detail": o["detail"],
            "supporting": o["up"], "against": o["down"], "holds": len(o["up"]) + (len(o["down"]) if two_sided else 0),
            "of": len(rows), "informative": sum(r["p"] is not None for r in rows)}


def _cell_row(views, reps, ood, main: str, readouts: dict) -> dict:
    m = readouts[main]
    verdicts = {k: r["verdict"] for k, r in readouts.items()}
    stable = len(set(verdicts.values())) == 1
    return {"repetitions": reps, "ood_kind": ood, "cell": f"r{reps} {ood}", "main": main,
            "requests": {k: sum(v["kind"] == k and v["repetitions"] == reps for v in views) for k in ("id", ood)},
            "verdict": m["verdict"], "verdict_basis": UNADJUSTED, "p": m["p"], "direction": m["direction"],
            "stable_across_targets": stable, "across_targets": m["verdict"] if stable else "depends on target",
            "by_target": readouts}


# ----------------------------------------------------------------------------------------- F1, F2, F4


def _targets(uq_target: float) -> list[str]:
    return [f"{t:g}" for t in sorted({*UQ_TARGETS, float(uq_target)})]


def decide_f1(results: list[dict], uq_target: float = 0.9, alpha: float = ALPHA) -> dict:
    """F1 per (repetitions, OOD kind): OOD − ID in log(1 + interpolated steps) to each UQ target (read as a ratio
    of steps) and ID − OOD in the area under the running maximum of UQ; Holm over cells at `uq_target`."""
    views = [request_view(r) for r in results]
    unit, main = _unit(views), f"{uq_target:g}"
    rows = []
    for reps, ood in _cells(views):
        readouts = {f"uq_{t}": _readout(views, reps, ood, _steps_at(t), True, unit == "seeds", alpha, ratio=True)
                    for t in _targets(uq_target)}
        readouts["auc"] = _readout(views, reps, ood, _area(main), False, unit == "seeds", alpha)
        rows.append(_cell_row(views, reps, ood, f"uq_{main}", readouts))
    return _finding(F1_STATEMENT, "OOD − ID log(1 + steps) to reach the target (uq_*; exp: ratio of 1 + steps), "
                    "ID − OOD area under the running maximum of UQ (auc)", rows, unit, alpha)


def decide_f2(results: list[dict], uq_target: float = 0.9, alpha: float = ALPHA) -> dict:
    """F2 per (repetitions, OOD kind): ID − OOD in log(ppl/ppl_0) on the ID holdout at each request's crossing."""
    views = [request_view(r) for r in results]
    unit, main = _unit(views), f"{uq_target:g}"
    rows = []
    for reps, ood in _cells(views):
        readouts = {f"uq_{t}": _readout(views, reps, ood, _cost_at(t), False, unit == "seeds", alpha)
                    for t in _targets(uq_target)}
        rows.append(_cell_row(views, reps, ood, f"uq_{main}", readouts))
    return _finding(F2_STATEMENT, "ID − OOD log(ppl_t / ppl_0) on the ID holdout at the crossing", rows, unit, alpha)


def decide_f4(attack_results: list[dict], skipped: list[dict] = (), alpha: float = ALPHA,
              main: str = "relearn_forget_fraction") -> dict:
    """F4 per (repetitions, OOD kind): OOD − ID recovered share after each attack, either direction a difference
    (named); requests the attack stage skipped ({request, kind, repetitions, group, seed, reason}) and results
    without an oracle baseline are counted, never dropped. Holm over cells on the `main` attack."""
    views = [attack_view(r) for r in attack_results]
    no_oracle = [v for v in views if v["baseline"] != "oracle"]
    views = [v for v in views if v["baseline"] == "oracle"]
    views += [{**_identity(s), "skipped": f"skipped: {s['reason']}"} for s in skipped]
    views += [{**v, "skipped": "no oracle baseline (the attacked θᵣ is the yardstick)"} for v in no_oracle]
    unit = _unit(views)
    names = ("OOD recovers more", "ID recovers more")
    rows = []
    for reps, ood in _cells(views):
        readouts = {a: _readout(views, reps, ood, _recovered(a), True, unit == "seeds", alpha) for a in F4_ATTACKS}
        for r in readouts.values():
            r["verdict"] = {"reproduced": f"reproduced ({names[0]})", "reversed": f"reproduced ({names[1]})"}.get(
                r["verdict"], r["verdict"])
        rows.append(_cell_row(views, reps, ood, main, readouts))
    out = _finding(F4_STATEMENT, "OOD − ID recovered share of the exposure gap", rows, unit, alpha,
                   two_sided=True, names=names)
    return {**out, "attacks": F4_ATTACKS, "main_attack": main, "excluded_without_oracle": len(no_oracle),
            "skipped": len(skipped)}


# ----------------------------------------------------------------------------------------- F3


def _f3_test(frame: pd.DataFrame, cox: dict) -> dict:
    """The memorization test: Wald when the fit converged cleanly; when it did not (monotone likelihood, where the
    estimate runs off to infinity), the likelihood-ratio test, whose statistic stays finite: the full fit's
    log-likelihood at its last step is at most its supremum, so the statistic can only be understated."""
    m = cox["memorization"]
    if m["error"]:
        return {"test": None, "p": None, "direction": None, "reason": f"Cox fit unusable: {m['error']}"}
    direction = "up" if m["coef"] < 0 else "down"
    if m["usable"]:
        return {"test": "wald", "p": m["p"], "direction": direction, "reason": None}
    if cox["difficulty"]["error"]:
        ll0 = m["loglik_null"]
    else:
        red = stratified_cox(frame, "duration", "event", ["difficulty"], "stratum")["difficulty"]
        if not red["usable"]:
            return {"test": None, "p": None, "direction": None,
                    "reason": f"Cox fit without memorization unusable: {red['error'] or red['warning']}"}
        ll0 = red["loglik"]
    lr = max(0.0, 2 * (m["loglik"] - ll0))
    return {"test": "likelihood ratio", "p": float(stats.chi2.sf(lr, 1)), "direction": direction, "lr": lr,
            "reason": f"the fit did not converge ({m['warning']}): the hazard ratio is not estimable (monotone "
                      "likelihood); decided by the likelihood-ratio test"}


def decide_f3(forgetting: pd.DataFrame, alpha: float = ALPHA) -> dict:
    """F3 per kind: a Cox model of each example's forgetting on memorization and difficulty, both standardized
    within request, stratified by request (seed x request with seeds); nothing-to-forget requests and examples
    already forgotten at step 0 left out and counted; Holm over kinds."""
    ex = example_view(forgetting)
    excluded = sorted(set(ex.request[ex.nothing_to_forget]))
    usable = ex[~ex.nothing_to_forget]
    rows = []
    for kind, g in usable.groupby("kind", sort=True):
        fit = g[~g.forgotten_at_start]
        cox = stratified_cox(fit, "duration", "event", ["memorization", "difficulty"], "stratum")
        t = _f3_test(fit, cox)
        verdict = "inconclusive" if t["p"] is None else "not reproduced" if t["p"] >= alpha else \
            "reproduced" if t["direction"] == "up" else "reversed"
        rows.append({"kind": kind, "cell": kind, "n": int(len(fit)), "requests": int(g.request.nunique()),
                     "strata": int(fit.stratum.nunique()), "events": int(fit.event.sum()),
                     "forgotten_at_start": int(g.forgotten_at_start.sum()),
                     "censored_fraction": float(1 - fit.event.mean()) if len(fit) else None,
                     "cox": cox, **t, "verdict": verdict, "verdict_basis": UNADJUSTED})
    unit = "examples within requests" if usable.stratum.str.split("/").str[0].nunique() <= 1 else \
        "examples within seed x request"
    o = _family(rows, alpha)
    return {"statement": F3_STATEMENT, "effect": "hazard ratio of being forgotten per within-request SD (Cox, "
            "strata = request)", "unit": unit, "alpha": alpha,
            "family": f"Holm over the {len(rows)} kinds' two-sided p-values", "kinds": rows,
            "excluded_requests": excluded, "verdict": o["verdict"], "detail": o["detail"], "supporting": o["up"],
            "against": o["down"], "holds": len(o["up"]), "of": len(rows)}


# ----------------------------------------------------------------------------------------- spread, all


def replicate_spread(results: list[dict], targets: tuple[str, ...] = ("0.5", "0.8", "0.9")) -> dict:
    """How much spread each replicate source adds, per (kind, repetitions): variance components between groups
    inside a seed and between seeds (metrics.contrast.variance_components) of log(1 + steps) at each target and of
    log(ppl/ppl_0) at the crossing, over requests that were unlearned and had something to forget."""
    views = [request_view(r) for r in results]
    seeds = sorted({v["seed"] for v in views}, key=str)
    steps, cost = {}, {}
    for kind, reps in sorted({(v["kind"], v["repetitions"]) for v in views}):
        cell = [v for v in views if v["kind"] == kind and v["repetitions"] == reps and not v["nothing_to_forget"]]
        for t in targets:
            def at(v, key, t=t):
                o = v["outcomes"].get(t, {})
                return o.get(key) if o.get("outcome") == "unlearned" else None
            by_seed = [[math.log1p(at(v, "step")) for v in cell if v["seed"] == s and at(v, "step") is not None]
                       for s in seeds]
            c = [[at(v, "log_ppl_ratio") for v in cell if v["seed"] == s and at(v, "log_ppl_ratio") is not None]
                 for s in seeds]
            if (r := contrast.variance_components(by_seed)) is not None:
                steps[f"{kind}_r{reps} uq {t}"] = r
            if (r := contrast.variance_components(c)) is not None:
                cost[f"{kind}_r{reps} uq {t}"] = r
    return {"seeds": seeds, "log1p_steps": steps, "log_ppl_ratio": cost}
