#!/usr/bin/env python3
"""How much of the spread between replicates do forget groups capture, and how much needs full seeds?

Reads the `summary.json` of two or more finished runs of the same preset that differ only in `run.seed` (each a full
seed: data draw, initialisation, training order) and splits the variance of each request's interpolated steps to
reach UQ 0.5 / 0.8 / 0.9 (on log(1 + step), the scale on which steps are compared) and of its utility drop
(log(1 + drop)) into two components per (kind, repetitions): between forget groups inside one θ₀/θᵣ pair, and
between seeds beyond that (one-way ANOVA estimator: var of the seed means minus the within-seed variance over the
mean group count, floored at 0: unlearnbench.metrics.contrast.variance_components, which
unlearnbench.verdicts.replicate_spread also uses on a multi-seed study). It also checks, per F1/F2 cell, whether
one seed's interval covers the other's estimate. Writes benchmarks/results/replicate_spread.json.

    python benchmarks/replicate_spread.py runs/default/summary.json runs/default-seed1/summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import _common as C

from unlearnbench.metrics.contrast import variance_components as components  # the package's one implementation

TARGETS = ("0.5", "0.8", "0.9")


def _cells(summary: dict) -> dict:
    out: dict = {}
    for g in summary["requests"]:
        if not g.get("nothing_to_forget"):
            out.setdefault(f"{g['kind']}_r{g['repetitions']}", {})[g["group"]] = g
    return out


def spread(summaries: list[dict]) -> dict:
    cells = [_cells(s) for s in summaries]
    keys = sorted(set().union(*[c.keys() for c in cells]))
    steps, utility = {}, {}
    for k in keys:
        for t in TARGETS:
            col = f"step_uq_{t}"
            r = components([[np.log1p(g[col]) for g in c.get(k, {}).values() if g.get(col) is not None] for c in cells])
            if r:
                steps[f"{k} uq {t}"] = r
        r = components([[np.log1p(g["utility_drop_at_unlearned"]) for g in c.get(k, {}).values()
                         if g.get("utility_drop_at_unlearned") is not None] for c in cells])
        if r:
            utility[k] = r

    def mean_of(d: dict) -> dict:
        w = float(np.nanmean([v["within_seed_group_var"] for v in d.values()]))
        b = float(np.nanmean([v["between_seed_var"] for v in d.values()]))
        return {"within_seed_group_var": w, "between_seed_var": b, "seed_share": b / (w + b) if w + b > 0 else None}

    findings = {}
    for f in ("F1", "F2"):
        rows = {}
        for s in summaries:
            for c in s["findings"][f]["contrasts"]:
                b = c["by_target"][c["main"]]
                rows.setdefault(f"r{c['repetitions']} {c['ood_kind']}", []).append(
                    {k: b[k] for k in ("mean", "lo", "hi", "n_informative")} | {"verdict": c["verdict"]})
        covered = [all(x["lo"] <= y["mean"] <= x["hi"] for x in v for y in v)
                   for v in rows.values() if all(x["lo"] is not None and x["mean"] is not None for x in v)]
        findings[f] = {"contrasts": rows, "verdicts": [s["findings"][f]["verdict"] for s in summaries],
                       "contrasts_with_intervals_covering_each_other": f"{sum(covered)} of {len(covered)}"}
    findings["F3"] = {"verdicts": [s["findings"]["F3"]["verdict"] for s in summaries]}
    return {"seeds": [s.get("seed") for s in summaries], "log1p_steps": steps, "log1p_steps_mean": mean_of(steps),
            "log1p_utility_drop": utility, "log1p_utility_drop_mean": mean_of(utility) if utility else None,
            "findings": findings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("summaries", nargs="+", help="summary.json of runs that differ only in run.seed")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    if len(args.summaries) < 2:
        ap.error("give the summary.json of at least two seeds")
    summaries = [json.loads(Path(p).read_text()) for p in args.summaries]
    body = spread(summaries)
    rows = [[k, " ; ".join(",".join(f"{x:.2f}" for x in v) for v in r["values"]), f"{r['within_seed_group_var']:.3f}",
             f"{r['between_seed_var']:.3f}", "-" if r["seed_share"] is None else f"{r['seed_share']:.2f}"]
            for k, r in body["log1p_steps"].items()]
    print(C.fmt_table(rows, ["cell, target", "log(1+step) per seed: groups", "group var", "seed var", "seed share"]))
    m = body["log1p_steps_mean"]
    print(f"mean over cells: group var {m['within_seed_group_var']:.3f}, seed var {m['between_seed_var']:.3f}")
    for f in ("F1", "F2", "F3"):
        print(f, body["findings"][f]["verdicts"],
              body["findings"][f].get("contrasts_with_intervals_covering_each_other", ""))
    body["inputs"] = [C.portable_path(p) for p in args.summaries]
    print("wrote", C.write_result("replicate_spread", body, False, args.out_dir))


if __name__ == "__main__":
    main()
