#!/usr/bin/env python3
"""How often does each finding's overall verdict claim an effect that is not there, and how often does it find one
that is? Simulates whole studies of the shipped designs (`default`: 1 seed x 3 forget groups; `study`: 5 seeds x 3)
with censoring at max_steps, collapses, nothing-to-forget groups and the measured seed-level spread (the model is in
_verdict_sim.py), and decides each with the project's own verdict functions (unlearnbench.verdicts). (The 0.1 rules
they replaced were measured by this script at git 44d4bc8, while the package still had them: docs/findings.md.)
Writes benchmarks/results/verdict_calibration.json: per design and finding, the false-positive
rate of the overall verdict under no effect with its exact (Clopper-Pearson) 95% Monte Carlo interval, and the power
at the stated effect (F1: OOD 1.5x slower; F2: ID 0.3 log-ppl costlier; F3: HR 0.7 per within-request SD of
memorization; F4: OOD recovers 0.15 more).

    python benchmarks/verdict_calibration.py --jobs 2   # full: 11-15 minutes on 2 idle cores (~25 on one)
    python benchmarks/verdict_calibration.py --quick    # seconds: a logic check (results/*.quick.json)
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import stats

import _common as C
import _verdict_sim as S

from unlearnbench import verdicts

FINDINGS = ("F1", "F2", "F3", "F4")
SCENARIOS = ("null", "null_pair", *FINDINGS)
CLAIMS = ("reproduced", "partly reproduced", "reversed", "partly reversed", "mixed")
# Simulated studies per design: (null, power). F3 costs a lifelines fit per kind (~0.15 s a study with 9 strata,
# ~0.8 s with the study design's 45), so fewer. The budget designs check the censoring rule on F1, F2, F4 (F3's
# examples censor at max_steps in every design).
FULL = {"default": {"F124": (4000, 1000), "F3": (1500, 200)},
        "study": {"F124": (4000, 1000), "F3": (300, 100)},
        "default_budget10": {"F124": (4000, 1000), "F3": (0, 0)},
        "study_budget10": {"F124": (2000, 500), "F3": (0, 0)}}
QUICK = {"default": {"F124": (60, 20), "F3": (12, 6)},
         "study": {"F124": (20, 6), "F3": (3, 2)},
         "default_budget10": {"F124": (20, 6), "F3": (0, 0)},
         "study_budget10": {"F124": (10, 3), "F3": (0, 0)}}


# ------------------------------------------------------------------------------------------- one study


def _verdict(key: str, requests, examples, attacks, skipped) -> str:
    if key == "F1":
        return verdicts.decide_f1(requests, 0.9)["verdict"]
    if key == "F2":
        return verdicts.decide_f2(requests, 0.9)["verdict"]
    if key == "F3":
        return verdicts.decide_f3(examples)["verdict"]
    return verdicts.decide_f4(attacks, skipped)["verdict"]


def one_study(task: tuple) -> dict:
    """Simulate study `i` of (design, scenario) and decide the findings asked for: {key: verdict}.
    Scenarios: "null" (no effect, the measured seed spread), "null_pair" (no effect and no seed spread: the null
    of a one-seed claim), or a finding's key (its stated effect; no seed spread in a one-seed design)."""
    design_name, scenario, i, keys, seed, spread = task
    design = S.DESIGNS[design_name]
    effect = None if scenario.startswith("null") else scenario
    seed_sd = 0.0 if scenario == "null_pair" or (effect and design.seeds == 1) else 1.0
    rng = np.random.default_rng([seed, list(S.DESIGNS).index(design_name), SCENARIOS.index(scenario), i])
    requests = S.simulate_requests(design, spread, effect, rng, seed_sd)
    examples = S.simulate_examples(design, requests, effect, rng) if "F3" in keys else None
    attacks, skipped = S.simulate_attacks(design, requests, effect, rng, seed_sd)
    out = {"censored": sum(r["outcome"] == "censored" for r in requests) / len(requests)}
    for key in keys:
        out[key] = _verdict(key, requests, examples, attacks, skipped)
    return out


# ------------------------------------------------------------------------------------------- the runs


def _rate(hits: int, n: int) -> dict:
    ci = stats.binomtest(hits, n).proportion_ci(0.95, method="exact") if n else None
    return {"rate": hits / n if n else None, "hits": hits, "n": n,
            "mc_lo": None if ci is None else float(ci.low), "mc_hi": None if ci is None else float(ci.high)}


