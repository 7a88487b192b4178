#!/usr/bin/env python3
"""`make bench`: the CPU benchmarks 1-4 with their full settings, one after another, each in its own process.

    python benchmarks/run_all.py               # full settings, <= 10 minutes on 2 idle cores
    python benchmarks/run_all.py --quick       # tiny settings: checks every script works (results/*.quick.json)
    python benchmarks/run_all.py --with-study  # also runs the `default` study live (adds ~15 minutes)
    python benchmarks/run_all.py --only scoring unlearn

Writes benchmarks/results/<name>.json for each benchmark and benchmarks/results/summary.md, the table that
benchmarks/README.md shows. Run it on a quiet machine: the numbers are wall-clock throughputs and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent


def _study_args(quick: bool, with_study: bool) -> list[str]:
    if quick:
        return ["--quick"]
    args = []
    default_run = C.ROOT / "runs" / "default"
    if (default_run / "stages" / "unlearn.json").exists():
        args += ["--from", str(default_run)]
    args += ["--run", "--preset", "default" if with_study else "smoke"]
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--with-study", action="store_true", help="run the default study live (~15 min more)")
    ap.add_argument("--only", nargs="+", choices=["scoring", "unlearn", "scaling", "study"], default=None)
    args = ap.parse_args()
    benches = {"scoring": ["bench_scoring.py"], "unlearn": ["bench_unlearn.py"], "scaling": ["bench_scaling.py"],
               "study": ["bench_study.py", *_study_args(args.quick, args.with_study)]}
    if args.quick:
        for k in ("scoring", "unlearn", "scaling"):
            benches[k].append("--quick")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"[run_all] warning: load average {load[0]:.1f} on {os.cpu_count()} cores: the machine is busy and the "
              "timings will be contaminated", flush=True)
    C.prepared_dir()
    timings, failed = {}, []
    t_all = time.perf_counter()
    for name, cmd in benches.items():
        if args.only and name not in args.only:
            continue
        print(f"[run_all] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=C.ROOT)
        timings[name] = time.perf_counter() - t0
        print(f"[run_all] {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {timings[name]:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    total = time.perf_counter() - t_all
    md = summary_markdown(args.quick)
    suffix = ".quick" if args.quick else ""
    (C.RESULTS / f"summary{suffix}.md").write_text(md)
    print(md)
    print(f"[run_all] total {total:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})"
          + ("" if total <= 600 or args.with_study else " -- over the 10-minute budget"))
    if failed:
        sys.exit(f"[run_all] failed: {', '.join(failed)}")


def _load(name: str, quick: bool) -> dict | None:
    p = C.RESULTS / f"{name}{'.quick' if quick else ''}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _ok(v: bool) -> str:
    return "met" if v else "**missed**"


def summary_markdown(quick: bool) -> str:
    """The results table of benchmarks/README.md, from the result files."""
    lines = []
    sc, un, sca, st = (_load(n, quick) for n in ("bench_scoring", "bench_unlearn", "bench_scaling", "bench_study"))
    ref = next((r for r in (sc, un, sca, st) if r), None)
    if ref:
        m, v = ref["machine"], ref["versions"]
        lines += [f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, {m['platform']}; "
                  f"load average at start {m.get('load_average_at_start')}",
                  f"Versions: python {m['python']}, " + ", ".join(f"{k} {x}" for k, x in v.items() if x),
                  f"Date: {ref['date']}; command: `make bench` (python benchmarks/run_all.py{' --quick' if quick else ''})",
                  ""]
    if sc:
        lines += ["| scoring variant | examples/s | tokens/s | median s | spread | padding |", "|---|---|---|---|---|---|"]
        for k, x in sc["variants"].items():
            lines.append(f"| {k} | {x['examples_per_s']:.0f} | {x['tokens_per_s']:.0f} | {x['seconds']['median']:.2f} | "
                         f"{x['seconds']['spread_pct']:.0f}% | {x.get('padding_fraction', 0):.1%} |")
        r = sc["ratios_tokens_per_s"]
        t = sc["targets_met"]
        lines += ["", f"Scoring ratios: project {r['project_vs_packed']:.2f}x packed (target >= 0.9, "
                  f"{_ok(t['project_vs_packed >= 0.9'])}), {r['project_vs_per_example']:.2f}x per-example (>= 2.5, "
                  f"{_ok(t['project_vs_per_example >= 2.5'])}), {r['project_vs_unbucketed']:.2f}x unbucketed (>= 2.5, "
                  f"{_ok(t['project_vs_unbucketed >= 2.5'])}); with plain-list columns: "
                  f"{r['project_dict_vs_packed']:.2f}x packed."]
        sweep = sc.get("token_budget_sweep_1_thread")
        if "project_vs_project_rows" in r:
            lines.append(f"Token budget: the pass {r['project_vs_project_rows']:.2f}x the same pass in batches of 64 "
                         "examples" + ("; one thread: " + ", ".join(
                             f"{v['batch_tokens'] or 'rows of 64'} {v['vs_rows']:.2f}x" for v in sweep.values())
                             if sweep else "") + ".")
        lines.append("")
    if un:
        lines += ["| unlearning loop | steps/s | tokens/s | spread |", "|---|---|---|---|"]
        for k, x in un["gradient_ascent"].items():
            lines.append(f"| {k} | {x['steps_per_s']['median']:.2f} | {x['tokens_per_s']['median']:.0f} | "
                         f"{x['steps_per_s']['spread_pct']:.0f}% |")
        r, t, e = un["ratios"], un["targets_met"], un["eval_share"]
        p = e["projected"]
        rec = e.get("recorded_runs_default") or []
        lines += ["", f"Unlearning: project {r.get('project_vs_trainer_steps_per_s', float('nan')):.2f}x Trainer "
                  f"(target >= 1.0, {_ok(t.get('project_vs_trainer >= 1.0', False))}). In-loop evaluation: "
                  f"{p['t_eval_s']:.2f} s per evaluation of {e['measured']['examples_scored']} examples vs "
                  f"{p['t_step_s'] * 1e3:.0f} ms per step: {p['share_full_100_steps']:.0%} of wall time over 100 steps "
                  f"({p['n_evals_full']} evaluations), {p['share_stop_at_8']:.0%} for a request that stops at step 8 "
                  f"(target <= 20%, {_ok(t['eval_share_full_schedule <= 0.2'])})"
                  + (f"; recorded in runs/default: {min(x['eval_share'] for x in rec):.0%}-"
                     f"{max(x['eval_share'] for x in rec):.0%}." if rec else "."), ""]
    if sca:
        lines += ["| processes | scoring tokens/s | GA steps/s |", "|---|---|---|"]
        for k, x in sca["processes"].items():
            lines.append(f"| {k} | {x['score_tokens_per_s']['median']:.0f} | {x['ga_steps_per_s']['median']:.2f} |")
        eff = sca["efficiency"]
        lines += ["", f"Scaling efficiency (2 processes x 1 thread): scoring {eff['scoring']:.2f} (target >= 0.8, "
                  f"{_ok(sca['targets_met']['scoring_efficiency >= 0.8'])}), unlearning {eff['unlearning']:.2f}.", ""]
        if "train" in sca:
            tr, tm = sca["train"], sca["targets_met"]
            lines += [f"Job-parallel training: original + oracle {tr['ratios']['original_oracle_models_vs_data']:.2f}x "
                      f"DDP (target >= 1.5, {_ok(tm['job_parallel_original_oracle >= 1.5'])}), 4 shadows "
                      f"{tr['ratios']['shadows_2proc_models_vs_1proc']:.2f}x one process (target >= 1.8, "
                      f"{_ok(tm['job_parallel_shadows >= 1.8'])})"
                      + (f"; the machine's ceiling for two independent jobs {tr['ceiling']['speedup']:.2f}x"
                         if "ceiling" in tr else "") + ".", ""]
    if st:
        if "recorded" in st:
            rec = st["recorded"]
            lines += [f"| stage (recorded, {rec['run_dir']}) | wall s | main-process max RSS MiB |", "|---|---|---|"]
            for k, x in rec["stages"].items():
                if x:
                    w = x["wall_seconds_from_finished_at"]
                    mem = x["recorded"]["cpu_max_rss_mib_main_process"]
                    lines.append(f"| {k} | {'' if w is None else f'{w:.0f}'} | {'' if mem is None else f'{mem:.0f}'} |")
            lines.append("")
        if "live" in st:
            lv = st["live"]
            lines += [f"| stage (live, preset {lv['preset']}, {lv['num_processes']} processes) | wall s | "
                      "peak RSS, all processes MiB | largest process MiB |", "|---|---|---|---|"]
            for k, x in lv["stages"].items():
                lines.append(f"| {k} | {x['wall_seconds']:.1f} | {x['peak_rss_tree_mib']:.0f} | "
                             f"{x['peak_rss_largest_process_mib']:.0f} |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
