#!/usr/bin/env python3
"""In-loop evaluation share of the unlearn stage, and what the sampled evaluation does to the results.

Takes a run directory whose score stage finished (data/, models/, scores/ and the stage records), and runs the
`unlearn` stage on it once per arm, each in a fresh directory under a work directory (data/, models/ and scores/
symlinked, never written; the prepare/train/score records copied), with the run's own saved config:
  full      unlearn.eval_references=0 unlearn.eval_utility=0: every reference and utility example at every
            evaluation
  sampled   the current defaults of the run's preset (`unlearn.eval_references`, `unlearn.eval_utility`), or the
            settings of each --sampled (repeatable: sampled_1, sampled_2, ...)
Each launch is the way `make run` launches on a CPU machine: `accelerate launch --config_file
accelerate_configs/cpu_ddp.yaml --num_processes 2` with ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 (--processes 1:
one plain process; on a CUDA machine, one process per GPU). The script reads only each request's result.json and
curve.parquet, so it does not depend on how the loop decides to stop.

Per request: the first evaluated step with UQ >= 0.5 / 0.8 / 0.9 in each arm (`metrics.first_crossing`, step 0
excluded) and the crossing interpolated in log(1 + step) (`metrics.crossing.interpolated_crossing`, where that
module exists); |UQ_sampled - UQ_full| at the crossing steps (both runs train the same model step for step, so
their curves compare step by step while both run); the utility drop at the 0.9 crossing; eval share
(eval_seconds / wall_seconds of result.json) and wall seconds. Targets (issue "Throughput", item 2): every
request's eval share <= 30% with the sampled defaults; crossing steps identical or within one evaluation point;
UQ at the crossings within 0.02 of the full evaluation's.

    python benchmarks/bench_eval_share.py --run-dir runs/default     # after `make run`: 2 x the unlearn stage
    python benchmarks/bench_eval_share.py --run-dir runs/default \
        --sampled "unlearn.eval_references=0 unlearn.eval_utility=64" \
        --sampled "unlearn.eval_references=256 unlearn.eval_utility=64"  # several settings against one full run
    python benchmarks/bench_eval_share.py --run-dir /tmp/s --quick   # a smoke run: checks the script works
Writes benchmarks/results/bench_eval_share.json (.quick.json with --quick) and prints a markdown table per arm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

import _common as C

THRESHOLDS = (0.5, 0.8, 0.9)
UQ_TOL = 0.02
SHARE_TARGET = 0.30
LINKED = ("data", "models", "scores")
RECORDS = ("prepare", "train", "score")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return 0


def prepare_arm(run_dir: Path, arm_dir: Path) -> None:
    """A fresh run directory that shares the scored run's inputs: data/, models/, scores/ linked, records copied."""
    if arm_dir.exists():
        shutil.rmtree(arm_dir)
    (arm_dir / "stages").mkdir(parents=True)
    for name in LINKED:
        (arm_dir / name).symlink_to((run_dir / name).resolve(), target_is_directory=True)
    for stage in RECORDS:
        shutil.copy2(run_dir / "stages" / f"{stage}.json", arm_dir / "stages" / f"{stage}.json")


def launch_unlearn(arm_dir: Path, preset: str, config_file: Path, overrides: list[str], processes: int,
                   timeout: float) -> dict:
    """The unlearn stage in `arm_dir`, as `make run` launches it; wall time, exit code and the output's tail."""
    args = ["-m", "unlearnbench", "unlearn", "--preset", preset, "--config", str(config_file),
            f"run.dir={arm_dir}", "tracking.backend=none", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    gpus = _cuda_devices()
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--main_process_port", str(_free_port())]
        if gpus:
            cmd += ["--multi_gpu"] if processes > 1 else []
        else:
            cmd += ["--config_file", str(C.ROOT / "accelerate_configs" / "cpu_ddp.yaml")]
            env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        cmd += args
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=C.ROOT)
    seconds = time.perf_counter() - t0
    (arm_dir / "launch.log").write_text(proc.stdout + "\n" + proc.stderr)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("unlearnbench:")]
    return {"returncode": proc.returncode, "stage_seconds": seconds,
            "output_tail": "\n".join(errors[-5:]) or proc.stderr[-1500:].strip()}


