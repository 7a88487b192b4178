#!/usr/bin/env python3
"""Wall time and peak memory of every stage of a study: prepare, train, score, unlearn, report.

Two sources, both written to benchmarks/results/bench_study.json:
  --run        runs each stage as its own launch, exactly as `make run` launches the study on a CPU machine
               (ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/cpu_ddp.yaml
               -m unlearnbench <stage> --preset P run.dir=<tmp>), in a fresh run directory under /tmp; wall time of
               each launch, and peak RSS sampled every 0.2 s with psutil over the launcher's whole process tree
               (sum over processes, and the largest single process), next to what the stage recorded itself
               (stages/<stage>.json: its seconds and the main process's max RSS).
  --from DIR   reads the stage records of an existing run (read only): per-stage wall time from the differences
               of `finished_at` (so it includes any gap between separately launched stages), and the records' info.
`make bench` (run_all.py) reads runs/default when it holds a finished default study and runs the `smoke` study
live (well under a minute); the `default` study itself takes ~15 minutes on 2 cores:
    python benchmarks/bench_study.py --run --preset default     # the full measurement (~15 min)
    python benchmarks/bench_study.py --run --preset smoke       # quick
    python benchmarks/bench_study.py --from runs/default
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

import _common as C

from unlearnbench.stages import STAGES  # noqa: E402  (the project's one table of stages, in order)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TreeRSS(threading.Thread):
    """Samples the RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_total = 0
        self.peak_single = 0
        self.max_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            total, n = 0, 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                n += 1
                self.peak_single = max(self.peak_single, rss)
            self.peak_total = max(self.peak_total, total)
            self.max_procs = max(self.max_procs, n)
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def run_stage(stage: str, preset: str, run_dir: Path, nproc: int, extra: list[str], log) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(C.ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--num_processes", str(nproc),
           "--main_process_port", str(_free_port()), "-m", "unlearnbench", stage, "--preset", preset,
           f"run.dir={run_dir}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=C.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    mon = TreeRSS(proc.pid)
    mon.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    mon.stop()
    if rc != 0:
        raise RuntimeError(f"stage {stage} failed with exit code {rc}; see the log {log.name}")
    rec = run_dir / "stages" / f"{stage}.json"
    info = json.loads(rec.read_text()).get("info", {}) if rec.exists() else {}
    return {"wall_seconds": wall, "peak_rss_tree_mib": mon.peak_total / 2**20,
            "peak_rss_largest_process_mib": mon.peak_single / 2**20, "processes_seen": mon.max_procs,
            "recorded": _record_summary(stage, info)}


COST_KEYS = ("seconds", "device_seconds", "peak_memory_mib", "flops")
REQUEST_KEYS = ("request", "steps_run", "status", "outcome", "wall_seconds", "eval_seconds", "flops", "device_seconds",
                "peak_memory_mib")


def _record_summary(stage: str, info: dict) -> dict:
    """What a stage recorded about its own cost (stages/<stage>.json `info`): wall and device seconds, peak memory,
    estimated FLOPs where the stage counts them, and the stage's own breakdown."""
    out = {"cpu_max_rss_mib_main_process": info.get("cpu_max_rss_mib"),
           **{k: info.get(k) for k in COST_KEYS if info.get(k) is not None}}
    if stage == "prepare":
        out["seconds"] = info.get("seconds")
    elif stage == "train":
        out["train_seconds"] = {k: v.get("train_seconds") for k, v in info.get("models", {}).items()}
    elif stage == "score":
        out["pass_seconds"] = {k: v.get("seconds") for k, v in info.get("passes", {}).items()}
    elif stage == "unlearn":
        out["requests"] = info.get("requests")
    return out


def from_records(run_dir: Path) -> dict:
    stages, prev = {}, None
    for stage in STAGES:
        p = run_dir / "stages" / f"{stage}.json"
        if not p.exists():
            stages[stage] = None
            continue
        rec = json.loads(p.read_text())
        end = dt.datetime.strptime(rec["finished_at"], "%Y-%m-%dT%H:%M:%S%z")
        info = rec.get("info", {})
        wall = (end - prev).total_seconds() if prev is not None else info.get("seconds")
        stages[stage] = {"wall_seconds_from_finished_at": wall, "finished_at": rec["finished_at"],
                         "recorded": _record_summary(stage, info)}
        prev = end
    done = [s for s in STAGES if stages[s]]
    total = sum(v["wall_seconds_from_finished_at"] or 0 for v in stages.values() if v)
    return {"run_dir": C.portable_path(run_dir), "stages_finished": done, "stages": stages, "total_wall_seconds": total,
            "unlearn_requests": request_costs(run_dir), "per_request": per_request_totals(run_dir)}


def request_costs(run_dir: Path) -> list[dict]:
    """Every unlearning request's cost as its result.json records it (FLOPs estimated by the request itself)."""
    return [{k: r.get(k) for k in REQUEST_KEYS}
            for r in (json.loads(p.read_text()) for p in sorted(run_dir.glob("unlearn/*/result.json")))]


def per_request_totals(run_dir: Path) -> dict:
    """Sums and means over the requests, and per (kind, repetitions): what predicts a larger run's unlearning cost
    (a `paper` run has more requests of the same kinds; its cost scales with their number and steps)."""
    reqs = [r for r in request_costs(run_dir) if r.get("wall_seconds") is not None]
    if not reqs:
        return {}

    def agg(rows: list[dict]) -> dict:
        out = {"requests": len(rows), "steps_run": sum(r.get("steps_run") or 0 for r in rows)}
        for k in ("wall_seconds", "eval_seconds", "flops", "device_seconds"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            if vals:
                out[f"{k}_total"] = float(sum(vals))
                out[f"{k}_mean"] = float(sum(vals) / len(vals))
        peaks = [r["peak_memory_mib"] for r in rows if r.get("peak_memory_mib") is not None]
        if peaks:
            out["peak_memory_mib_max"] = float(max(peaks))
        if out.get("device_seconds_total") and out["steps_run"]:
            out["device_seconds_per_step"] = out["device_seconds_total"] / out["steps_run"]
        return out

    groups: dict[str, list[dict]] = {}
    for r in reqs:
        groups.setdefault(r["request"].rsplit("_g", 1)[0], []).append(r)
    return {"all": agg(reqs), "by_group": {k: agg(v) for k, v in sorted(groups.items())}}


def _print_requests(per_request: dict) -> None:
    if not per_request:
        return
    rows = [[k, v["requests"], v["steps_run"], f"{v.get('wall_seconds_total', 0):.1f}",
             f"{v.get('eval_seconds_total', 0) / max(v.get('wall_seconds_total', 0), 1e-9):.0%}",
             f"{v.get('flops_total', 0):.3g}", f"{v.get('device_seconds_per_step', float('nan')):.2f}",
             f"{v.get('peak_memory_mib_max', float('nan')):.0f}"]
            for k, v in [*per_request["by_group"].items(), ("all", per_request["all"])]]
    print(C.fmt_table(rows, ["requests of", "n", "steps", "wall s", "eval share", "FLOPs (est.)",
                             "device s/step", "peak MiB"]))


def live(preset: str, nproc: int, extra: list[str], keep: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"unlearnbench_study_{preset}_", dir=C.CACHE if C.CACHE.exists() else None))
    log_path = run_dir.parent / f"{run_dir.name}.log"
    stages, per_request = {}, {}
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            for stage in STAGES:
                stages[stage] = run_stage(stage, preset, run_dir, nproc, extra, log)
                s = stages[stage]
                print(f"[bench_study] {preset} {stage:8s} {s['wall_seconds']:7.1f}s  peak RSS tree "
                      f"{s['peak_rss_tree_mib']:7.0f} MiB (largest process {s['peak_rss_largest_process_mib']:.0f})",
                      flush=True)
            per_request = per_request_totals(run_dir)  # before the directory goes
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return {"preset": preset, "num_processes": nproc, "overrides": extra,
            "per_request": per_request,
            "run_dir": C.portable_path(run_dir) if keep else None, "log": C.portable_path(log_path), "stages": stages, "total_wall_seconds": time.perf_counter() - t0,
            "peak_rss_tree_mib": max(s["peak_rss_tree_mib"] for s in stages.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="store_true", help="run the study's stages live in a /tmp run directory")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--from", dest="from_dir", default=None, help="read the stage records of this run (read only)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the live run directory")
    ap.add_argument("--quick", action="store_true", help="the smoke study with tiny overrides")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value for --run")
    args = ap.parse_args()
    if not args.run and not args.from_dir and not args.quick:
        ap.error("give --run, --from DIR or --quick")
    body = {}
    if args.from_dir:
        rec = from_records(Path(args.from_dir))
        body["recorded"] = rec
        for stage, v in rec["stages"].items():
            if v:
                print(f"[bench_study] recorded {stage:8s} {_num(v['wall_seconds_from_finished_at']):7.1f}s  "
                      f"main-process max RSS {v['recorded']['cpu_max_rss_mib_main_process']} MiB", flush=True)
            else:
                print(f"[bench_study] recorded {stage:8s} not finished in {args.from_dir}")
        _print_requests(rec["per_request"])
    if args.run or args.quick:
        preset = "smoke" if args.quick else args.preset
        extra = list(args.overrides)
        if args.quick:
            extra += ["train.steps=20", "unlearn.max_steps=2", "unlearn.request_kinds=[canary]"]
        body["live"] = live(preset, args.processes, extra, args.keep)
    path = C.write_result("bench_study", body, args.quick, args.out_dir)
    if "live" in body:
        rows = [[k, f"{v['wall_seconds']:.1f}", f"{v['peak_rss_tree_mib']:.0f}", f"{v['peak_rss_largest_process_mib']:.0f}",
                 v["recorded"]["cpu_max_rss_mib_main_process"] and f"{v['recorded']['cpu_max_rss_mib_main_process']:.0f}"]
                for k, v in body["live"]["stages"].items()]
        print(f"live study: preset {body['live']['preset']}, {body['live']['num_processes']} processes")
        print(C.fmt_table(rows, ["stage", "wall s", "peak RSS tree MiB", "largest proc MiB", "recorded main MiB"]))
        _print_requests(body["live"]["per_request"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
