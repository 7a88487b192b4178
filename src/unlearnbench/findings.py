"""The study's findings, one implementation each: F1-F4 of a run from its stored per-request results, the
example-level survival view, the aggregation over seeds, and the flat view for trackers. The report stage decides
them (`run_summary.merged_summary`) and writes them into the run's summary.json. How each is decided is in
docs/findings.md.

A finding is an effect over replicates (disjoint forget groups of the same kind and repetitions, paired by
their `group` index) with a Student-t interval, never one comparison; censored and collapsed requests are outcomes,
counted, never sentinel numbers; crossing steps are interpolated and read at several UQ targets plus one
threshold-free summary (the area under UQ against log(1+step)), and a verdict that changes between targets says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from unlearnbench import metrics
from unlearnbench.config import Config
from unlearnbench.io import read_json
from unlearnbench.results import outcome_counts

OOD_KINDS = ("canary", "domain")
TARGETS = metrics.UQ_TARGETS
F1_STATEMENT = "OOD requests need more unlearning steps than ID requests of the same repetitions"
F2_STATEMENT = "At the step a request becomes unlearned, ID requests cost more utility than OOD ones"
F3_STATEMENT = ("Within a forget request, examples with more memorization take longer to forget (Cox model of "
                "forgetting stratified by request: hazard ratio per SD of memorization < 1); difficulty is "
                "reported with its sign")


# ----------------------------------------------------------------------------------------------- pairs


def _key(t: float) -> str:
    return f"{t:g}"


def _outcome(r: dict, target: float) -> metrics.Outcome:
    o = r["outcomes"][_key(target)]
    return metrics.Outcome(o["outcome"], float(o["step"]))


def replicate_pairs(results: list[dict]) -> dict[tuple[int, str], list[tuple[dict, dict]]]:
    """(repetitions, OOD kind) -> [(ID result, OOD result)] paired by their `group` index (the data column)
    inside one θ₀/θᵣ pair."""
    by = {(r["kind"], int(r["repetitions"]), int(r.get("group", 0))): r for r in results}
    out: dict[tuple[int, str], list] = {}
    for (kind, reps, j), ood in sorted(by.items()):
        if kind in OOD_KINDS and ("id", reps, j) in by:
            out.setdefault((reps, kind), []).append((by[("id", reps, j)], ood))
    return out


def _nothing(i: dict, o: dict) -> str | None:
    sides = [n for n, r in (("ID", i), ("OOD", o)) if r.get("nothing_to_forget")]
    return f"{' and '.join(sides)} had nothing to forget" if sides else None


def compare_f1(i: dict, o: dict, target: float | None) -> dict:
    """One replicate pair for F1 at a UQ target (None: the area under UQ), difference oriented so that > 0
    supports "OOD needs more steps"."""
    nothing = _nothing(i, o)
    if nothing:
        return {"class": "inconclusive", "difference": None, "bound": False, "reason": nothing}
    if target is None:  # threshold-free: a slower request has a smaller area; a collapse is never evidence
        if "collapsed" in (i["outcome"], o["outcome"]):
            return {"class": "inconclusive", "difference": None, "bound": False, "reason": "collapsed"}
        d = float(i["uq_auc"]) - float(o["uq_auc"])
        return {"class": "tie" if d == 0 else ("ood_later" if d > 0 else "id_later"), "difference": d,
                "bound": False, "reason": "area under UQ vs log(1+step), ID minus OOD"}
    return metrics.compare_steps(_outcome(i, target), _outcome(o, target))


def compare_f2(i: dict, o: dict, target: float) -> dict:
    """One replicate pair for F2: log(ppl/ppl_0) at each side's crossing, ID minus OOD (> 0 supports F2)."""
    nothing = _nothing(i, o)
    if nothing:
        return {"class": "inconclusive", "difference": None, "bound": False, "reason": nothing}
    a, b = i["outcomes"][_key(target)], o["outcomes"][_key(target)]
    if a["outcome"] != "unlearned" or b["outcome"] != "unlearned":
        return {"class": "inconclusive", "difference": None, "bound": False,
                "reason": f"ID {a['outcome']}, OOD {b['outcome']}: no utility cost at a crossing"}
    d = float(a["log_ppl_ratio"]) - float(b["log_ppl_ratio"])
    return {"class": "tie" if d == 0 else ("id_costlier" if d > 0 else "ood_costlier"), "difference": d,
            "bound": False, "reason": "log(ppl/ppl_0) at the crossing, ID minus OOD"}


