"""The study's findings of a run, decided from its stored per-request results: F1-F4 through the calibrated rules of
`verdicts.py`, the example-level survival view, the findings over several seeds (the seed is the unit), and the flat
view for trackers. The report stage decides them (`run_summary.merged_summary`) and writes them into the run's
summary.json; how each is decided is in docs/findings.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from unlearnbench import metrics, verdicts
from unlearnbench.config import Config
from unlearnbench.io import read_json
from unlearnbench.results import load_run, outcome_counts

OOD_KINDS = verdicts.OOD_KINDS


# ----------------------------------------------------------------------------------------------- one run


def run_findings(cfg: Config, results: list[dict], forgetting: pd.DataFrame) -> dict:
    """F1-F3 of one run (or of several seeds' requests pooled, each result carrying its `seed`): F1 and F2 for
    group requests, F3 when there are forgetting tables, each kind's F3 row with the pooled Spearman ρ beside it
    (descriptive only: repetitions confound it). F4 needs the attack results: `verdicts.decide_f4`."""
    m = cfg.metrics
    findings = {}
    if cfg.unlearn.requests == "groups":
        findings["F1"] = verdicts.decide_f1(results, m.uq_target, m.alpha)
        findings["F2"] = verdicts.decide_f2(results, m.uq_target, m.alpha)
    if not forgetting.empty:
        f3 = verdicts.decide_f3(forgetting, m.alpha)
        usable = forgetting[~forgetting.nothing_to_forget] if "nothing_to_forget" in forgetting else forgetting
        for row in f3["kinds"]:
            g = usable[usable.kind == row["kind"]]
            row["pooled_spearman_descriptive"] = {
                var: metrics.spearman_with_ci(g[var].to_numpy(), g.steps_to_forget.to_numpy(), n_boot=m.n_boot,
                                              alpha=m.alpha, seed=cfg.run.seed) for var in ("memorization", "difficulty")}
        findings["F3"] = f3
    if len({r.get("seed", 0) for r in results}) > 1:
        findings["replicate_spread"] = verdicts.replicate_spread(results)
    return findings


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


def cell_interval(summaries: list[dict], kind: str, reps: int, col: str, alpha: float = 0.05) -> dict:
    """A (kind, repetitions) cell's number over runs of one study, the seed as the unit: each summary's (seed's)
    mean over its groups, then the mean and t-interval over the seeds (`n_unit` "seeds"); with one summary, the
    interval over its groups (`n_unit` "groups": a claim about that trained pair)."""
    if len(summaries) == 1:
        return {**metrics.mean_ci(cell_values(summaries, kind, reps, col), alpha), "n_unit": "groups"}
    means = [v.mean() for s in summaries if (v := cell_values([s], kind, reps, col)).size]
    return {**metrics.mean_ci(np.asarray(means, float), alpha), "n_unit": "seeds"}


def aggregate_seeds(cfg: Config, run_dirs: list[Path]) -> dict:
    """The multi-seed parent's summary: every finding decided once from all seeds' stored requests with the seed
    as the unit (`verdicts`: each seed's contrast over its own groups, an interval over seeds), never from
    per-seed verdicts; how much spread each replicate source adds; and per (kind, repetitions) cell each number's
    mean over seeds with a t-interval over the per-seed means (n = seeds), every request's outcome counted."""
    alpha = cfg.metrics.alpha
    sums, results, frames, attacks, skipped = [], [], [], [], []
    for d in run_dirs:
        if not (Path(d) / "summary.json").exists():
            continue
        s = read_json(Path(d) / "summary.json")
        run = load_run(Path(d))
        sums.append(s)
        results += [{**r, "seed": s["seed"]} for r in run.requests]
        if not run.forgetting.empty:
            frames.append(run.forgetting.assign(seed=s["seed"]))
        attacks += [{**r, "seed": s["seed"]} for r in run.attack_results]
        skipped += [{**k, "seed": s["seed"]} for k in (run.attacks or {}).get("skipped", [])]
    forgetting = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    findings = run_findings(cfg, results, forgetting)
    if attacks or skipped:
        findings["F4"] = verdicts.decide_f4(attacks, skipped, alpha)
    keys = sorted({(g["kind"], int(g["repetitions"])) for s in sums for g in s["requests"]})
    cells = []
    for kind, reps in keys:
        counts = outcome_counts([g for s in sums for g in s["requests"]
                                 if g["kind"] == kind and int(g["repetitions"]) == reps])
        rec = {"kind": kind, "repetitions": reps, "requests": sum(counts.values()), "outcomes": counts}
        rec.update({col: cell_interval(sums, kind, reps, col, alpha) for col in AGGREGATED})
        cells.append(rec)
    return {"seeds": [s["seed"] for s in sums], "runs": [Path(d).name for d in run_dirs], "cells": cells,
            "cell_unit": "each cell's number: the mean over its groups in each seed, then the mean over seeds with a "
                         "t-interval over seeds (n = seeds)",
            "findings": findings, "e_r_source": ", ".join(sorted({s.get("e_r_source", "oracle") for s in sums}))}


# ----------------------------------------------------------------------------------------------- views


def flatten_findings(summary: dict) -> dict:
    """Every finding's overall verdict, each contrast's verdicts and each target's effect and interval, and each
    kind's Cox hazard ratios with their bounds (on the ratio scale), as flat summary keys for trackers."""
    out = {}
    findings = {**summary.get("findings", {}), **summary.get("attacks", {}).get("findings", {})}
    for key, f in findings.items():
        if "verdict" not in f:
            continue
        out.update({f"findings/{key}/verdict": f["verdict"], f"findings/{key}/holds": f["holds"],
                    f"findings/{key}/of": f["of"]})
        for c in f.get("contrasts", []):
            base = f"findings/{key}/r{c['repetitions']}_{c['ood_kind']}"
            out[f"{base}/verdict"] = c["verdict"]
            out[f"{base}/family_verdict"] = c["family_verdict"]
            for t, e in c["by_target"].items():
                for k in ("mean", "lo", "hi", "p", "n"):
                    out[f"{base}/{t}/{k}"] = e.get(k)
        for c in f.get("kinds", []):
            for var, r in c["cox"].items():
                for k in ("hr", "hr_lo", "hr_hi", "p"):
                    out[f"findings/{key}/{c['kind']}/{var}/{k}"] = r[k]
    return out
