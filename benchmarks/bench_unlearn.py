#!/usr/bin/env python3
"""Gradient-ascent throughput of the project's unlearning step against a `transformers.Trainer`, and eval share.

1. Steps/s and tokens/s, same model (the `default` Llama, one random init), same forget pool (320 prepared
   examples), batch 32, AdamW lr 3e-4, 60 steps (the first 5 are warm-up and not timed), 2 threads,
   repetitions alternated A B A B ...:
     project  the project's own `unlearnbench.unlearn.request.step` after `setup` (data-parallel worker:
              `Accelerator.prepare`, output layer on the scored positions, the `ga` method, gradient norm);
              the columns as plain lists, as the loop holds them
     trainer  `transformers.Trainer` whose `compute_loss` returns `-model(**inputs).loss` (how TOFU and
              open-unlearning run gradient ascent), the same collate, optim adamw_torch, constant lr
   Target: project >= 1.0x trainer.
2. In-loop evaluation share at the default log schedule (step 0, 1, 2, 3, 4, 6, 8, 10, 13, ... 100):
     recorded   eval_seconds / wall_seconds of runs/default/unlearn/*/result.json, when a default run exists
     measured   one `RequestEvaluator.evaluate` (the sharded pass over the request, its kind's references and the
                utility sets, plus the metrics) timed here, projected with the measured step time over the
                schedule: share = n_eval * t_eval / (n_eval * t_eval + steps * t_step), for the full 100 steps
                and for a request that stops early.
   Target: <= 20% of wall time.

    python benchmarks/bench_unlearn.py           # full settings (about 2.5 minutes on 2 idle cores)
    python benchmarks/bench_unlearn.py --quick   # tiny settings: checks the script works
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402


def project_loop(acc, cfg, init_state, ds, forget_rows, steps, warmup) -> dict:
    """The project's unlearning step (`unlearn.request.step`, set up by `unlearn.request.setup`), no evaluation,
    timed from step `warmup` on."""
    from unlearnbench.unlearn.request import RequestData, Worker, setup, step

    all_ids, starts, ends = (list(ds[c]) for c in ("input_ids", "score_start", "score_end"))  # lists, as the loop
    order = np.random.default_rng([cfg.run.seed, 104729]).permutation(len(forget_rows))
    data = RequestData(all_ids, starts, ends, np.array([len(x) for x in all_ids]), list(forget_rows), [], order, 0)
    model = C.default_model(cfg.data.vocab_size)
    model.load_state_dict(init_state)
    u = setup(cfg, Worker(acc, job_parallel=False), model, data)
    tokens, step_s, t_begin, total_loss = 0, [], None, float("nan")
    for i in range(steps):
        if i == warmup:
            t_begin = time.perf_counter()
        t0 = time.perf_counter()
        res = step(u, i)
        if res.collapsed:
            raise RuntimeError(f"collapsed at step {i}: {res.collapsed}")
        total_loss = res.loss
        if i >= warmup:
            tokens += res.tokens
            step_s.append(time.perf_counter() - t0)
    sec = time.perf_counter() - t_begin
    acc.free_memory()
    return {"steps": steps - warmup, "seconds": sec, "tokens": tokens, "step_seconds_median": float(np.median(step_s)),
            "final_loss": total_loss}


def trainer_loop(cfg, init_state, ds, forget_rows, steps, warmup) -> dict:
    """transformers.Trainer with compute_loss = -loss: TOFU / open-unlearning gradient ascent."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from unlearnbench.batching import collate

    all_ids, starts, ends = ds["input_ids"], ds["score_start"], ds["score_end"]
    model = C.default_model(cfg.data.vocab_size)
    model.load_state_dict(init_state)
    counted = {"tokens": 0}

    class Forget(torch.utils.data.Dataset):
        def __len__(self):
            return len(forget_rows)

        def __getitem__(self, i):
            return forget_rows[i]

    def coll(rows):
        return collate([all_ids[r] for r in rows], [starts[r] for r in rows], [ends[r] for r in rows], 0)

    class GradientAscent(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            if self.state.global_step >= warmup:
                counted["tokens"] += int(inputs["attention_mask"].sum())
            return (-out.loss, out) if return_outputs else -out.loss

    marks = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and "t0" not in marks:
                marks["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps:
                marks["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.unlearn.batch_size, max_steps=steps,
                                  learning_rate=cfg.unlearn.lr, weight_decay=cfg.unlearn.weight_decay,
                                  lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
                                  logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
                                  remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True,
                                  seed=cfg.run.seed)
        trainer = GradientAscent(model=model, args=targs, train_dataset=Forget(), data_collator=coll,
                                 callbacks=[Clock()])
        t_all = time.perf_counter()
        trainer.train()
        t_all = time.perf_counter() - t_all
    return {"steps": steps - warmup, "seconds": marks["t1"] - marks["t0"], "tokens": counted["tokens"],
            "train_call_seconds": t_all}


def recorded_eval_share(run_dir: Path) -> list[dict]:
    out = []
    for p in sorted(run_dir.glob("unlearn/*/result.json")):
        r = json.loads(p.read_text())
        if "eval_seconds" in r and r.get("wall_seconds"):
            out.append({"request": r["request"], "steps_run": r.get("steps_run"), "status": r.get("status"),
                        "wall_seconds": r["wall_seconds"], "eval_seconds": r["eval_seconds"],
                        "eval_share": r["eval_seconds"] / r["wall_seconds"]})
    return out


def measured_eval(acc, cfg, model, reps: int, quick: bool = False) -> dict:
    """Time RequestEvaluator.evaluate on a canary request of the prepared default data, at steps >= 1: the in-loop
    evaluations (step 0 is θ₀, which the evaluator takes from the score stage or scores against every reference)."""
    import pandas as pd

    from unlearnbench.data.build import load_examples
    from unlearnbench.evaluation import RequestEvaluator, eval_subset

    examples = load_examples(C.prepared_dir())
    subset = eval_subset(examples)
    meta = subset.select_columns(["example_id", "kind", "repetitions", "split"]).to_pandas()
    forget = meta[(meta.split == "forget") & (meta.kind == "canary")]
    reps_kind = sorted(forget.repetitions.unique())[-1]
    req_ids = sorted(forget[forget.repetitions == reps_kind].example_id)
    oracle = pd.DataFrame({"example_id": req_ids, f"exposure_{cfg.metrics.exposure}_oracle": np.zeros(len(req_ids))})
    ev = RequestEvaluator(acc, cfg, req_ids, subset, meta, oracle, 0)
    if quick:  # a logic check: the request plus 40 examples of every other (split, kind) group
        m = ev.meta
        keep = [i for i in range(len(m)) if m.example_id[i] in set(req_ids)]
        for _, g in m[~m.example_id.isin(req_ids)].groupby(["split", "kind"]):
            keep += list(g.index[:40])
        keep = sorted(keep)
        ev.data = {c: [v[i] for i in keep] for c, v in ev.data.items()}
        ev.meta = m.iloc[keep].reset_index(drop=True)
    times, score_times = [], []
    for step in range(1, reps + 1):
        before = ev.seconds
        t0 = time.perf_counter()
        ev.evaluate(model, step)
        times.append(time.perf_counter() - t0)
        score_times.append(ev.seconds - before)
    return {"request": f"canary_r{reps_kind}", "examples_scored": len(ev.meta),
            "eval_seconds": C.summary(times), "score_pass_seconds": C.summary(score_times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: prove the script works")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", default=str(C.ROOT / "runs" / "default"), help="a finished default run (read only)")
    ap.add_argument("--no-trainer", action="store_true")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    steps = args.steps or (6 if args.quick else 60)
    warmup = 2 if args.quick else 5
    reps = args.reps or (1 if args.quick else 2)
    C.set_threads(args.threads)

    from unlearnbench.distributed import make_accelerator
    from unlearnbench.unlearn.request import eval_steps

    cfg = C.default_config()
    acc = make_accelerator()
    ds = C.scoring_data(2000)
    forget_rows = list(range(min(320, len(ds))))
    init_state = {k: v.clone() for k, v in C.default_model(cfg.data.vocab_size).state_dict().items()}

    cols = ds.select_columns(["input_ids", "score_start", "score_end"]).to_dict()
    runs = {"project": [], "trainer": []}
    kinds = ["project"] + ([] if args.no_trainer else ["trainer"])
    for rep in range(reps):
        for kind in kinds:  # alternated: A B A B ...
            r = (project_loop(acc, cfg, init_state, ds, forget_rows, steps, warmup) if kind == "project"
                 else trainer_loop(cfg, init_state, cols, forget_rows, steps, warmup))
            runs[kind].append(r)
            print(f"[bench_unlearn] rep {rep} {kind}: {r['steps'] / r['seconds']:.2f} steps/s "
                  f"{r['tokens'] / r['seconds']:.0f} tok/s", flush=True)
    ga = {}
    for kind, rs in runs.items():
        if rs:
            ga[kind] = {"steps_per_s": C.summary([r["steps"] / r["seconds"] for r in rs]),
                        "tokens_per_s": C.summary([r["tokens"] / r["seconds"] for r in rs]), "runs": rs}
    ratios = {}
    if "trainer" in ga:
        ratios["project_vs_trainer_steps_per_s"] = ga["project"]["steps_per_s"]["median"] / ga["trainer"]["steps_per_s"]["median"]
        ratios["project_vs_trainer_tokens_per_s"] = ga["project"]["tokens_per_s"]["median"] / ga["trainer"]["tokens_per_s"]["median"]

    # in-loop evaluation share
    model = C.default_model(cfg.data.vocab_size)
    model.load_state_dict(init_state)
    ev = measured_eval(acc, cfg, model, 1 if args.quick else 2, args.quick)
    sched = eval_steps(cfg)
    t_eval = ev["eval_seconds"]["median"]
    t_step = 1.0 / ga["project"]["steps_per_s"]["median"]
    max_steps = cfg.unlearn.max_steps

    def share(t_ev: float, schedule: list[int], stop: int) -> float:
        """Evaluation share of a request that runs `stop` steps and evaluates at the schedule's steps <= stop."""
        n = sum(1 for s in schedule if s <= stop)
        return n * t_ev / (n * t_ev + stop * t_step)

    projected = {"schedule": sched, "n_evals_full": len(sched), "t_eval_s": t_eval, "t_step_s": t_step,
                 "share_full_100_steps": share(t_eval, sched, max_steps),
                 "share_stop_at_8": share(t_eval, sched, 8), "share_stop_at_30": share(t_eval, sched, 30),
                 "max_evals_for_20pct_over_100_steps": max_steps * t_step / (4 * t_eval)}
    # the same projection for the cheaper settings a user can choose (README: In-loop evaluation)
    sampled_cfg = dataclasses.replace(cfg, unlearn=dataclasses.replace(cfg.unlearn, eval_references=256,
                                                                       eval_utility=128))
    ev_sampled = measured_eval(acc, sampled_cfg, model, 1 if args.quick else 2, args.quick)
    every10 = dataclasses.replace(cfg, unlearn=dataclasses.replace(cfg.unlearn, eval_schedule="every", eval_every=10))

    alternatives = {
        "eval_references=256 eval_utility=128, log schedule": {
            "t_eval_s": ev_sampled["eval_seconds"]["median"], "examples_scored": ev_sampled["examples_scored"],
            "share_full_100_steps": share(ev_sampled["eval_seconds"]["median"], sched, max_steps)},
        "all references, eval_schedule=every eval_every=10": {
            "t_eval_s": t_eval, "share_full_100_steps": share(t_eval, eval_steps(every10), max_steps)},
        "eval_references=256 eval_utility=128, every 10": {
            "share_full_100_steps": share(ev_sampled["eval_seconds"]["median"], eval_steps(every10), max_steps)},
    }
    recorded = recorded_eval_share(Path(args.run_dir))
    eval_share = {"measured": ev, "projected": projected, "alternatives": alternatives,
                  "recorded_runs_default": recorded}
    targets = {}
    if "project_vs_trainer_steps_per_s" in ratios:
        targets["project_vs_trainer >= 1.0"] = ratios["project_vs_trainer_steps_per_s"] >= 1.0
    targets["eval_share_full_schedule <= 0.2"] = projected["share_full_100_steps"] <= 0.2
    if recorded:
        targets["eval_share_recorded_max <= 0.2"] = max(r["eval_share"] for r in recorded) <= 0.2
    body = {"settings": {"steps": steps, "warmup_steps_untimed": warmup, "reps": reps, "batch": cfg.unlearn.batch_size,
                         "optimizer": f"{cfg.unlearn.optimizer} lr {cfg.unlearn.lr}", "forget_pool": len(forget_rows),
                         "threads": torch.get_num_threads(), "model": "default llama, random init",
                         "trainer_max_grad_norm": "1.0 (Trainer default); project: norm computed, no clip (default)"},
            "gradient_ascent": ga, "ratios": ratios, "eval_share": eval_share, "targets_met": targets}
    path = C.write_result("bench_unlearn", body, args.quick, args.out_dir)
    rows = [[k, f"{v['steps_per_s']['median']:.2f}", f"{v['tokens_per_s']['median']:.0f}",
             f"{v['steps_per_s']['spread_pct']:.0f}%"] for k, v in ga.items()]
    print(C.fmt_table(rows, ["loop", "steps/s", "tok/s", "spread"]))
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"eval: {t_eval:.2f}s per evaluation ({ev['examples_scored']} examples), step {t_step * 1e3:.0f} ms; "
          f"share over 100 steps {projected['share_full_100_steps']:.0%} ({len(sched)} evals), "
          f"stop at 8: {projected['share_stop_at_8']:.0%}; recorded: "
          + ", ".join(f"{r['request']} {r['eval_share']:.0%}" for r in recorded))
    print("alternatives (share over 100 steps): "
          + ", ".join(f"{k}: {v['share_full_100_steps']:.0%}" for k, v in alternatives.items()))
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
