"""The study runner: one invocation builds the Accelerator once, then runs a stage, or chains all of them (the
STAGES table, in order), for each seed; a multi-seed parent gets the aggregate summary and its own report."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from unlearnbench.config import Config
from unlearnbench.distributed import describe, make_accelerator
from unlearnbench.errors import UserError
from unlearnbench.io import write_json
from unlearnbench.lock import hold_run_lock
from unlearnbench.rundir import Context, check_run_dir, contain_writes, save_resolved_config


def check_config(cfg: Config) -> None:
    """Checks that need the package's registries (config itself is plain data): the unlearning method exists, the
    trackers are installed."""
    from unlearnbench.tracking import check_backends
    from unlearnbench.unlearn.methods import METHODS

    check_backends(cfg)

    if cfg.unlearn.method not in METHODS:
        raise UserError(f"Unknown unlearning method '{cfg.unlearn.method}'. Available: {', '.join(sorted(METHODS))}. "
                        "Set unlearn.method=<name>.")


def seed_configs(cfg: Config) -> list[Config]:
    """One config per seed: `run.seeds=[a,b]` gives sub-runs `<run.dir>/seed_a`, `<run.dir>/seed_b`."""
    if not cfg.run.seeds:
        return [cfg]
    return [dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=s, seeds=[],
                                                             dir=str(Path(cfg.run.dir) / f"seed_{s}")))
            for s in cfg.run.seeds]


def run_study(cfg: Config, stage: str, force: bool = False, acc=None) -> list[Path]:
    """Run `stage` (or every stage for `run`) for each seed of the config; returns the run directories."""
    from unlearnbench.stages import STAGES

    check_config(cfg)
    contain_writes(Path(cfg.run.dir))
    acc = acc or make_accelerator(cfg.run.num_processes)
    with hold_run_lock(cfg.run.dir, acc, cfg=cfg):  # one writer per run directory (nests inside the CLI's lock)
        setup = describe(acc)
        acc.print(f"[setup] processes={setup['num_processes']} type={setup['distributed_type']} "
                  f"backend={setup['backend']} zero_stage={setup['zero_stage']} dtype={cfg.model.dtype} "
                  f"device={setup['device']} train batch={cfg.train.batch_size} (effective)")
        names = list(STAGES) if stage == "run" else [stage]
        dirs = []
        for sub in seed_configs(cfg):
            ctx = Context(cfg=sub, run_dir=Path(sub.run.dir), acc=acc, force=force)
            if acc.is_main_process:
                check_run_dir(ctx.run_dir)
                ctx.run_dir.mkdir(parents=True, exist_ok=True)
            acc.wait_for_everyone()
            save_resolved_config(ctx, setup)
            for name in names:
                ctx.started = time.perf_counter()
                STAGES[name].run(ctx)
            dirs.append(ctx.run_dir)
        # the seeds' summary.json are the report stage's: the parent aggregates them once they are written
        if cfg.run.seeds and acc.is_main_process and stage in ("run", "report"):
            from unlearnbench.findings import aggregate_seeds
            from unlearnbench.reporting.compare import compare_runs

            write_json(Path(cfg.run.dir) / "summary.json", aggregate_seeds(dirs, cfg.metrics.alpha))
            # the parent's own report: every group as mean ± interval over the seeds
            compare_runs([Path(cfg.run.dir)], Path(cfg.run.dir) / "report")
            acc.print(f"[report] wrote {Path(cfg.run.dir) / 'report' / 'compare.md'} ({len(dirs)} seeds)")
        acc.wait_for_everyone()
    return dirs
