#!/usr/bin/env python3
"""Data-parallel scaling on CPU: 1 process vs 2 processes, one thread each, for scoring and unlearning.

1 process: `python benchmarks/_scaling_worker.py` with OMP_NUM_THREADS=1. 2 processes: `accelerate launch
--config_file accelerate_configs/cpu_ddp.yaml --num_processes 2` with ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 (gloo).
Launches alternate 1, 2, 1, 2, ...; each launch times `score_pass` over 2,000 prepared examples (2 passes) and
20 gradient-ascent steps of global batch 32 (after 5 untimed), inside the processes.
Efficiency = throughput(2) / (2 x throughput(1)). Target: >= 0.8 for scoring.

    python benchmarks/bench_scaling.py           # full settings (about 2.5 minutes on 2 idle cores)
    python benchmarks/bench_scaling.py --quick   # tiny settings: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, out: Path, worker_args: list[str], timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    worker = [str(HERE / "_scaling_worker.py"), "--out", str(out), *worker_args]
    if n == 1:
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
            env.pop(k, None)
        cmd = [sys.executable, *worker]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(C.ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--num_processes", str(n),
               "--main_process_port", str(free_port()), *worker]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=C.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{n}-process launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["launch_seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="launch pairs (1 then 2 processes)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    worker_args = (["--examples", "120", "--score-reps", "1", "--steps", "4", "--warmup", "1"] if args.quick
                   else ["--examples", "2000", "--score-reps", "2", "--steps", "25", "--warmup", "5"])
    C.prepared_dir()  # prepare once here, so the workers only read
    runs = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for n in (1, 2):  # alternated
                res = launch(n, Path(tmp) / f"r{r}_n{n}.json", worker_args, timeout=900)
                runs[n].append(res)
                print(f"[bench_scaling] round {r} n={n}: score {res['tokens'] / min(res['score_seconds']):.0f} tok/s, "
                      f"GA {res['ga_steps'] / res['ga_seconds']:.2f} steps/s (launch {res['launch_seconds']:.0f}s)",
                      flush=True)
    out = {}
    for n, rs in runs.items():
        out[n] = {"score_tokens_per_s": C.summary([r["tokens"] / s for r in rs for s in r["score_seconds"]]),
                  "score_examples_per_s": C.summary([r["examples"] / s for r in rs for s in r["score_seconds"]]),
                  "ga_steps_per_s": C.summary([r["ga_steps"] / r["ga_seconds"] for r in rs]),
                  "ga_tokens_per_s": C.summary([r["ga_tokens"] / r["ga_seconds"] for r in rs]), "launches": rs}
    eff = {"scoring": out[2]["score_tokens_per_s"]["median"] / (2 * out[1]["score_tokens_per_s"]["median"]),
           "unlearning": out[2]["ga_steps_per_s"]["median"] / (2 * out[1]["ga_steps_per_s"]["median"])}
    targets = {"scoring_efficiency >= 0.8": eff["scoring"] >= 0.8}
    body = {"settings": {"rounds": rounds, "worker_args": worker_args, "threads_per_process": 1,
                         "launcher_2": "accelerate launch --config_file accelerate_configs/cpu_ddp.yaml "
                                       "--num_processes 2 (ACCELERATE_USE_CPU=1, gloo)",
                         "model": "default llama, random init", "unlearn_global_batch": 32},
            "processes": {str(k): v for k, v in out.items()}, "efficiency": eff, "targets_met": targets}
    path = C.write_result("bench_scaling", body, args.quick, args.out_dir)
    rows = [[n, f"{v['score_tokens_per_s']['median']:.0f}", f"{v['score_tokens_per_s']['spread_pct']:.0f}%",
             f"{v['ga_steps_per_s']['median']:.2f}", f"{v['ga_steps_per_s']['spread_pct']:.0f}%"] for n, v in out.items()]
    print(C.fmt_table(rows, ["procs", "score tok/s", "spread", "GA steps/s", "spread"]))
    print(f"efficiency: scoring {eff['scoring']:.2f}, unlearning {eff['unlearning']:.2f}")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
