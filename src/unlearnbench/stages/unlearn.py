"""The unlearn stage: every forget request of the run from θ₀ (`unlearn/<request>/`), then `unlearn/summary.json`
with the request table, the outcome counts and the cost. It writes only under `unlearn/`; the findings are decided
from these results by the report stage.

How several processes share the requests is decided here, once: job-parallel (`jobs`: each process runs whole
requests on its own model copy) or data-parallel (`data`: every request on all processes); see `parallel_mode`.
"""

from __future__ import annotations

import pandas as pd

from unlearnbench.config import Config
from unlearnbench.data.build import load_examples, load_tokenizer
from unlearnbench.distributed import is_sharded, peak_memory_mib
from unlearnbench.errors import UserError
from unlearnbench.evaluation import eval_subset
from unlearnbench.io import read_json, write_json
from unlearnbench.records import clear_outputs, finish_stage, require, should_run, stage_fingerprint
from unlearnbench.rundir import Context
from unlearnbench.run_summary import unlearn_summary
from unlearnbench.tracking import open_tracker
from unlearnbench.unlearn.request import Request, Worker, unlearn_request

NAME = "unlearn"


def build_requests(cfg: Config, forget: pd.DataFrame) -> list[Request]:
    """Requests per (kind, repetitions) group, per example, or one user-given list of example ids."""
    u = cfg.unlearn
    if u.request_kinds:
        forget = forget[forget.kind.isin(u.request_kinds)]
    if u.requests == "groups":  # one request per forget group: (kind, repetitions) x data.replicates groups
        several = cfg.data.replicates > 1
        return [Request(f"{k}_r{r}" + (f"_g{j}" if several else ""), sorted(g.example_id), k, int(r), int(j))
                for (k, r, j), g in forget.groupby(["kind", "repetitions", "group"])]
    if u.requests == "per_example":
        rows = forget.sort_values("example_id")
        if u.max_per_example_requests:
            rows = rows.groupby(["kind", "repetitions"]).head(
                max(1, u.max_per_example_requests // max(1, rows.groupby(["kind", "repetitions"]).ngroups)))
        return [Request(f"ex_{r.example_id}", [r.example_id], r.kind, int(r.repetitions), int(r.group))
                for r in rows.itertuples()]
    known = set(forget.example_id)
    missing = [e for e in u.example_ids if e not in known]
    if missing:
        raise UserError(f"unlearn.example_ids has ids that are not forget examples of this run: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Valid ids look like "
                        f"{', '.join(sorted(known)[:3])} (see scores/forget.parquet).")
    sub = forget[forget.example_id.isin(u.example_ids)]
    kinds = sorted(set(sub.kind))
    reps = sorted(set(sub.repetitions))
    return [Request("ids_" + "_".join(kinds), sorted(u.example_ids), "+".join(kinds), int(reps[0]) if len(reps) == 1 else -1)]


def parallel_mode(ctx: Context, n_requests: int) -> str:
    """`jobs` (job-parallel: each process runs whole requests on its own copy) or `data` (every request on all
    processes).

    Auto rule: job-parallel when there are several processes, at least as many requests as processes, and the
    model fits one device (plain DDP, no ZeRO or FSDP sharding); data-parallel otherwise.
    """
    acc, choice = ctx.acc, ctx.cfg.unlearn.parallel
    sharded = is_sharded(acc)
    if choice == "jobs" and sharded:
        raise UserError("unlearn.parallel=jobs needs a model that fits one device, but this launch shards it "
                        "(DeepSpeed ZeRO or FSDP). Use unlearn.parallel=data or a DDP accelerate config.")
    if choice != "auto":
        return choice if acc.num_processes > 1 else "data"
    return "jobs" if acc.num_processes > 1 and n_requests >= acc.num_processes and not sharded else "data"


def run(ctx: Context) -> None:
    """Every forget request of the run, then unlearn/summary.json with the request table."""
    require(ctx, "score")
    if not should_run(ctx, NAME):
        return
    cfg, acc = ctx.cfg, ctx.acc
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    subset = eval_subset(examples)
    # plain lists once for every request: indexing a lazy `datasets` column costs ~0.2 ms a lookup
    columns = examples.select_columns(["example_id", "input_ids", "score_start", "score_end", "split"]).to_dict()
    meta = subset.select_columns(["example_id", "kind", "repetitions", "group", "split"]).to_pandas()
    forget_scores = pd.read_parquet(ctx.run_dir / "scores" / "forget.parquet")
    requests = build_requests(cfg, forget_scores)
    if not requests or any(not r.example_ids for r in requests):
        raise UserError("The forget request is empty: no forget example matches unlearn.requests / request_kinds. "
                        "Check unlearn.request_kinds and data.kinds.")
    clear_outputs(ctx, NAME)  # only once the requests are valid: a bad config destroys nothing
    mode = parallel_mode(ctx, len(requests))
    worker = Worker(acc, job_parallel=mode == "jobs")
    # job-parallel: each process logs the requests it runs to metrics.jsonl; W&B stays on the main process
    trk = open_tracker(ctx, NAME, job_parallel=worker.job_parallel)
    trk.define_step("unlearn/step", "unlearn")
    acc.print(f"[unlearn] {len(requests)} request(s), method {cfg.unlearn.method}, "
              + ("job-parallel: each process runs whole requests on its own model copy" if worker.job_parallel
                 else f"data-parallel over {acc.num_processes} process(es)"))
    mine = requests[acc.process_index::acc.num_processes] if worker.job_parallel else requests
    fingerprint = stage_fingerprint(cfg, NAME)
    for req in mine:
        done = ctx.run_dir / "unlearn" / req.name / "result.json"
        if done.exists():
            # a request finished by an interrupted invocation counts only for the config it was computed for
            if read_json(done).get("fingerprint") == fingerprint:
                acc.print(f"[unlearn] {req.name}: already done, skipping")
                continue
            msg = f"[unlearn] {req.name}: its result was computed for another config; recomputing it"
            print(msg, flush=True) if worker.job_parallel else acc.print(msg)
        res = unlearn_request(ctx, req, columns, subset, meta, forget_scores, tok, trk, worker)
        msg = (f"[unlearn] {req.name}: stopped ({res['status']}) after {res['steps_run']} steps; steps to unlearn "
               f"{res['steps_to_unlearn']}, utility drop there {_fmt(res['utility_drop_at_unlearned'])}, "
               f"final UQ {res['uq_final']:.2f} (gap {res['exposure_gap_bits']:.1f} bits)")
        print(msg, flush=True) if worker.job_parallel else acc.print(msg)
    acc.wait_for_everyone()
    results = [read_json(ctx.run_dir / "unlearn" / r.name / "result.json") for r in requests]
    summary = unlearn_summary(cfg, ctx.run_dir, results)
    if ctx.is_main:
        write_json(ctx.run_dir / "unlearn" / "summary.json", summary)
    trk.finish()
    acc.print("[unlearn] outcomes: " + ", ".join(f"{n} {k}" for k, n in summary["outcomes"].items())
              + "; the report stage decides the findings")
    finish_stage(ctx, NAME, {"requests": len(results), **peak_memory_mib()})


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.1%}"