def read_arm(arm_dir: Path) -> dict[str, dict]:
    """Per request: result.json and curve.parquet (steps, UQ, utility drop)."""
    out = {}
    for res_path in sorted((arm_dir / "unlearn").glob("*/result.json")):
        res = json.loads(res_path.read_text())
        curve = pd.read_parquet(res_path.parent / "curve.parquet")
        out[res["request"]] = {"result": res, "steps": curve.step.to_numpy(), "uq": curve.uq.to_numpy(dtype=float),
                               "utility_drop": curve.utility_drop.to_numpy(dtype=float)}
    return out


def _interpolated(steps, uq, t):
    try:
        from unlearnbench.metrics.crossing import interpolated_crossing
    except ImportError:
        return None
    return interpolated_crossing(steps, uq, t)


def crossings(steps: np.ndarray, uq: np.ndarray) -> dict:
    """Grid and interpolated crossing of each threshold (step 0 never counts)."""
    from unlearnbench.metrics import first_crossing

    out = {}
    for t in THRESHOLDS:
        grid = first_crossing(steps[1:], uq[1:], t) if len(steps) > 1 else None
        out[f"{t:g}"] = {"grid": None if grid is None else int(grid), "interpolated": _interpolated(steps, uq, t)}
    return out


def compare(name: str, full: dict, sampled: dict, schedule: list[int]) -> dict:
    """One request's row: crossings in both arms, how far they moved, UQ differences there, shares."""
    rf, rs = full["result"], sampled["result"]
    cf, cs = crossings(full["steps"], full["uq"]), crossings(sampled["steps"], sampled["uq"])
    uq_f = dict(zip(full["steps"].tolist(), full["uq"].tolist()))
    uq_s = dict(zip(sampled["steps"].tolist(), sampled["uq"].tolist()))
    common = sorted(set(uq_f) & set(uq_s))
    moved, duq = {}, {}
    for key in cf:
        a, b = cf[key]["grid"], cs[key]["grid"]
        if a is None and b is None:
            moved[key] = 0
        elif a is None or b is None:
            moved[key] = None  # crossed in one arm only
        else:
            moved[key] = abs(schedule.index(a) - schedule.index(b))
        at = [s for s in {a, b} if s is not None and s in uq_f and s in uq_s]
        duq[key] = max((abs(uq_s[s] - uq_f[s]) for s in at), default=None)
    diffs = [abs(uq_s[s] - uq_f[s]) for s in common]

    def drop_at(arm: dict, step):
        if step is None:
            return None
        hit = np.flatnonzero(arm["steps"] == step)
        return float(arm["utility_drop"][hit[0]]) if hit.size else None

    g9 = f"{max(THRESHOLDS):g}"
    return {
        "request": name, "nothing_to_forget": bool(rf.get("nothing_to_forget", False)),
        "gap_bits": rf.get("exposure_gap_bits"), "status": [rf.get("status"), rs.get("status")],
        "steps_run": [rf.get("steps_run"), rs.get("steps_run")], "crossings_full": cf, "crossings_sampled": cs,
        "moved_eval_points": moved, "uq_diff_at_crossings": duq,
        "uq_diff_max_common_steps": max(diffs) if diffs else None, "common_steps": len(common),
        "utility_drop_at_0.9": [drop_at(full, cf[g9]["grid"]), drop_at(sampled, cs[g9]["grid"])],
        "eval_share": [rf.get("eval_share"), rs.get("eval_share")],
        "wall_seconds": [rf.get("wall_seconds"), rs.get("wall_seconds")],
        "eval_seconds": [rf.get("eval_seconds"), rs.get("eval_seconds")],
        "uq_final_all_sampled": rs.get("uq_final_all"), "uq_final_sampled": rs.get("uq_final"),
        "uq_final_full": rf.get("uq_final"),
        "ok_steps": all(m is not None and m <= 1 for m in moved.values()),
        "ok_uq": all(d is None or d <= UQ_TOL for d in duq.values()),
        "ok_share": rs.get("eval_share") is not None and rs["eval_share"] <= SHARE_TARGET,
    }