def _effect(comparisons: list[dict], alpha: float) -> dict:
    classes = ["inconclusive" if c["difference"] is None else
               ("tie" if c["class"] == "tie" else ("ood_later" if c["difference"] > 0 else "id_later"))
               for c in comparisons]
    eff = metrics.paired_effect([c["difference"] for c in comparisons], classes, confidence=1 - alpha,
                                bounds=[bool(c.get("bound")) for c in comparisons])
    # in the finding's own terms: pairs whose difference supports it, goes against it, ties, or has no evidence
    eff["counts"] = {"supports": eff["counts"]["ood_later"], "against": eff["counts"]["id_later"],
                     "tie": eff["counts"]["tie"], "inconclusive": eff["counts"]["inconclusive"]}
    eff["reasons"] = sorted({c["reason"] for c in comparisons if c["difference"] is None})
    return eff


def _contrast_rows(pairs: dict, compare, targets: list, main: str, alpha: float) -> list[dict]:
    """One row per contrast (an OOD kind against ID at one repetitions): its effect and verdict per target."""
    rows = []
    for (reps, kind), ps in pairs.items():
        by_target = {}
        for t in targets:
            comps = [compare(i, o, t) for i, o in ps]
            by_target["auc" if t is None else f"uq_{t:g}"] = {**_effect(comps, alpha), "pairs": [
                {"group": int(i.get("group", 0)), **c} for (i, _), c in zip(ps, comps)]}
        across = metrics.verdict_across({k: v["verdict"] for k, v in by_target.items()})
        rows.append({"repetitions": reps, "ood_kind": kind, "replicates": len(ps), "main": main,
                     "verdict": by_target[main]["verdict"],
                     "stable_across_targets": across["stable"], "across_targets": across["verdict"],
                     "by_target": by_target})
    return rows


def overall_verdict(verdicts: list[str]) -> str:
    """A finding over its units (for F1, F2 and F4 its contrasts, an OOD kind against ID at one repetitions; for F3
    its kinds; across seeds, the seeds' verdicts): reproduced when every informative one is, reversed or not
    reproduced when none is, partly reproduced otherwise; inconclusive when none is informative."""
    informative = [v for v in verdicts if v != "inconclusive"]
    if not informative:
        return "inconclusive"
    n = sum(v == "reproduced" for v in informative)
    if n == len(informative):
        return "reproduced"
    if n == 0:
        return "reversed" if all(v == "reversed" for v in informative) else "not reproduced"
    return "partly reproduced"


def _finding(statement: str, rows: list[dict], effect_label: str) -> dict:
    verdicts = [r["verdict"] for r in rows]
    return {"statement": statement, "effect": effect_label, "contrasts": rows,
            "holds": sum(v == "reproduced" for v in verdicts), "of": len(verdicts),
            "stable_across_targets": all(r["stable_across_targets"] for r in rows) if rows else None,
            "verdict": overall_verdict(verdicts)}


def finding_f1(results: list[dict], uq_target: float, alpha: float = 0.05) -> dict:
    """F1 per contrast (an OOD kind against ID at one repetitions): the paired difference OOD − ID in interpolated
    steps to reach each UQ target, and ID − OOD in the area under UQ; the verdict at `uq_target`, with its stability
    across targets."""
    targets = sorted(set(TARGETS) | {uq_target})
    rows = _contrast_rows(replicate_pairs(results), compare_f1, [*targets, None], f"uq_{uq_target:g}", alpha)
    return _finding(F1_STATEMENT, rows, "OOD − ID steps to reach the target (uq_*), ID − OOD area under UQ (auc)")


