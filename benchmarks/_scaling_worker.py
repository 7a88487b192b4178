"""One launch of bench_scaling: N processes (plain python for 1, `accelerate launch` for N > 1), one thread each.

Times `score_pass` over the scoring examples and the project's gradient-ascent step (bench_unlearn.project_loop,
global batch 32 sharded over the processes, DDP all-reduce over gloo), inside the processes, after a warm-up; the
main process writes the numbers to --out.

With --train-run DIR: times the train stage itself (`STAGES["train"].run`, between two barriers) on a prepared
run directory, with the given config overrides (`train.parallel=...`, `score.shadow_models=...`), instead.

With --ceiling-steps N: no process group, no accelerate: N plain training steps (AdamW, batch 32 of 96 random tokens)
of the preset's model from config, one thread, timed; bench_scaling runs one such process alone and two at once to
measure what the machine gives two independent jobs (the ceiling of any job-parallel speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--score-reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--train-run", default=None, help="a prepared run directory: time the train stage there")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--ceiling-steps", type=int, default=0, help="time N plain training steps, no process group")
    ap.add_argument("overrides", nargs="*", help="config overrides for --train-run (key=value)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ceiling_steps:
        return ceiling(args)
    if args.train_run:
        return train_stage(args)

    from bench_unlearn import project_loop
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.scoring import score_pass

    acc = make_accelerator()
    cfg = C.default_config()
    ds = C.scoring_data(args.examples)
    model = C.default_model(cfg.data.vocab_size).eval()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    score_pass(acc, model, ds.select(range(min(128, len(ds)))), cfg.score.batch_size, 0)  # warm-up
    score_s = []
    for _ in range(args.score_reps):
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        _, stats = score_pass(acc, model, ds, cfg.score.batch_size, 0, cfg.data.vocab_size)
        acc.wait_for_everyone()
        score_s.append(time.perf_counter() - t0)
    acc.wait_for_everyone()
    ga = project_loop(acc, cfg, init_state, ds, list(range(min(320, len(ds)))), args.steps, args.warmup)
    # tokens in project_loop are this process's; the global count is the sum over processes
    tokens = int(acc.reduce(torch.tensor(ga["tokens"]), reduction="sum").item())
    if acc.is_main_process:
        with open(args.out, "w") as fh:
            json.dump({"num_processes": acc.num_processes, "threads_per_process": torch.get_num_threads(),
                       "examples": stats.examples, "tokens": stats.tokens, "score_seconds": score_s,
                       "ga_steps": ga["steps"], "ga_seconds": ga["seconds"], "ga_tokens": tokens}, fh)


def ceiling(args) -> None:
    """N training steps of the preset's model on random tokens in this process alone (bench_scaling's ceiling)."""
    from unlearnbench.config import load_config
    from unlearnbench.models import build_model

    cfg = load_config(args.preset)
    model = build_model(cfg, cfg.data.vocab_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg.data.vocab_size, (32, 96), generator=gen)
    for _ in range(3):  # warm-up, untimed
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(args.ceiling_steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with open(args.out, "w") as fh:
        json.dump({"steps": args.ceiling_steps, "seconds": time.perf_counter() - t0,
                   "cpu_seconds": time.process_time() - cpu0, "threads": torch.get_num_threads()}, fh)


def train_stage(args) -> None:
    """Wall time of the train stage on all processes (barrier, stage, barrier), as `unlearnbench train` runs it."""
    from pathlib import Path

    from unlearnbench.config import load_config
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.io import read_json
    from unlearnbench.rundir import Context, contain_writes, resolve_run
    from unlearnbench.stages import STAGES
    from unlearnbench.study import check_config

    run_dir = Path(args.train_run)
    cfg = resolve_run(load_config(args.preset, None, [f"run.dir={run_dir}", "tracking.backend=none", *args.overrides]))
    check_config(cfg)
    contain_writes(run_dir)
    acc = make_accelerator()
    ctx = Context(cfg=cfg, run_dir=run_dir, acc=acc)
    acc.wait_for_everyone()
    t0, cpu0 = time.perf_counter(), time.process_time()
    STAGES["train"].run(ctx)
    cpu = time.process_time() - cpu0  # this process's CPU seconds (all its threads) in the stage
    acc.wait_for_everyone()
    seconds = time.perf_counter() - t0
    cpu_all = acc.gather(torch.tensor([cpu], dtype=torch.float64)).tolist()
    if acc.is_main_process:
        info = read_json(run_dir / "stages" / "train.json")["info"]
        with open(args.out, "w") as fh:
            json.dump({"num_processes": acc.num_processes, "threads_per_process": torch.get_num_threads(),
                       "train_seconds": seconds, "cpu_seconds_per_process": cpu_all, "parallel": info["parallel"],
                       "models": {k: {"process_index": v.get("process_index"), "train_seconds": v["train_seconds"],
                                      "steps": v["steps"]} for k, v in info["models"].items()}}, fh)


if __name__ == "__main__":
    main()
    from unlearnbench.distributed import leave_process_group

    leave_process_group()  # a gloo group left to interpreter shutdown now and then aborts a rank at the very end
