"""The study's findings, one implementation each: F1-F3 of a run from its request results, the per-run
summary.json, the aggregation over seeds, and the flat view for trackers and the printed block.
The definitions are in docs/findings.md."""

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


def finding_f3(per_example: pd.DataFrame, n_boot: int, seed: int, alpha: float = 0.05) -> dict:
    """F3: steps to forget rises with memorization and with difficulty (Spearman, per kind)."""
    rows = []
    for kind, g in per_example.groupby("kind"):
        for var in ("memorization", "difficulty"):
            s = metrics.spearman_with_ci(g[var].to_numpy(), g.steps_to_forget.to_numpy(), n_boot=n_boot,
                                         alpha=alpha, seed=seed)
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
        findings["F3"] = finding_f3(per_example, cfg.metrics.n_boot, cfg.run.seed, cfg.metrics.alpha)
    return {"run": cfg.run.name, "seed": cfg.run.seed, "method": cfg.unlearn.method, "lr": cfg.unlearn.lr,
            "exposure": cfg.metrics.exposure, "uq_target": cfg.metrics.uq_target,
            "max_steps": cfg.unlearn.max_steps, "groups": table, "findings": findings}


# Numbers that exist only when a request became unlearned and had something to forget: a `nothing_to_forget`
# request's crossing is meaningless (UQ is not defined on a gap under the floor).
ONLY_WHEN_UNLEARNED = ("steps_to_unlearn", "utility_drop_at_unlearned")
AGGREGATED = ("steps_to_unlearn", "utility_drop_at_unlearned", "uq_final", "steps_to_forget_mean",
              "memorization_mean", "difficulty_mean", "exposure_gap_bits")


def group_values(summaries: list[dict], kind: str, reps: int, col: str) -> np.ndarray:
    """One group's values of `col` across run summaries (seeds), finite values only; the unlearned-only columns
    leave out requests with nothing to forget."""
    vals = []
    for s in summaries:
        for g in s["groups"]:
            if g["kind"] == kind and int(g["repetitions"]) == reps:
                v = g.get(col)
                if col in ONLY_WHEN_UNLEARNED and g.get("nothing_to_forget"):
                    v = None
                if v is not None and np.isfinite(float(v)):
                    vals.append(float(v))
    return np.asarray(vals, float)


def aggregate_seeds(run_dirs: list[Path], alpha: float = 0.05) -> dict:
    """Mean and (1 - alpha) t-interval across seeds of each group's numbers; how many seeds reproduce each finding."""
    sums = [read_json(Path(d) / "summary.json") for d in run_dirs if (Path(d) / "summary.json").exists()]
    cells = sorted({(g["kind"], int(g["repetitions"])) for s in sums for g in s["groups"]})
    groups = []
    for kind, reps in cells:
        members = [g for s in sums for g in s["groups"] if g["kind"] == kind and int(g["repetitions"]) == reps]
        rec = {"kind": kind, "repetitions": reps, "seeds": len(members)}
        for col in AGGREGATED:
            rec[col] = metrics.mean_ci(group_values(sums, kind, reps, col), alpha)
        rec["unlearned_seeds"] = sum(g.get("steps_to_unlearn") is not None for g in members)
        groups.append(rec)
    findings = {}
    for key in ("F1", "F2", "F3"):
        verdicts = [s["findings"][key]["verdict"] for s in sums if key in s.get("findings", {})]
        if verdicts:
            findings[key] = {"verdicts": verdicts, "reproduced_in": sum(v == "reproduced" for v in verdicts),
                             "of": len(verdicts), "verdict": _verdict([v == "reproduced" for v in verdicts])}
    return {"seeds": [s["seed"] for s in sums], "runs": [Path(d).name for d in run_dirs], "groups": groups,
            "findings": findings}


def flatten_findings(summary: dict) -> dict:
    """F1-F3 numbers and verdicts as flat summary keys for trackers."""
    out = {}
    for key, f in summary.get("findings", {}).items():
        out.update({f"findings/{key}/verdict": f["verdict"], f"findings/{key}/holds": f["holds"],
                    f"findings/{key}/of": f["of"]})
        for c in f.get("comparisons", []):
            base = f"findings/{key}/r{c['repetitions']}_{c['ood_kind']}"
            for k in ("id_steps", "ood_steps", "id_utility_drop", "ood_utility_drop"):
                if k in c:
                    out[f"{base}/{k}"] = c[k]
        for c in f.get("correlations", []):
            for k in ("rho", "lo", "hi", "p", "n"):
                out[f"findings/{key}/{c['kind']}/{c['variable']}/{k}"] = c[k]
    return out


def format_findings(summary: dict) -> str:
    """The findings block printed at the end of the unlearn stage."""
    lines = ["[findings]"]
    for key, f in summary.get("findings", {}).items():
        lines.append(f"  {key}: {f['verdict']} — {f['statement']}")
    return "\n".join(lines)