def finding_f2(results: list[dict], uq_target: float, alpha: float = 0.05) -> dict:
    """F2 per contrast (an OOD kind against ID at one repetitions): the paired difference ID − OOD in log(ppl/ppl_0)
    at the crossing."""
    targets = sorted(set(TARGETS) | {uq_target})
    rows = _contrast_rows(replicate_pairs(results), compare_f2, targets, f"uq_{uq_target:g}", alpha)
    return _finding(F2_STATEMENT, rows, "ID − OOD log(ppl_t / ppl_0) on the ID holdout at the crossing")


def finding_f3(forgetting: pd.DataFrame, n_boot: int, seed: int, alpha: float = 0.05) -> dict:
    """F3 per kind: a Cox model of each example's forgetting on memorization and difficulty, stratified by forget
    request (so that differences between requests, which repetitions drive, never count), requests with nothing
    to forget excluded; plus the pooled Spearman ρ, descriptive only (confounded by repetitions)."""
    rows, verdicts = [], []
    usable = forgetting[~forgetting.nothing_to_forget] if "nothing_to_forget" in forgetting else forgetting
    for kind, g in usable.groupby("kind"):
        df = pd.DataFrame({"duration": g.steps_to_forget.to_numpy(float), "event": (~g.censored).to_numpy(int),
                           "memorization": g.memorization.to_numpy(float), "difficulty": g.difficulty.to_numpy(float),
                           "request": g.request.to_numpy()})
        cox = metrics.stratified_cox(df, "duration", "event", ["memorization", "difficulty"], "request")
        verdict = metrics.f3_verdict(cox, "memorization")
        verdicts.append(verdict)
        descriptive = {var: metrics.spearman_with_ci(g[var].to_numpy(), g.steps_to_forget.to_numpy(), n_boot=n_boot,
                                                     alpha=alpha, seed=seed) for var in ("memorization", "difficulty")}
        rows.append({"kind": kind, "n": int(len(g)), "requests": int(g.request.nunique()),
                     "censored_fraction": float(g.censored.mean()), "verdict": verdict, "cox": cox,
                     "pooled_spearman_descriptive": descriptive})
    excluded = sorted(set(forgetting.request) - set(usable.request)) if "request" in forgetting else []
    return {"statement": F3_STATEMENT, "effect": "hazard ratio of being forgotten per SD (Cox, strata = request)",
            "kinds": rows, "excluded_requests": excluded, "holds": sum(v == "reproduced" for v in verdicts),
            "of": len(verdicts), "verdict": overall_verdict(verdicts)}


def survival(forgetting: pd.DataFrame) -> dict:
    """Example level: Kaplan-Meier of the fraction not yet forgotten per (kind, repetitions), pooled over the
    replicate groups, and a log-rank test OOD vs ID per repetitions (the example-level companion of F1)."""
    usable = forgetting[~forgetting.nothing_to_forget] if "nothing_to_forget" in forgetting else forgetting
    curves, tests = [], []
    for (kind, reps), g in usable.groupby(["kind", "repetitions"]):
        km = metrics.kaplan_meier(g.steps_to_forget.to_numpy(float), (~g.censored).to_numpy(bool))
        curves.append({"kind": kind, "repetitions": int(reps), "n": int(len(g)), "events": int((~g.censored).sum()),
                       "median_steps": metrics.median_survival(g.steps_to_forget.to_numpy(float),
                                                               (~g.censored).to_numpy(bool)),
                       "curve": km.to_dict(orient="list")})
    for reps, g in usable.groupby("repetitions"):
        ids = g[g.kind == "id"]
        for kind in OOD_KINDS:
            ood = g[g.kind == kind]
            if ids.empty or ood.empty:
                continue
            lr = metrics.logrank(ood.steps_to_forget.to_numpy(float), (~ood.censored).to_numpy(bool),
                                 ids.steps_to_forget.to_numpy(float), (~ids.censored).to_numpy(bool))
            med = (metrics.median_survival(ood.steps_to_forget.to_numpy(float), (~ood.censored).to_numpy(bool)),
                   metrics.median_survival(ids.steps_to_forget.to_numpy(float), (~ids.censored).to_numpy(bool)))
            tests.append({"repetitions": int(reps), "ood_kind": kind, **lr, "median_ood": med[0], "median_id": med[1]})
    return {"kaplan_meier": curves, "logrank": tests}


