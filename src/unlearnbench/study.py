"""The study runner: one invocation builds the Accelerator once, takes the run directory's lock once, then runs a
stage, or chains all of them (the STAGES table, in order), for each seed; a multi-seed parent gets the aggregate
summary and its own report."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from unlearnbench import interrupt
from unlearnbench.config import Config
from unlearnbench.distributed import describe, make_accelerator, on_main_or_fail
from unlearnbench.errors import UserError
from unlearnbench.io import write_json
from unlearnbench.lock import LOCK_NAME, hold_run_lock
from unlearnbench.records import check_layout, save_resolved_config
from unlearnbench.rundir import Context, check_run_dir, contain_writes, empty_if_unfinished, seed_dir


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
                                                             dir=str(seed_dir(cfg.run.dir, s))))
            for s in cfg.run.seeds]


@contextmanager
def invocation(cfg: Config, acc, command: str | None = None) -> Iterator[None]:
    """One command's hold on its run directory, taken once per command (the CLI, `run_study`, `run_map`): its lock
    (which also covers the `seed_*` and `map/*` sub-runs), the SIGINT / SIGTERM handlers (`interrupt.py`: a stop
    unwinds like an exception, so the lock is released), and, when a UserError ends a command that created the
    run directory before any stage finished there, the directory removed again: a refused or invalid invocation
    leaves nothing behind."""
    run_dir = Path(cfg.run.dir)
    check_run_dir(run_dir)  # a file where the directory should be: a clear error before anything is written
    emptied = False
    try:
        with hold_run_lock(run_dir, acc, command=command, cfg=cfg) as held:
            try:
                with interrupt.handlers():  # every rank records a stop: the safe points agree on it
                    yield
            except UserError:
                emptied = held.created and acc.is_main_process and empty_if_unfinished(run_dir, keep=[LOCK_NAME])
                raise
    finally:
        if emptied:
            try:
                run_dir.rmdir()  # once the lock is gone, only if still empty: another invocation may have taken it
            except OSError:
                pass


def run_study(cfg: Config, stage: str, force: bool = False, acc=None) -> list[Path]:
    """Run `stage` (or every stage for `run`) for each seed of the config, holding the run directory's lock for
    the call; returns the run directories. (The CLI takes the lock itself and calls `run_stages`.)"""
    check_config(cfg)
    contain_writes(Path(cfg.run.dir))
    acc = acc or make_accelerator(cfg.run.num_processes)
    with invocation(cfg, acc):
        return run_stages(cfg, stage, force, acc)


def run_stages(cfg: Config, stage: str, force: bool, acc) -> list[Path]:
    """`run_study`'s work, for a caller that holds the run directory (`invocation`) and checked the config."""
    from unlearnbench.stages import STAGES

    contain_writes(Path(cfg.run.dir))
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
        if not force:  # a run directory of an older layout, refused before anything in it is written
            on_main_or_fail(acc, lambda: check_layout(ctx.run_dir))
        save_resolved_config(ctx, setup)
        for name in names:
            ctx.started = time.perf_counter()
            STAGES[name].run(ctx)
        dirs.append(ctx.run_dir)
    # the seeds' summary.json are the report stage's: the parent aggregates them once they are written
    if cfg.run.seeds and acc.is_main_process and stage in ("run", "report"):
        from unlearnbench.findings import aggregate_seeds
        from unlearnbench.reporting.compare import compare_runs

        write_json(Path(cfg.run.dir) / "summary.json", aggregate_seeds(cfg, dirs))
        # the parent's own report: every group as mean ± interval over the seeds
        compare_runs([Path(cfg.run.dir)], Path(cfg.run.dir) / "report")
        acc.print(f"[report] wrote {Path(cfg.run.dir) / 'report' / 'compare.md'} ({len(dirs)} seeds)")
    acc.wait_for_everyone()
    return dirs
