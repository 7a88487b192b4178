"""One launch of bench_scaling: N processes (plain python for 1, `accelerate launch` for N > 1), one thread each.

Times `score_pass` over the scoring examples and the project's gradient-ascent step (bench_unlearn.project_loop,
global batch 32 sharded over the processes, DDP all-reduce over gloo), inside the processes, after a warm-up; the
main process writes the numbers to --out.
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
    args = ap.parse_args()
    torch.set_num_threads(1)

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


if __name__ == "__main__":
    main()
