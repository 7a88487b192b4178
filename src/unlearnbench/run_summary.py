"""A run's summaries, one writer each: the unlearn stage's `unlearn/summary.json` (request table, outcome counts,
cost), the attack stage's `attacks/summary.json` (attacked requests, skipped ones with the reason, settings), and
the merged view `summary.json`, which only the report stage writes: the request rows with the attack columns,
F1-F4 and the survival view decided from the stored per-request results, and the cost. The keys are listed in
docs/outputs.md.
"""

from __future__ import annotations

from pathlib import Path

from unlearnbench import verdicts
from unlearnbench.config import Config
from unlearnbench.findings import run_findings, survival
from unlearnbench.io import read_json
from unlearnbench.results import RunResults, outcome_counts, request_row

HEADER = ("run", "seed", "method", "lr", "exposure", "uq_target", "max_steps", "replicates", "replicate_unit",
          "e_r_source")


def header(cfg: Config) -> dict:
    """What a run's summaries say about its settings."""
    return {"run": cfg.run.name, "seed": cfg.run.seed, "method": cfg.unlearn.method, "lr": cfg.unlearn.lr,
            "exposure": cfg.metrics.exposure, "uq_target": cfg.metrics.uq_target, "max_steps": cfg.unlearn.max_steps,
            "replicates": cfg.data.replicates, "replicate_unit": "disjoint forget groups inside one θ₀/θᵣ pair",
            # e_r: the oracle θᵣ's exposures, or (train.oracle=false) held-out references, leave-one-out under θ₀
            "e_r_source": "oracle" if cfg.train.oracle else "held_out_references"}


def run_cost(run_dir: Path, results: list[dict]) -> dict:
    """Wall time, device-seconds and peak memory per finished stage (from stages/*.json) and the unlearn requests'
    estimated FLOPs and device-seconds, so a bigger run's cost can be predicted from this one."""
    stages = {}
    for p in sorted((Path(run_dir) / "stages").glob("*.json")):
        info = read_json(p).get("info", {})
        stages[p.stem] = {k: info.get(k) for k in ("seconds", "device_seconds", "peak_memory_mib", "flops")
                          if info.get(k) is not None}
    req = {k: float(sum(r.get(k) or 0.0 for r in results)) for k in ("flops", "device_seconds", "wall_seconds")}
    return {"stages": stages, "unlearn_requests": req}


def unlearn_summary(cfg: Config, run_dir: Path, results: list[dict]) -> dict:
    """`unlearn/summary.json`: the settings, how the requests ended, one row per request, the cost so far."""
    return {**header(cfg), "outcomes": outcome_counts(results), "requests": [request_row(r) for r in results],
            "cost": run_cost(run_dir, results)}


def attack_summary(cfg: Config, results: list[dict], skipped: list[dict]) -> dict:
    """`attacks/summary.json`: every attacked request's result, the requests skipped with the reason, the settings."""
    a = cfg.attack
    return {"requests": results, "skipped": skipped, "selection": a.requests, "relearn_steps": a.relearn_steps,
            "relearn_lr": a.relearn_lr, "quant_bits": list(a.quant_bits)}


def attack_columns(res: dict) -> dict:
    """One request's attack results as flat columns (for summary.json's request rows and the trackers): recovered share
    after relearning (retain, forget fraction, its held-out part) and quantization, MIA AUC under θ₀ (`original`),
    the unlearned model and θᵣ (`oracle`), PrivLeak."""
    out: dict = {}
    for v in ("retain", "forget_fraction"):
        r = res.get(f"relearn_{v}") or {}
        out.update({f"attack_relearn_{v}_{k}": r.get(k) for k in ("recovered", "lo", "hi")})
        if v == "forget_fraction":
            out["attack_relearn_held_out_recovered"] = (r.get("held_out") or {}).get("recovered")
    for q, v in (res.get("quantization") or {}).items():
        if "recovered" in v:
            out[f"attack_quant_{q}_recovered"] = v["recovered"]
        if "uq" in v:
            out[f"attack_quant_{q}_uq"] = v["uq"]
    mia = res.get("mia") or {}
    for model in ("original", "unlearned", "oracle"):
        out.update({f"attack_mia_{att}_auc_{model}": auc for att, auc in (mia.get(model) or {}).items()})
    out.update({f"attack_mia_{att}_priv_leak": v for att, v in (mia.get("priv_leak") or {}).items()})
    return out


def merged_summary(cfg: Config, run: RunResults) -> dict:
    """The run's `summary.json`, decided from its stored per-request results (`results.load_run`): settings,
    outcome counts, one row per request (with `attacked` and the `attack_*` columns once the attack stage ran),
    F1-F3, the survival view, the cost, and an `attacks` block with the attack settings and F4. `cfg` gives the
    rules' parameters (UQ target, alpha, bootstrap draws, seed): its fingerprint is the stored results' own."""
    u = run.unlearn
    rows = [request_row(r) for r in run.requests]
    out = {**{k: u[k] for k in HEADER}, "outcomes": outcome_counts(run.requests), "requests": rows,
           "findings": run_findings(cfg, run.requests, run.forgetting),
           "survival": survival(run.forgetting) if not run.forgetting.empty else {}, "cost": u["cost"]}
    if run.attacks is not None:
        by_request = {r["request"]: attack_columns(r) for r in run.attack_results}
        for row in rows:
            row["attacked"] = row["request"] in by_request
            row.update(by_request.get(row["request"], {}))
        a = run.attacks
        out["attacks"] = {"requests": sorted(by_request), "selection": a["selection"],
                          "relearn_steps": a["relearn_steps"], "relearn_lr": a["relearn_lr"],
                          "quant_bits": a["quant_bits"],
                          "findings": {"F4": verdicts.decide_f4(run.attack_results, a.get("skipped", []),
                                                                cfg.metrics.alpha)}}
    return out
