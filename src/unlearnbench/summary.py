"""summary.json: per (kind, repetitions) results and the study's findings F1-F3, derived from the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from unlearnbench import metrics
from unlearnbench.config import Config
from unlearnbench.io import read_json

OOD_KINDS = ("canary", "domain")


def _usable(r: dict) -> bool:
    return not r["nothing_to_forget"]


def _pairs(groups: dict) -> list[tuple[dict, dict]]:
    """(ID, OOD) group results of the same repetitions where both had something to forget."""
    out = []
    for (kind, reps), g in sorted(groups.items()):
        if kind in OOD_KINDS and ("id", reps) in groups:
            i = groups[("id", reps)]
            if _usable(i) and _usable(g):
                out.append((i, g))
    return out


def _verdict(holds: list[bool]) -> str:
    if not holds:
        return "inconclusive"
    share = sum(holds) / len(holds)
    return "reproduced" if share > 0.5 else ("partly reproduced" if share > 0 else "not reproduced")


def finding_f1(groups: dict) -> dict:
    """F1: OOD requests need more steps to become unlearned than ID requests of the same repetitions."""
    rows = []
    for i, o in _pairs(groups):
        rows.append({"repetitions": i["repetitions"], "ood_kind": o["kind"],
                     "id_steps": i["steps_to_unlearn_censored"], "ood_steps": o["steps_to_unlearn_censored"],
                     "id_censored": not i["unlearned"], "ood_censored": not o["unlearned"],
                     "id_steps_to_forget_mean": i["steps_to_forget_mean"],
                     "ood_steps_to_forget_mean": o["steps_to_forget_mean"],
                     "holds": o["steps_to_unlearn_censored"] > i["steps_to_unlearn_censored"]})
    return {"statement": "OOD requests need more unlearning steps than ID requests of the same repetitions",
            "comparisons": rows, "holds": sum(r["holds"] for r in rows), "of": len(rows),
            "verdict": _verdict([r["holds"] for r in rows])}


def finding_f2(groups: dict) -> dict:
    """F2: when unlearned, ID requests have a larger utility drop than OOD requests."""
    rows = []
    for i, o in _pairs(groups):
        a, b = i["utility_drop_at_unlearned"], o["utility_drop_at_unlearned"]
        if a is None or b is None:
            continue
        rows.append({"repetitions": i["repetitions"], "ood_kind": o["kind"], "id_utility_drop": a,
                     "ood_utility_drop": b, "holds": a > b})
    return {"statement": "At the step a request becomes unlearned, ID requests cost more utility than OOD ones",
            "comparisons": rows, "holds": sum(r["holds"] for r in rows), "of": len(rows),
            "verdict": _verdict([r["holds"] for r in rows])}


def finding_f3(per_example: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """F3: steps to forget rises with memorization and with difficulty (Spearman, per kind)."""
    rows = []
    for kind, g in per_example.groupby("kind"):
        for var in ("memorization", "difficulty"):
            s = metrics.spearman_with_ci(g[var].to_numpy(), g.steps_to_forget.to_numpy(), n_boot=n_boot, seed=seed)
            rows.append({"kind": kind, "variable": var, **s,
                         "censored_fraction": float(g.censored.mean()),
                         "holds": bool(np.isfinite(s["rho"]) and s["rho"] > 0 and s["lo"] > 0)})
    mem = [r["holds"] for r in rows if r["variable"] == "memorization" and np.isfinite(r["rho"])]
    return {"statement": "Steps to forget correlates positively with memorization (Spearman ρ > 0, 95% interval "
                         "above 0); the correlation with difficulty is reported with its sign",
            "correlations": rows, "holds": sum(mem), "of": len(mem), "verdict": _verdict(mem)}


def summarize_run(cfg: Config, run_dir: Path, results: list[dict]) -> dict:
    """Group table and findings of one run (one seed)."""
    groups = {(r["kind"], r["repetitions"]): r for r in results if cfg.unlearn.requests == "groups"}
    frames = []
    for r in results:
        p = Path(run_dir) / "unlearn" / r["request"] / "examples.parquet"
        if p.exists():
            frames.append(pd.read_parquet(p))
    per_example = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table = [{k: r.get(k) for k in ("request", "kind", "repetitions", "n_examples", "status", "steps_to_unlearn",
                                    "utility_drop_at_unlearned", "uq_final", "uq_max", "exposure_original_mean",
                                    "exposure_oracle_mean", "exposure_gap_bits", "nothing_to_forget",
                                    "steps_to_forget_mean", "censored_fraction", "memorization_mean",
                                    "difficulty_mean", "diverged", "steps_run")} for r in results]
    findings = {}
    if groups:
        findings["F1"] = finding_f1(groups)
        findings["F2"] = finding_f2(groups)
    if not per_example.empty:
        findings["F3"] = finding_f3(per_example, cfg.metrics.n_boot, cfg.run.seed)
    return {"run": cfg.run.name, "seed": cfg.run.seed, "method": cfg.unlearn.method, "lr": cfg.unlearn.lr,
            "exposure": cfg.metrics.exposure, "uq_target": cfg.metrics.uq_target,
            "max_steps": cfg.unlearn.max_steps, "groups": table, "findings": findings}


def aggregate_seeds(run_dirs: list[Path]) -> dict:
    """Mean and 95% interval across seeds of each group's numbers; how many seeds reproduce each finding."""
    sums = [read_json(Path(d) / "summary.json") for d in run_dirs if (Path(d) / "summary.json").exists()]
    rows = [dict(g, seed=s["seed"]) for s in sums for g in s["groups"]]
    df = pd.DataFrame(rows)
    groups = []
    if not df.empty:
        for (kind, reps), g in df.groupby(["kind", "repetitions"]):
            rec = {"kind": kind, "repetitions": int(reps), "seeds": len(g)}
            for col in ("steps_to_unlearn", "utility_drop_at_unlearned", "uq_final", "steps_to_forget_mean",
                        "memorization_mean", "difficulty_mean", "exposure_gap_bits"):
                vals = pd.to_numeric(g[col], errors="coerce").dropna().to_numpy(float)
                rec[col] = _mean_ci(vals)
            rec["unlearned_seeds"] = int(g.steps_to_unlearn.notna().sum())
            groups.append(rec)
    findings = {}
    for key in ("F1", "F2", "F3"):
        verdicts = [s["findings"][key]["verdict"] for s in sums if key in s.get("findings", {})]
        if verdicts:
            findings[key] = {"verdicts": verdicts, "reproduced_in": sum(v == "reproduced" for v in verdicts),
                             "of": len(verdicts), "verdict": _verdict([v == "reproduced" for v in verdicts])}
    return {"seeds": [s["seed"] for s in sums], "runs": [str(d) for d in run_dirs], "groups": groups,
            "findings": findings}


def _mean_ci(vals: np.ndarray) -> dict:
    if len(vals) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    from scipy import stats

    mean = float(vals.mean())
    if len(vals) < 2 or np.all(vals == vals[0]):
        return {"mean": mean, "lo": mean, "hi": mean, "n": len(vals)}
    half = float(stats.t.ppf(0.975, len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(vals)}
