#!/usr/bin/env python3
"""Scaling on CPU: 1 process vs 2 processes, one thread each, for scoring and unlearning; job-parallel training.

1 process: `python benchmarks/_scaling_worker.py` with OMP_NUM_THREADS=1. 2 processes: `accelerate launch
--config_file accelerate_configs/cpu_ddp.yaml --num_processes 2` with ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 (gloo).
Launches alternate 1, 2, 1, 2, ...; each launch times `score_pass` over 2,000 prepared examples (2 passes) and
20 gradient-ascent steps of global batch 32 (after 5 untimed), inside the processes.
Efficiency = throughput(2) / (2 x throughput(1)). Target: >= 0.8 for scoring.

Training (part `train`): the wall time of the train stage (between two barriers, inside the processes) on a
freshly prepared `default` run directory, with the `default` model and batch and `train.steps=150`:
  (1) original + oracle on 2 processes: data-parallel (`train.parallel=data`, DDP) vs job-parallel
      (`train.parallel=jobs`: each process trains one model alone). Target: job-parallel >= 1.5x.
  (2) 4 shadow models only (original and oracle already trained in the run directory, so the stage skips them):
      1 process training them in turn vs 2 processes job-parallel (2 each). Target: >= 1.8x.
Launches alternate within each round (data, models / 1, 2), and the order flips every round; the load average
is recorded before and after every launch (the targets assume an otherwise idle machine).
  (3) the machine's ceiling for any job-parallel speed-up: the same fixed training work (plain steps of the model,
      one thread, no process group, no accelerate) in one process alone vs two independent processes at once;
      speed-up = 2 x (one alone) / (two at once), 2.0 on two cores that do not slow each other down.

    python benchmarks/bench_scaling.py                 # full settings (about 10 minutes on 2 idle cores)
    python benchmarks/bench_scaling.py --parts train   # only training; keeps the file's scoring/unlearning numbers
    python benchmarks/bench_scaling.py --quick         # tiny settings: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
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


QUIET = {"max_load": None, "max_wait_s": 300.0}


def wait_for_quiet() -> dict:
    """With --max-load: wait (at most --max-wait s) until the 1-minute load average is at most max_load; the
    machine may be shared, and the previous launch's own processes take a minute to leave the average."""
    if QUIET["max_load"] is None:
        return {}
    t0 = time.perf_counter()
    while os.getloadavg()[0] > QUIET["max_load"] and time.perf_counter() - t0 < QUIET["max_wait_s"]:
        time.sleep(2)
    return {"waited_s": time.perf_counter() - t0, "quiet": os.getloadavg()[0] <= QUIET["max_load"]}


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
    quiet = wait_for_quiet()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=C.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{n}-process launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["launch_seconds"] = time.perf_counter() - t0
    res["load_1min_before"], res["load_1min_after"] = load_before, os.getloadavg()[0]
    res.update(quiet)
    return res


TRAIN_TARGETS = {"original_oracle": 1.5, "shadows": 1.8}


