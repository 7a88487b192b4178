"""The prepare stage: build every data set of the study (main process) and write it to `data/`."""

from __future__ import annotations

import time

from unlearnbench.data.build import build_data
from unlearnbench.distributed import on_main_or_fail, peak_memory_mib
from unlearnbench.records import clear_outputs, finish_stage, should_run
from unlearnbench.rundir import Context

NAME = "prepare"


def run(ctx: Context) -> None:
    """Build and write every data set (main process); all processes wait."""
    if not should_run(ctx, NAME):
        return
    clear_outputs(ctx, NAME)
    t0 = time.perf_counter()
    man = on_main_or_fail(ctx.acc, lambda: build_data(ctx.cfg, ctx.run_dir / "data"))
    ctx.acc.print(f"[prepare] {man['total_examples']} examples, vocabulary {man['vocab_size']}; "
                  f"original trains on {man['training_mixture']['original']['sequences']} sequences, "
                  f"oracle on {man['training_mixture']['oracle']['sequences']}")
    finish_stage(ctx, NAME, {"seconds": time.perf_counter() - t0, **peak_memory_mib()})
