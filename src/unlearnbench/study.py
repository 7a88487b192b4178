"""One invocation: build the Accelerator once, then run a stage, or chain all of them, for each seed."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from unlearnbench.config import Config
from unlearnbench.distributed import describe, make_accelerator
from unlearnbench.io import write_json
from unlearnbench.runner import Context, contain_writes, save_resolved_config


def _stage_fns():
    from unlearnbench.report import run_report
    from unlearnbench.stages import run_prepare, run_score, run_train
    from unlearnbench.unlearn.loop import run_unlearn

    return {"prepare": run_prepare, "train": run_train, "score": run_score, "unlearn": run_unlearn,
            "report": run_report}


def seed_configs(cfg: Config) -> list[Config]:
    """One config per seed: `run.seeds=[a,b]` gives sub-runs `<run.dir>/seed_a`, `<run.dir>/seed_b`."""
    if not cfg.run.seeds:
        return [cfg]
    return [dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=s, seeds=[],
                                                             dir=str(Path(cfg.run.dir) / f"seed_{s}")))
            for s in cfg.run.seeds]


def run_study(cfg: Config, stage: str, force: bool = False, acc=None) -> list[Path]:
    """Run `stage` (or every stage for `run`) for each seed of the config; returns the run directories."""
    contain_writes(Path(cfg.run.dir))
    acc = acc or make_accelerator(cfg.run.num_processes)
    setup = describe(acc)
    acc.print(f"[setup] processes={setup['num_processes']} type={setup['distributed_type']} "
              f"backend={setup['backend']} zero_stage={setup['zero_stage']} dtype={cfg.model.dtype} "
              f"device={setup['device']} train batch={cfg.train.batch_size} (effective)")
    fns = _stage_fns()
    stages = list(fns) if stage == "run" else [stage]
    dirs = []
    for sub in seed_configs(cfg):
        run_dir = Path(sub.run.dir)
        ctx = Context(cfg=sub, run_dir=run_dir, acc=acc, force=force)
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        save_resolved_config(ctx, setup)
        for name in stages:
            t0 = time.perf_counter()
            fns[name](ctx)
            ctx.timings[name] = time.perf_counter() - t0
        dirs.append(run_dir)
    if cfg.run.seeds and acc.is_main_process and stage in ("run", "unlearn", "report"):
        from unlearnbench.summary import aggregate_seeds

        write_json(Path(cfg.run.dir) / "summary.json", aggregate_seeds(dirs))
        if stage in ("run", "report"):  # the parent's own report: every group as mean ± interval over the seeds
            from unlearnbench.report import compare_runs

            compare_runs([Path(cfg.run.dir)], Path(cfg.run.dir) / "report")
            acc.print(f"[report] wrote {Path(cfg.run.dir) / 'report' / 'compare.md'} ({len(dirs)} seeds)")
    acc.wait_for_everyone()
    return dirs