def _summarize(vs: list[str], scenario: str) -> dict:
    counts = {v: vs.count(v) for v in sorted(set(vs))}
    if scenario == "null":  # a claim in either direction is a false positive
        fp = _rate(sum(v in CLAIMS for v in vs), len(vs))
        return {"false_positive": fp, "at_most_5pct": fp["rate"] is not None and fp["rate"] <= 0.05,
                "mc_interval_below_5pct": fp["mc_hi"] is not None and fp["mc_hi"] <= 0.05,
                "false_positive_in_finding_direction": _rate(sum(v in CLAIMS[:2] for v in vs), len(vs)),
                "verdicts": counts}
    return {"power": _rate(sum(v in CLAIMS[:2] for v in vs), len(vs)),
            "all_cells": _rate(sum(v == "reproduced" for v in vs), len(vs)), "verdicts": counts}


def _tasks(design: str, scenario: str, keys, n: int, seed: int, spread: dict, start: int = 0) -> list[tuple]:
    return [(design, scenario, i, tuple(keys), seed, spread) for i in range(start, start + n)]


def calibrate(designs=tuple(S.DESIGNS), sizes: dict = FULL, seed: int = 0, jobs: int = 1,
              spread_path: Path = C.RESULTS / "replicate_spread.json") -> dict:
    """Every (design, scenario) of the calibration: {design: {finding: {null, power[, null_population]}}}. `null`
    is the null of the design's claim: for one seed "no difference in this trained pair", for seeds "no difference
    between kinds over seeds" (the measured seed spread); a one-seed design also gets `null_population` (F1, F2,
    F4): the measured seed spread, which no one-seed verdict can see."""
    spread = S.load_spread(spread_path)
    out, censored = {}, {}
    with ProcessPoolExecutor(jobs) if jobs > 1 else _Serial() as pool:
        for d in designs:
            (n0, n1), (m0, m1) = sizes[d]["F124"], sizes[d]["F3"]
            null = "null_pair" if S.DESIGNS[d].seeds == 1 else "null"
            runs = {"null": _tasks(d, null, ("F1", "F2", "F4"), n0, seed, spread)
                    + _tasks(d, null, ("F3",), m0, seed, spread, start=n0)}
            if null == "null_pair":
                runs["null_population"] = _tasks(d, "null", ("F1", "F2", "F4"), n0, seed, spread)
            for f in FINDINGS:
                runs[f] = _tasks(d, f, (f,), m1 if f == "F3" else n1, seed, spread)
            res = {}
            for sc, ts in runs.items():
                t0 = time.perf_counter()
                res[sc] = list(pool.map(one_study, ts, chunksize=max(1, len(ts) // (8 * jobs))))
                print(f"[calibration] {d} {sc}: {len(ts)} studies in {time.perf_counter() - t0:.0f} s", flush=True)
            censored[d] = float(np.mean([r["censored"] for r in res["null"]]))
            out[d] = {f: _collect(res, f) for f in FINDINGS}
    return {"results": out, "censored_fraction_null": censored}


def _collect(res: dict, f: str) -> dict:
    out = {}
    for name, sc, kind in (("null", "null", "null"), ("null_population", "null_population", "null"),
                           ("power", f, "power")):
        got = [r[f] for r in res.get(sc, []) if f in r]
        if got:
            out[name] = _summarize(got, kind)
    return out


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items, chunksize=1):
        return map(fn, items)


def table(body: dict) -> str:
    """The calibration table: false-positive rate under each null and power, with Monte Carlo intervals."""
    def rate(x):
        return "-" if not x or not x["n"] else f"{x['rate']:.3f} [{x['mc_lo']:.3f}, {x['mc_hi']:.3f}] (n={x['n']})"
    rows = []
    for d, by in body["results"].items():
        for f, r in by.items():
            for name in ("null", "null_population"):
                if name in r:
                    label = {"null": "pair" if S.DESIGNS[d].seeds == 1 else "seeds", "null_population": "population"}
                    rows.append([d, f, label[name], rate(r[name]["false_positive"]),
                                 rate(r.get("power", {}).get("power")) if name == "null" else ""])
    return C.fmt_table(rows, ["design", "finding", "null", "false positive [MC 95%]", "power [MC 95%]"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: a logic check in seconds")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (the numbers do not depend on it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    sizes = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    body = calibrate(sizes=sizes, seed=args.seed, jobs=args.jobs)
    print(table(body))
    body.update(sizes=sizes, seed=args.seed, effects=S.EFFECTS, model=S.__doc__,
                designs={k: vars(v) | {"p_nothing": {f"{a}_r{b}": p for (a, b), p in v.p_nothing.items()}}
                         for k, v in S.DESIGNS.items()},
                false_positive_means=f"overall verdict one of {', '.join(CLAIMS)} when no effect was simulated",
                power_means="overall verdict reproduced or partly reproduced (F4: in the simulated direction or "
                            "not; either is a difference) when the stated effect was simulated in every cell",
                seconds=time.perf_counter() - t0)
    print(f"{body['seconds']:.0f} s; wrote", C.write_result("verdict_calibration", body, args.quick, args.out_dir))


if __name__ == "__main__":
    main()
