"""Simulated studies for verdict_calibration.py: request results, per-example rows and attack results shaped like
the stored files (unlearn/<request>/result.json, examples.parquet, attacks/<request>/result.json), drawn from a
model whose spreads come from benchmarks/results/replicate_spread.json.

Model, per (kind, repetitions) cell c, seed s and forget group g, on y = log(1 + interpolated steps to UQ 0.9):
    y = mu_c + b_cs + e_csg,   b_cs ~ N(0, between-seed var of c),   e_csg ~ N(0, within-seed group var of c)
with mu_c, the variances from the measured components (a cell without a 0.9 entry takes its 0.8 one). Under no
effect every OOD cell has the mean of the ID cell of its repetitions (its own variances: Welch's situation); the
stated effect adds log 1.5 to the OOD cells (OOD (1 + steps) 1.5x). Steps above max_steps are censored there;
each request collapses with probability p_collapse and has nothing to forget with p_nothing (canary r1: 0.5, as
measured; others p_nothing_other). The utility cost log(ppl/ppl_0) at the crossing follows the same model with
the measured components of log(1 + utility drop) (id r1, unmeasured, takes id r4's), independent of the steps;
the stated F2 effect adds 0.3 to the ID cells. A one-seed study's claim is about its trained pair: its null ("no
difference in this pair") has no between-seed spread (seed_sd 0); the population null keeps it. F3: 16 examples per request, memorization (within-request SD 0.3,
request means 0.3 / 1.2 / 2.9 by repetitions) and difficulty (correlation 0.45 with it), exponential times to
forget with a rate falling with repetitions (the confounding across requests) times HR^z (z: memorization per
within-request SD; HR = 1 or 0.7), read on the evaluation grid and censored at max_steps (collapsed requests at
their collapse step); examples with low memorization are already forgotten at step 0 more often (logistic in z),
as in the issue. F4: the recovered share of attacked requests (repetitions 16, unlearned at 0.9, something to
forget; the rest skipped with the attack stage's reasons) ~ 0.1 + seed effect (SD 0.1) + group noise (SD 0.1)
(assumed: no measurement yet); the stated effect adds 0.15 (1.5 group SDs) to the OOD side.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

REPS = (1, 4, 16)
KINDS = ("id", "canary", "domain")
GRID = np.array([1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 65, 80, 100], float)
MEM_MEAN = {1: 0.3, 4: 1.2, 16: 2.9}
MEDIAN_STEPS = {1: 4.0, 4: 10.0, 16: 25.0}  # examples of more repeated requests take longer (confounding)
EFFECTS = {"F1": math.log(1.5), "F2": 0.3, "F3": math.log(0.7), "F4": 0.15}


@dataclass(frozen=True)
class Design:
    """A study design: seeds x forget groups per (kind, repetitions) cell."""

    name: str
    seeds: int
    groups: int = 3
    max_steps: float = 100.0
    p_collapse: float = 0.05
    p_nothing: dict = field(default_factory=lambda: {("canary", 1): 0.5})
    p_nothing_other: float = 0.03
    attack_reps: tuple = (16,)
    group_size: int = 16


# the shipped designs, and the same with a 10-step budget: at max_steps 100 the measured cells almost never censor,
# so these stress the censoring bound rule (r16 requests censor often)
DESIGNS = {"default": Design("default", seeds=1), "study": Design("study", seeds=5),
           "default_budget10": Design("default_budget10", seeds=1, max_steps=10.0),
           "study_budget10": Design("study_budget10", seeds=5, max_steps=10.0)}


def load_spread(path: Path) -> dict:
    """{(kind, reps): {mu, var_w, var_b, cost_mu, cost_var_w, cost_var_b}} from replicate_spread.json."""
    doc = json.loads(Path(path).read_text())
    steps, cost = doc["log1p_steps"], doc["log1p_utility_drop"]
    out = {}
    for kind in KINDS:
        for reps in REPS:
            s = steps.get(f"{kind}_r{reps} uq 0.9") or steps[f"{kind}_r{reps} uq 0.8"]
            c = cost.get(f"{kind}_r{reps}") or cost[f"{kind}_r4"]
            out[(kind, reps)] = {"mu": float(np.mean(s["seed_means"])), "var_w": s["within_seed_group_var"],
                                 "var_b": s["between_seed_var"], "cost_mu": float(np.mean(c["seed_means"])),
                                 "cost_var_w": c["within_seed_group_var"], "cost_var_b": c["between_seed_var"]}
    return out


def _outcome(step: float, collapsed: bool, max_steps: float, log_ppl: float) -> dict:
    if collapsed:
        return {"outcome": "collapsed", "step": float(min(step, max_steps)), "log_ppl_ratio": None}
    if step > max_steps:
        return {"outcome": "censored", "step": float(max_steps), "log_ppl_ratio": None}
    return {"outcome": "unlearned", "step": float(step), "log_ppl_ratio": float(log_ppl)}


def simulate_requests(design: Design, spread: dict, effect: str | None, rng, seed_sd: float = 1.0) -> list[dict]:
    """Every request of one simulated study, as result.json dicts with `seed` (effect: None, "F1" or "F2";
    seed_sd scales the between-seed SDs: 0 is the null of a one-seed claim, "no difference in this trained pair")."""
    out = []
    for seed in range(design.seeds):
        for kind in KINDS:
            for reps in REPS:
                p = spread[(kind, reps)]
                mu = spread[("id", reps)]["mu"] + (EFFECTS["F1"] if effect == "F1" and kind != "id" else 0.0)
                cmu = spread[("id", reps)]["cost_mu"] + (EFFECTS["F2"] if effect == "F2" and kind == "id" else 0.0)
                b = seed_sd * rng.normal(0, math.sqrt(p["var_b"]))
                cb = seed_sd * rng.normal(0, math.sqrt(p["cost_var_b"]))
                for g in range(design.groups):
                    y = mu + b + rng.normal(0, math.sqrt(p["var_w"]))
                    cost = cmu + cb + rng.normal(0, math.sqrt(p["cost_var_w"]))
                    collapsed = rng.random() < design.p_collapse
                    nothing = rng.random() < design.p_nothing.get((kind, reps), design.p_nothing_other)
                    step = max(math.expm1(y), 0.05)
                    o = _outcome(step, collapsed, design.max_steps, cost)
                    out.append({"request": f"{kind}_r{reps}_g{g}", "kind": kind, "repetitions": reps, "group": g,
                                "seed": seed, "nothing_to_forget": bool(nothing), "outcome": o["outcome"],
                                "outcomes": {t: dict(o) for t in ("0.5", "0.8", "0.9")},
                                "uq_auc": float(np.clip(1 - y / math.log1p(design.max_steps), 0, 1))})
    return out


def simulate_examples(design: Design, requests: list[dict], effect: str | None, rng) -> pd.DataFrame:
    """Per-example rows of every request with something to forget (effect "F3": HR 0.7 per within-request SD)."""
    beta = EFFECTS["F3"] if effect == "F3" else 0.0
    n = design.group_size
    frames = []
    for r in requests:
        reps = r["repetitions"]
        z = rng.normal(size=n)
        mem = MEM_MEAN[reps] + 0.3 * z
        diff = 4.0 + 0.3 * (0.45 * z + math.sqrt(1 - 0.45 ** 2) * rng.normal(size=n))
        rate = math.log(2) / MEDIAN_STEPS[reps] * np.exp(beta * z + rng.normal(0, 0.3))
        t = rng.exponential(1 / rate)
        end = design.max_steps
        if r["outcome"] == "collapsed":
            end = float(rng.choice(GRID[(GRID >= 4) & (GRID <= design.max_steps)]))
        censored = t > end
        steps = np.where(censored, end, GRID[np.minimum(np.searchsorted(GRID, t), len(GRID) - 1)])
        at_start = rng.random(n) < 1 / (1 + np.exp(2.5 + 1.5 * z))
        steps, censored = np.where(at_start, 0.0, steps), censored & ~at_start
        frames.append(pd.DataFrame({"kind": r["kind"], "repetitions": reps, "request": r["request"],
                                    "seed": r["seed"], "steps_to_forget": steps.astype(int), "censored": censored,
                                    "memorization": mem, "difficulty": diff,
                                    "nothing_to_forget": r["nothing_to_forget"]}))
    return pd.concat(frames, ignore_index=True)


def simulate_attacks(design: Design, requests: list[dict], effect: str | None, rng,
                     seed_sd: float = 1.0) -> tuple[list[dict], list[dict]]:
    """Attack results of the attacked requests and the skipped ones with the attack stage's reasons."""
    done, skipped = [], []
    shift = {(s, k): seed_sd * rng.normal(0, 0.1) for s in range(design.seeds) for k in KINDS}
    for r in requests:
        if r["repetitions"] not in design.attack_reps:
            continue
        ident = {k: r[k] for k in ("request", "kind", "repetitions", "group", "seed")}
        if r["nothing_to_forget"] or r["outcome"] != "unlearned":
            why = "it had nothing to forget" if r["nothing_to_forget"] else \
                f"it never became unlearned (outcome {r['outcome']})"
            skipped.append({**ident, "reason": why})
            continue
        mu = 0.1 + (EFFECTS["F4"] if effect == "F4" and r["kind"] != "id" else 0.0)
        share = {"recovered": float(mu + shift[(r["seed"], r["kind"])] + rng.normal(0, 0.1))}
        others = {"recovered": float(0.05 + rng.normal(0, 0.05))}
        done.append({**ident, "baseline": "oracle", "relearn_forget_fraction": share, "relearn_retain": others,
                     "quantization": {"int8": others, "int4": others}})
    return done, skipped