def prepare_run(run_dir: Path, preset: str) -> None:
    """The prepare stage, once, in one process: every train launch copies this run directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "unlearnbench", "prepare", "--preset", preset, f"run.dir={run_dir}",
                           "tracking.backend=none"], cwd=C.ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def train_launch(n: int, base: Path, dest: Path, out: Path, preset: str, overrides: list[str], timeout: float) -> dict:
    """One timed train stage on a copy of `base` with n processes x 1 thread."""
    shutil.copytree(base, dest)
    res = launch(n, out, ["--train-run", str(dest), "--preset", preset, *overrides], timeout)
    res["overrides"] = overrides
    return res


def measure_ceiling(tmp: Path, rounds: int, quick: bool) -> dict:
    """One process alone vs two independent processes at once, the same fixed work each (module docstring (3))."""
    preset, steps = ("smoke", 5) if quick else ("default", 60)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(k, None)

    def start(out: Path):
        return subprocess.Popen([sys.executable, str(HERE / "_scaling_worker.py"), "--out", str(out), "--preset",
                                 preset, "--ceiling-steps", str(steps)], cwd=C.ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(procs, outs) -> list[dict]:
        for p in procs:
            _, err = p.communicate(timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"ceiling worker failed ({p.returncode}):\n{err[-3000:]}")
        return [json.loads(o.read_text()) for o in outs]

    alone, together = [], []
    for r in range(rounds):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            wait_for_quiet()
            outs = [tmp / f"ceiling_r{r}_n{n}_{i}.json" for i in range(n)]
            res = finish([start(o) for o in outs], outs)
            # timed inside each process (after its warm-up): two at once finish when the slower one does
            (alone if n == 1 else together).append(max(x["seconds"] for x in res))
            print(f"[bench_scaling] ceiling round {r}: {n} independent process(es) x {steps} steps: "
                  f"{max(x['seconds'] for x in res):.1f}s", flush=True)
    one, two = C.summary(alone), C.summary(together)
    return {"settings": {"preset": preset, "steps": steps, "batch": "32 x 96 random tokens", "rounds": rounds,
                         "threads_per_process": 1},
            "one_alone_seconds": one, "two_at_once_seconds": two,
            "speedup": 2 * one["median"] / two["median"]}


def measure_training(tmp: Path, rounds: int, quick: bool) -> dict:
    preset, steps, k = ("smoke", 4, 2) if quick else ("default", 150, 4)
    common = [f"train.steps={steps}", "train.checkpoint_every=100", "train.log_every=50"]
    base = tmp / "prepared"
    prepare_run(base, preset)
    # the result files name job-parallel `models` (the value's name before 0.2.0); the config value is `jobs`
    pair = {"data": [], "models": []}
    value = {"data": "data", "models": "jobs"}
    shadows = {1: [], 2: []}
    shadow_base = tmp / "shadow_base"
    for r in range(rounds):
        for mode in (("data", "models") if r % 2 == 0 else ("models", "data")):
            dest = tmp / f"pair_r{r}_{mode}"
            res = train_launch(2, base, dest, tmp / f"pair_r{r}_{mode}.json", preset,
                               common + [f"train.parallel={value[mode]}"], timeout=1800)
            assert res["parallel"] == value[mode], res
            pair[mode].append(res)
            print(f"[bench_scaling] train round {r} original+oracle 2 processes {mode}: {res['train_seconds']:.1f}s, "
                  f"CPU {sum(res['cpu_seconds_per_process']):.0f}s (load {res['load_1min_before']:.1f} -> "
                  f"{res['load_1min_after']:.1f})", flush=True)
            if not shadow_base.exists():  # original and oracle trained: the shadow measurement trains only shadows
                shutil.copytree(dest, shadow_base)
                (shadow_base / "stages" / "train.json").unlink()
            shutil.rmtree(dest)
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            dest = tmp / f"shadows_r{r}_n{n}"
            res = train_launch(n, shadow_base, dest, tmp / f"shadows_r{r}_n{n}.json", preset,
                               common + [f"score.shadow_models={k}"], timeout=3600)
            assert sorted(res["models"]) == [f"shadow_{j}" for j in range(k)], res["models"]  # shadows only
            assert res["parallel"] == ("jobs" if n == 2 else "data"), res
            shadows[n].append(res)
            print(f"[bench_scaling] train round {r} {k} shadow models, {n} process(es): {res['train_seconds']:.1f}s, "
                  f"CPU {sum(res['cpu_seconds_per_process']):.0f}s (load {res['load_1min_before']:.1f} -> "
                  f"{res['load_1min_after']:.1f})", flush=True)
            shutil.rmtree(dest)

    def secs(rs):
        return C.summary([x["train_seconds"] for x in rs])

    def cpu(rs):  # CPU seconds of all processes together: the work, whatever the machine's other load
        return C.summary([sum(x["cpu_seconds_per_process"]) for x in rs])

    def paired(slow, fast):  # per round: the two launches of one round, next to each other in time
        return [a["train_seconds"] / b["train_seconds"] for a, b in zip(slow, fast)]

    ratios = {"original_oracle_models_vs_data": secs(pair["data"])["median"] / secs(pair["models"])["median"],
              "shadows_2proc_models_vs_1proc": secs(shadows[1])["median"] / secs(shadows[2])["median"]}
    loads = [x[key] for rs in (*pair.values(), *shadows.values()) for x in rs
             for key in ("load_1min_before", "load_1min_after")]
    return {
        "settings": {"preset": preset, "model": f"{preset} llama from config", "steps": steps, "shadow_models": k,
                     "batch_size": "preset's train.batch_size (effective, whatever the process count)",
                     "overrides": common, "rounds": rounds, "threads_per_process": 1, "quiet": dict(QUIET),
                     "timed": "STAGES['train'].run between two barriers, inside the processes (no launch start-up)",
                     "shadows_measured": "only the K shadow models: original and oracle already in the run directory"},
        "original_oracle": {"data_seconds": secs(pair["data"]), "models_seconds": secs(pair["models"]),
                            "data_cpu_seconds": cpu(pair["data"]), "models_cpu_seconds": cpu(pair["models"]),
                            "paired_ratios": paired(pair["data"], pair["models"]), "launches": pair},
        "shadows": {"one_process_seconds": secs(shadows[1]), "two_processes_models_seconds": secs(shadows[2]),
                    "one_process_cpu_seconds": cpu(shadows[1]), "two_processes_models_cpu_seconds": cpu(shadows[2]),
                    "paired_ratios": paired(shadows[1], shadows[2]),
                    "launches": {str(n): v for n, v in shadows.items()}},
        "ratios": ratios,
        "load_1min": {"min": min(loads), "max": max(loads), "median": statistics.median(loads),
                      "taken_under_load": max(loads) > 2.5},
        "targets_met": {f"job_parallel_{name} >= {t}": ratios[key] >= t for (name, t), key in
                        zip(TRAIN_TARGETS.items(), ratios)},
    }


def measure_processes(tmp: Path, rounds: int, quick: bool) -> dict:
    worker_args = (["--examples", "120", "--score-reps", "1", "--steps", "4", "--warmup", "1"] if quick
                   else ["--examples", "2000", "--score-reps", "2", "--steps", "25", "--warmup", "5"])
    C.prepared_dir()  # prepare once here, so the workers only read
    runs = {1: [], 2: []}
    for r in range(rounds):
        for n in (1, 2):  # alternated
            res = launch(n, tmp / f"r{r}_n{n}.json", worker_args, timeout=900)
            runs[n].append(res)
            print(f"[bench_scaling] round {r} n={n}: score {res['tokens'] / min(res['score_seconds']):.0f} tok/s, "
                  f"GA {res['ga_steps'] / res['ga_seconds']:.2f} steps/s (launch {res['launch_seconds']:.0f}s, "
                  f"load {res['load_1min_before']:.1f})", flush=True)
    out = {}
    for n, rs in runs.items():
        out[n] = {"score_tokens_per_s": C.summary([r["tokens"] / s for r in rs for s in r["score_seconds"]]),
                  "score_examples_per_s": C.summary([r["examples"] / s for r in rs for s in r["score_seconds"]]),
                  "ga_steps_per_s": C.summary([r["ga_steps"] / r["ga_seconds"] for r in rs]),
                  "ga_tokens_per_s": C.summary([r["ga_tokens"] / r["ga_seconds"] for r in rs]), "launches": rs}
    eff = {"scoring": out[2]["score_tokens_per_s"]["median"] / (2 * out[1]["score_tokens_per_s"]["median"]),
           "unlearning": out[2]["ga_steps_per_s"]["median"] / (2 * out[1]["ga_steps_per_s"]["median"])}
    return {"settings": {"rounds": rounds, "worker_args": worker_args, "threads_per_process": 1,
                         "launcher_2": "accelerate launch --config_file accelerate_configs/cpu_ddp.yaml "
                                       "--num_processes 2 (ACCELERATE_USE_CPU=1, gloo)",
                         "model": "default llama, random init", "unlearn_global_batch": 32},
            "processes": {str(k): v for k, v in out.items()}, "efficiency": eff,
            "targets_met": {"scoring_efficiency >= 0.8": eff["scoring"] >= 0.8}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="launch pairs (1 then 2 processes)")
    ap.add_argument("--train-rounds", type=int, default=None, help="rounds of the training measurement")
    ap.add_argument("--parts", nargs="+", choices=["processes", "train"], default=["processes", "train"],
                    help="what to measure; a part left out keeps its numbers from the existing result file")
    ap.add_argument("--max-load", type=float, default=None,
                    help="before each launch, wait until the 1-minute load average is at most this (shared machines)")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for --max-load at most")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    QUIET.update(max_load=args.max_load, max_wait_s=args.max_wait)
    rounds = args.rounds or (1 if args.quick else 2)
    train_rounds = args.train_rounds or (1 if args.quick else 2)
    out_dir = Path(args.out_dir) if args.out_dir else C.RESULTS
    previous_path = out_dir / f"bench_scaling{'.quick' if args.quick else ''}.json"
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else {}
    body = {k: previous[k] for k in ("settings", "processes", "efficiency", "train") if k in previous}
    targets = dict(previous.get("targets_met", {}))
    with tempfile.TemporaryDirectory() as tmp:
        if "processes" in args.parts:
            proc = measure_processes(Path(tmp), rounds, args.quick)
            targets.update(proc.pop("targets_met"))
            body.update(proc)
        if "train" in args.parts:
            body["train"] = measure_training(Path(tmp), train_rounds, args.quick)
            targets.update(body["train"]["targets_met"])
            body["train"]["ceiling"] = measure_ceiling(Path(tmp), train_rounds, args.quick)
    body["targets_met"] = targets
    body["parts_measured_this_run"] = args.parts
    kept = [part for part in ("processes", "train") if part not in args.parts and (part in body)]
    if kept:  # numbers carried over from the previous file: say from when and which machine state
        older = previous.get("kept_from_previous", {})
        body["kept_from_previous"] = {part: older.get(part) or {"date": previous.get("date"),
                                                                "machine": previous.get("machine")} for part in kept}
    path = C.write_result("bench_scaling", body, args.quick, args.out_dir)
    if "processes" in body:
        out, eff = body["processes"], body["efficiency"]
        rows = [[n, f"{v['score_tokens_per_s']['median']:.0f}", f"{v['score_tokens_per_s']['spread_pct']:.0f}%",
                 f"{v['ga_steps_per_s']['median']:.2f}", f"{v['ga_steps_per_s']['spread_pct']:.0f}%"]
                for n, v in out.items()]
        print(C.fmt_table(rows, ["procs", "score tok/s", "spread", "GA steps/s", "spread"]))
        print(f"efficiency: scoring {eff['scoring']:.2f}, unlearning {eff['unlearning']:.2f}")
    if "train" in body:
        tr = body["train"]
        oo, sh = tr["original_oracle"], tr["shadows"]
        rows = [["original+oracle, 2 procs, data (DDP)", f"{oo['data_seconds']['median']:.1f}",
                 f"{oo['data_seconds']['spread_pct']:.0f}%"],
                ["original+oracle, 2 procs, models", f"{oo['models_seconds']['median']:.1f}",
                 f"{oo['models_seconds']['spread_pct']:.0f}%"],
                [f"{tr['settings']['shadow_models']} shadows, 1 proc", f"{sh['one_process_seconds']['median']:.1f}",
                 f"{sh['one_process_seconds']['spread_pct']:.0f}%"],
                [f"{tr['settings']['shadow_models']} shadows, 2 procs, models",
                 f"{sh['two_processes_models_seconds']['median']:.1f}",
                 f"{sh['two_processes_models_seconds']['spread_pct']:.0f}%"]]
        print(C.fmt_table(rows, ["train stage", "median s", "spread"]))
        print(f"job-parallel: original+oracle {tr['ratios']['original_oracle_models_vs_data']:.2f}x data-parallel, "
              f"shadows {tr['ratios']['shadows_2proc_models_vs_1proc']:.2f}x one process; load average (1 min) "
              f"{tr['load_1min']['min']:.1f}-{tr['load_1min']['max']:.1f}")
        if "ceiling" in tr:
            print(f"the machine's ceiling: two independent processes finish the same work "
                  f"{tr['ceiling']['speedup']:.2f}x faster than one after the other")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
