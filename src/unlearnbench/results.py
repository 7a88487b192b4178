"""A run's stored results, read from the files the stages wrote: the unlearn stage's request table and each
request's `result.json`, curve and forgetting table (each example's steps to forget); the attack stage's per-request
results. The one loader the findings, the merged `summary.json` and the report read them through, and the one count
of how requests ended.
The files are described in docs/outputs.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from unlearnbench.errors import UserError
from unlearnbench.io import read_json
from unlearnbench.records import check_layout, read_record

# One row of the request table (`requests` of unlearn/summary.json and of summary.json): a request's main
# result.json numbers, plus its interpolated crossing step per UQ target (`step_uq_<t>`: `outcomes[t].step`; the
# first evaluated step at or above a target is result.json's `eval_step_uq_<t>` and `outcomes[t].grid_step`).
REQUEST_COLUMNS = ("request", "kind", "repetitions", "group", "n_examples", "status", "outcome", "steps_to_unlearn",
                   "utility_drop_at_unlearned", "uq_auc", "uq_final", "uq_max", "exposure_original_mean",
                   "exposure_oracle_mean", "exposure_gap_bits", "nothing_to_forget", "steps_to_forget_mean",
                   "censored_fraction", "memorization_mean", "difficulty_mean", "collapsed", "steps_run",
                   "wall_seconds", "eval_share", "flops", "device_seconds", "peak_memory_mib")
OUTCOMES = ("unlearned", "censored", "collapsed", "nothing_to_forget")


def request_row(r: dict) -> dict:
    """A request's row of the request table, from its result.json."""
    return {k: r.get(k) for k in REQUEST_COLUMNS} | {
        f"step_uq_{k}": o["step"] if o["outcome"] == "unlearned" else None for k, o in r.get("outcomes", {}).items()}


def outcome_of(r: dict) -> str:
    """How a request ended (a result.json or a row of the request table): `nothing_to_forget` overrides its outcome
    (`unlearned`, `censored`, `collapsed`)."""
    return "nothing_to_forget" if r.get("nothing_to_forget") else (r.get("outcome") or "censored")


def outcome_counts(rows: list[dict]) -> dict[str, int]:
    """How many requests ended each way (`outcome_of`), every request counted once."""
    out: dict[str, int] = {}
    for r in rows:
        key = outcome_of(r)
        out[key] = out.get(key, 0) + 1
    return out


# ----------------------------------------------------------------------------------------------- the run's files


def read_unlearn_summary(run_dir: Path) -> dict:
    """`unlearn/summary.json`: the unlearn stage's request table, outcome counts and cost. A run directory of an
    older layout is refused (`records.check_layout`)."""
    run_dir = Path(run_dir)
    check_layout(run_dir, ["unlearn"])
    path = run_dir / "unlearn" / "summary.json"
    if not path.exists():
        raise UserError(f"No unlearn/summary.json in {run_dir}: run the unlearn stage first "
                        f"(`unlearnbench unlearn run.dir={run_dir}`).")
    return read_json(path)


def load_requests(run_dir: Path) -> list[dict]:
    """Each request's unlearn/<request>/result.json, in the order of the unlearn stage's request table."""
    rows = read_unlearn_summary(run_dir)["requests"]
    return [read_json(Path(run_dir) / "unlearn" / row["request"] / "result.json") for row in rows]


def load_forgetting(run_dir: Path, results: list[dict]) -> pd.DataFrame:
    """Every request's forgetting.parquet (each example's steps to forget) with its request name and nothing_to_forget
    flag."""
    frames = []
    for r in results:
        p = Path(run_dir) / "unlearn" / r["request"] / "forgetting.parquet"
        if p.exists():
            frames.append(pd.read_parquet(p).assign(request=r["request"], nothing_to_forget=bool(r["nothing_to_forget"])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_curves(run_dir: Path, results: list[dict]) -> dict[str, pd.DataFrame]:
    """Each request's curve.parquet (one row per evaluated step), by request name."""
    out = {}
    for r in results:
        p = Path(run_dir) / "unlearn" / r["request"] / "curve.parquet"
        if p.exists():
            out[r["request"]] = pd.read_parquet(p)
    return out


@dataclass
class RunResults:
    """A run's stored per-request results (`load_run`)."""

    run_dir: Path
    unlearn: dict  # unlearn/summary.json
    requests: list[dict]  # each request's unlearn/<request>/result.json, in the request table's order
    forgetting: pd.DataFrame  # every request's forgetting.parquet, with `request` and `nothing_to_forget`
    attacks: dict | None  # attacks/summary.json; None when the attack stage wrote none (or not on these results)
    attack_results: list[dict]  # each attacked request's attacks/<request>/result.json, by name
    note: str | None = None  # why attack results that exist were left out


def attacks_current(run_dir: Path) -> bool:
    """True when the attack stage's record says it ran on the unlearn stage's current outputs (not on those of an
    unlearn stage rerun since)."""
    att, unl = read_record(Path(run_dir), "attack"), read_record(Path(run_dir), "unlearn")
    if not att or att.get("invalid") or not unl or not unl.get("outputs_digest"):
        return False
    return (att.get("inputs") or {}).get("unlearn") == unl["outputs_digest"]


def with_identity(skipped: list[dict], requests: list[dict]) -> list[dict]:
    """The attack stage's skipped requests, each with its kind, repetitions and group taken from its unlearn result
    (what F4 counts them by), whatever the stored entry kept."""
    ident = {r["request"]: {k: r[k] for k in ("request", "kind", "repetitions", "group") if k in r}
             for r in requests}
    return [{**ident.get(s["request"], {}), **s} for s in skipped]


def load_run(run_dir: Path) -> RunResults:
    """A run's per-request results of the unlearn and attack stages, and its forgetting tables. Attack results
    count only when the attack stage ran on the current unlearn results."""
    run_dir = Path(run_dir)
    unlearn = read_unlearn_summary(run_dir)
    requests = load_requests(run_dir)
    attacks_path, note = run_dir / "attacks" / "summary.json", None
    attacks = read_json(attacks_path) if attacks_path.exists() else None
    if attacks is not None and not attacks_current(run_dir):
        attacks, note = None, (f"attacks/ holds results of an attack stage that did not run on the current unlearn "
                               f"results; they are left out (`unlearnbench attack run.dir={run_dir}` redoes them)")
    attack_results = ([read_json(p) for p in sorted((run_dir / "attacks").glob("*/result.json"))]
                      if attacks is not None else [])
    if attacks is not None:  # attacks/summary.json before 0.2 kept a skipped request's name and reason only
        attacks["skipped"] = with_identity(attacks.get("skipped", []), requests)
    return RunResults(run_dir, unlearn, requests, load_forgetting(run_dir, requests), attacks, attack_results, note)