F4_STATEMENT = ("After unlearning, ID and OOD requests of the same repetitions differ in how much of the forgotten "
                "exposure a relearning or quantization attack brings back (beyond what the oracle picks up)")
F4_ATTACKS = {"relearn_forget_fraction": "relearning on part of the request's forget examples",
              "relearn_retain": "relearning on retain data only", "int8": "int8 weight-only reload",
              "int4": "4-bit weight-only reload"}


def _recovered(res: dict, attack: str) -> float | None:
    v = res.get(attack) or res.get("quantization", {}).get(attack) or {}
    x = v.get("recovered")
    return None if x is None or not np.isfinite(x) else float(x)


def finding_f4(attack_results: list[dict], alpha: float = 0.05) -> dict:
    """F4 per contrast (an OOD kind against ID at one repetitions) and attack: the paired difference OOD − ID in the
    recovered share of the exposure gap; "reproduced" when the interval excludes 0 in either direction (the
    direction is reported). Only requests measured against the oracle attacked the same way count: without θᵣ
    (no-oracle mode) the unattacked held-out-reference e_r is no yardstick, as θᵣ would also gain exposure from the
    attack."""
    usable = [r for r in attack_results if r.get("baseline", "oracle") == "oracle"]
    pairs = replicate_pairs([{**r, "nothing_to_forget": False} for r in usable])
    rows, verdicts = [], []
    for (reps, kind), ps in pairs.items():
        by_attack = {}
        for attack in F4_ATTACKS:
            diffs = []
            for i, o in ps:
                a, b = _recovered(i, attack), _recovered(o, attack)
                diffs.append(None if a is None or b is None else b - a)
            classes = ["inconclusive" if d is None else ("tie" if d == 0 else ("ood_later" if d > 0 else "id_later"))
                       for d in diffs]
            eff = metrics.paired_effect(diffs, classes, confidence=1 - alpha)
            direction = {"reproduced": "OOD recovers more", "reversed": "ID recovers more"}.get(eff["verdict"])
            by_attack[attack] = {**eff, "verdict": "reproduced" if direction else eff["verdict"],
                                 "direction": direction, "differences": diffs}
        main = by_attack["relearn_forget_fraction"]["verdict"]
        verdicts.append(main)
        rows.append({"repetitions": reps, "ood_kind": kind, "replicates": len(ps), "verdict": main,
                     "by_attack": by_attack})
    return {"statement": F4_STATEMENT, "effect": "OOD − ID recovered share of the exposure gap", "attacks": F4_ATTACKS,
            "contrasts": rows, "holds": sum(v == "reproduced" for v in verdicts), "of": len(verdicts),
            "verdict": overall_verdict(verdicts), "excluded_without_oracle": len(attack_results) - len(usable)}


# ----------------------------------------------------------------------------------------------- one run


def run_findings(cfg: Config, results: list[dict], forgetting: pd.DataFrame) -> dict:
    """F1-F3 of one run from its stored per-request results (`results.load_run`): F1 and F2 for group requests,
    F3 when there are per-example tables. F4 needs the attack results: `finding_f4`."""
    findings = {}
    if cfg.unlearn.requests == "groups":
        findings["F1"] = finding_f1(results, cfg.metrics.uq_target, cfg.metrics.alpha)
        findings["F2"] = finding_f2(results, cfg.metrics.uq_target, cfg.metrics.alpha)
    if not forgetting.empty:
        findings["F3"] = finding_f3(forgetting, cfg.metrics.n_boot, cfg.run.seed, cfg.metrics.alpha)
    return findings