def _fmt_step(c: dict) -> str:
    if c["grid"] is None:
        return "–"
    i = c["interpolated"]
    return f"{c['grid']}" + (f" ({i:.1f})" if i is not None and not math.isclose(i, c["grid"]) else "")


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def _num(x, f="{:.2f}") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)


def markdown(rows: list[dict]) -> str:
    head = ("| request | gap (bits) | steps run | UQ ≥ 0.5 at | UQ ≥ 0.8 at | UQ ≥ 0.9 at | max \\|ΔUQ\\| at crossings "
            "| utility drop at 0.9 | eval share | wall s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        cells = [f"{r['request']}" + (" (nothing to forget)" if r["nothing_to_forget"] else ""),
                 _num(r["gap_bits"], "{:.1f}"), f"{r['steps_run'][0]} / {r['steps_run'][1]}"]
        for t in THRESHOLDS:
            k = f"{t:g}"
            a, b = _fmt_step(r["crossings_full"][k]), _fmt_step(r["crossings_sampled"][k])
            cells.append(a if a == b else f"{a} → {b}")
        d = [v for v in r["uq_diff_at_crossings"].values() if v is not None]
        cells.append(_num(max(d), "{:.3f}") if d else "–")
        u = r["utility_drop_at_0.9"]
        cells.append(f"{_num(u[0], '{:+.1%}')} / {_num(u[1], '{:+.1%}')}")
        cells.append(f"{_pct(r['eval_share'][0])} → {_pct(r['eval_share'][1])}")
        cells.append(f"{_num(r['wall_seconds'][0], '{:.1f}')} → {_num(r['wall_seconds'][1], '{:.1f}')}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_of(rows: list[dict]) -> dict:
    """Whether an arm met the issue's targets, over every request and over those with something to forget."""
    memorized = [r for r in rows if not r["nothing_to_forget"]]
    return {
        f"every request's eval share <= {SHARE_TARGET:.0%}": bool(rows) and all(r["ok_share"] for r in rows),
        "crossings identical or within one evaluation point (every request)": all(r["ok_steps"] for r in rows),
        f"UQ at the crossings within {UQ_TOL} (every request)": all(r["ok_uq"] for r in rows),
        "crossings within one evaluation point (requests with something to forget)":
            all(r["ok_steps"] for r in memorized),
        f"UQ at the crossings within {UQ_TOL} (requests with something to forget)": all(r["ok_uq"] for r in memorized),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a run whose score stage finished (read only)")
    ap.add_argument("--work-dir", default=None, help="where the unlearn runs go (default: a new /tmp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--processes", type=int, default=None,
                    help="processes per launch (default: 2 on CPU, as `make run`; one per GPU on CUDA)")
    ap.add_argument("--sampled", action="append", default=None, metavar="'KEY=VALUE ...'",
                    help="a sampled arm's settings, repeatable (default: one arm with the preset's current "
                         "unlearn.eval_references and unlearn.eval_utility)")
    ap.add_argument("--quick", action="store_true", help="a logic check (e.g. on a smoke run): .quick.json")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per launch")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("overrides", nargs="*", help="extra key=value for every arm, e.g. unlearn.request_kinds=[canary]")
    args = ap.parse_args()

    from unlearnbench.config import load_config
    from unlearnbench.unlearn.request import eval_steps

    run_dir = Path(args.run_dir).resolve()
    needed = [*LINKED, *(f"stages/{s}.json" for s in RECORDS), "config.yaml"]
    missing = [p for p in needed if not (run_dir / p).exists()]
    if missing:
        sys.exit(f"{run_dir} is not a run whose score stage finished: missing {', '.join(missing)}")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["config"]
    preset = saved.get("preset") or "default"
    for key in ("dir", "name"):
        saved.get("run", {}).pop(key, None)
    defaults = load_config(preset).unlearn
    sampled = [a.split() for a in args.sampled] if args.sampled else [
        [f"unlearn.eval_references={defaults.eval_references}", f"unlearn.eval_utility={defaults.eval_utility}"]]
    arms = {"full": ["unlearn.eval_references=0", "unlearn.eval_utility=0"]}
    arms.update({("sampled" if len(sampled) == 1 else f"sampled_{i + 1}"): a for i, a in enumerate(sampled)})
    processes = args.processes or (_cuda_devices() or 2)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_eval_share_"))
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "run_config.yaml"
    config_file.write_text(yaml.safe_dump(saved, sort_keys=False))
    launches, data = {}, {}
    try:
        for arm, arm_overrides in arms.items():
            arm_dir = work / arm
            prepare_arm(run_dir, arm_dir)
            print(f"[bench_eval_share] {arm}: unlearn stage with {' '.join(arm_overrides + args.overrides)} "
                  f"({processes} process(es))", flush=True)
            launches[arm] = launch_unlearn(arm_dir, preset, config_file, arm_overrides + args.overrides, processes,
                                           args.timeout)
            data[arm] = read_arm(arm_dir)
            lr = launches[arm]
            print(f"[bench_eval_share] {arm}: {lr['stage_seconds']:.1f} s, exit {lr['returncode']}, "
                  f"{len(data[arm])} request(s) finished", flush=True)
            if not data[arm]:
                sys.exit(f"the {arm} unlearn stage finished no request:\n{lr['output_tail']}")
            if lr["returncode"]:  # e.g. the stage's summary failed after every request wrote its files
                print(f"[bench_eval_share] warning: {arm} exited {lr['returncode']}; its results are read anyway:\n"
                      f"{lr['output_tail'][-800:]}", flush=True)
        schedule = eval_steps(load_config(preset, str(config_file), [f"run.dir={work / 'full'}", *args.overrides]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def share_total(arm: str) -> float | None:
        res = [d["result"] for d in data[arm].values()]
        wall = sum(r.get("wall_seconds") or 0.0 for r in res)
        return sum(r.get("eval_seconds") or 0.0 for r in res) / wall if wall else None

    results = {}
    for arm in arms:
        names = sorted(set(data["full"]) & set(data[arm]))
        rows = [compare(n, data["full"][n], data[arm][n], schedule) for n in names] if arm != "full" else []
        # a request with nothing to forget runs no step: its step-0 check is all evaluation, and says nothing
        shares = [d["result"].get("eval_share") for d in data[arm].values() if (d["result"].get("steps_run") or 0) > 0]
        launch = {k: v for k, v in launches[arm].items() if k != "output_tail"}
        results[arm] = {"overrides": arms[arm], "launch": launch,
                        "eval_share_all_requests": share_total(arm),
                        "eval_share_max": max((x for x in shares if x is not None), default=None),
                        "requests": rows, "targets_met": targets_of(rows) if arm != "full" else None}
    first = next(a for a in arms if a != "full")
    body = {"settings": {"run_dir": C.portable_path(run_dir), "preset": preset, "processes": processes,
                         "extra_overrides": args.overrides, "schedule": schedule, "uq_tolerance": UQ_TOL,
                         "share_target": SHARE_TARGET},
            "arms": results, "targets_met": results[first]["targets_met"]}
    # the recorded command names paths as result files do (no absolute path of this machine)
    sys.argv[1:] = [C.portable_path(a) if os.path.isabs(a) else a for a in sys.argv[1:]]
    path = C.write_result("bench_eval_share", body, args.quick, args.out_dir)
    for arm, res in results.items():
        if arm == "full":
            continue
        print(f"\n### {arm}: {' '.join(res['overrides'])} vs full evaluation\n")
        print(markdown(res["requests"]))
        print(f"\nunlearn stage: full {launches['full']['stage_seconds']:.0f} s, {arm} "
              f"{launches[arm]['stage_seconds']:.0f} s; eval share over all requests: full "
              f"{_pct(share_total('full'))}, {arm} {_pct(share_total(arm))}; largest per request that ran steps: full "
              f"{_pct(results['full']['eval_share_max'])}, {arm} {_pct(res['eval_share_max'])}")
        print("targets: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in res["targets_met"].items()))
    print(f"wrote {C.portable_path(path)}")


if __name__ == "__main__":
    main()
