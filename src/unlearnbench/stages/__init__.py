"""The stages of a run, in order: prepare -> train -> score -> unlearn -> attack -> report. `STAGES` is the one table
the CLI, the study runner, the stage records and the benchmarks read: each row declares, as data, what the stage
does (`summary`, the line `unlearnbench --help` shows), what it writes in the run directory (`outputs`) and the
config keys those outputs depend on (`sections`: its fingerprint). A stage's module (`stages/<name>.py`) holds its
code, with one entry point, `run(ctx)`.

A stage module is imported when its `run` is first asked for, not when the table is: the CLI can list the stages
before the run directory's cache variables are set (matplotlib, torch and W&B read them when imported).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    """One row of the table: the stage's name, what it does, what it writes and what its outputs depend on."""

    name: str
    summary: str  # what it does, in one line (`unlearnbench --help`)
    outputs: tuple[str, ...]  # files and directories it writes in the run directory (removed by --force)
    sections: tuple[str, ...]  # config sections or keys its outputs depend on (its fingerprint)
    unrecorded: tuple[str, ...] = ()  # outputs that later stages never read and that may go away (checkpoints)

    @property
    def recorded(self) -> tuple[str, ...]:
        """The outputs listed, with sizes and checksums, in the stage's record."""
        return tuple(o for o in self.outputs if o not in self.unrecorded)

    @property
    def run(self) -> Callable:
        """The entry point, `run(ctx)` of `unlearnbench.stages.<name>` (imported now)."""
        return importlib.import_module(f"unlearnbench.stages.{self.name}").run


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "build every data set (ID corpus, canaries, OOD domain, references, holdouts) into data/",
          outputs=("data",), sections=("data", "model.name_or_path", "run.seed")),
    Stage("train", "train the original model (with the forget sets) and the oracle (without), and any shadow models",
          outputs=("models", "checkpoints"), sections=("data", "model", "train", "run.seed", "score.shadow_models"),
          unrecorded=("checkpoints",)),
    Stage("score", "score every example under the original and the oracle: exposure, memorization, difficulty",
          outputs=("scores",), sections=("data", "model", "train", "score", "metrics", "run.seed")),
    Stage("unlearn", "unlearn each forget request from the original model; unlearn/summary.json with the requests",
          outputs=("unlearn",), sections=("data", "model", "train", "score", "metrics", "unlearn", "run.seed")),
    Stage("attack", "relearning, quantization and membership inference on each unlearned model (F4's numbers)",
          outputs=("attacks",),
          sections=("data", "model", "train", "score", "metrics", "unlearn", "attack", "run.seed")),
    Stage("report", "summary.json with findings F1-F4, report/report.md with figures; --compare: runs side by side",
          outputs=("report", "summary.json"),  # everything before it; the merged view
          sections=("data", "model", "train", "score", "metrics", "unlearn", "attack", "run.seed")),
)}