# ----------------------------------------------------------------------------------------------- seeds


# Numbers that exist only when a request became unlearned and had something to forget: a `nothing_to_forget`
# request's crossing is meaningless (UQ is not defined on a gap under the floor).
ONLY_WHEN_UNLEARNED = ("steps_to_unlearn", "utility_drop_at_unlearned")
AGGREGATED = ("steps_to_unlearn", "utility_drop_at_unlearned", "uq_auc", "uq_final", "steps_to_forget_mean",
              "memorization_mean", "difficulty_mean", "exposure_gap_bits")


def cell_values(summaries: list[dict], kind: str, reps: int, col: str) -> np.ndarray:
    """One (kind, repetitions) cell's values of `col` across run summaries (seeds and replicate groups), finite
    values only; the unlearned-only columns leave out requests with nothing to forget."""
    vals = []
    for s in summaries:
        for g in s["requests"]:
            if g["kind"] == kind and int(g["repetitions"]) == reps:
                v = g.get(col)
                if col in ONLY_WHEN_UNLEARNED and g.get("nothing_to_forget"):
                    v = None
                if v is not None and np.isfinite(float(v)):
                    vals.append(float(v))
    return np.asarray(vals, float)


def aggregate_seeds(run_dirs: list[Path], alpha: float = 0.05) -> dict:
    """Mean and (1 - alpha) t-interval across seeds of each cell's numbers, with every request's outcome counted
    (steps to unlearn averages only the unlearned ones: read it with the counts); each finding's verdicts."""
    sums = [read_json(Path(d) / "summary.json") for d in run_dirs if (Path(d) / "summary.json").exists()]
    keys = sorted({(g["kind"], int(g["repetitions"])) for s in sums for g in s["requests"]})
    cells = []
    for kind, reps in keys:
        counts = outcome_counts([g for s in sums for g in s["requests"]
                                 if g["kind"] == kind and int(g["repetitions"]) == reps])
        rec = {"kind": kind, "repetitions": reps, "requests": sum(counts.values()), "outcomes": counts}
        for col in AGGREGATED:
            rec[col] = metrics.mean_ci(cell_values(sums, kind, reps, col), alpha)
        cells.append(rec)
    findings = {}
    for key in ("F1", "F2", "F3"):
        verdicts = [s["findings"][key]["verdict"] for s in sums if key in s.get("findings", {})]
        if verdicts:
            findings[key] = {"verdicts": verdicts, "reproduced_in": sum(v == "reproduced" for v in verdicts),
                             "of": len(verdicts), "verdict": overall_verdict(verdicts)}
    return {"seeds": [s["seed"] for s in sums], "runs": [Path(d).name for d in run_dirs], "cells": cells,
            "findings": findings, "e_r_source": ", ".join(sorted({s.get("e_r_source", "oracle") for s in sums}))}


# ----------------------------------------------------------------------------------------------- views


def flatten_findings(summary: dict) -> dict:
    """F1-F3 verdicts, effects and intervals as flat summary keys for trackers, and F4's verdict and statement."""
    out = {}
    for key, f in summary.get("findings", {}).items():
        out.update({f"findings/{key}/verdict": f["verdict"], f"findings/{key}/holds": f["holds"],
                    f"findings/{key}/of": f["of"]})
        for c in f.get("contrasts", []):
            base = f"findings/{key}/r{c['repetitions']}_{c['ood_kind']}"
            out[f"{base}/verdict"] = c["verdict"]
            for t, e in c["by_target"].items():
                for k in ("mean", "lo", "hi", "n_informative"):
                    out[f"{base}/{t}/{k}"] = e[k]
        for c in f.get("kinds", []):
            for var, r in c["cox"].items():
                for k in ("hr", "lo", "hi", "p"):
                    out[f"findings/{key}/{c['kind']}/{var}/{k}"] = r[k]
    f4 = summary.get("attacks", {}).get("findings", {}).get("F4", {})
    out.update({f"findings/F4/{k}": v for k, v in f4.items() if isinstance(v, str)})
    return out
