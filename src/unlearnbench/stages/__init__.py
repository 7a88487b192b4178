"""The stages of a run, in order: prepare -> train -> score -> unlearn -> attack -> report. One module each, the same face:
`run(ctx)`, plus `NAME`, `OUTPUTS` (what it writes in the run directory) and `SECTIONS` (the config keys its
outputs depend on: its fingerprint). `STAGES` is the one table the CLI, the study runner, the run-directory
records and the benchmarks read.

A stage module is imported when its row is first used, not when the table is: the CLI can list the stages before
the run directory's cache variables are set (matplotlib, torch and W&B read them when imported).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable


@dataclass(frozen=True)
class Stage:
    """One row of the table: the stage's name and module; its entry point, outputs and config sections."""

    name: str

    @property
    def module(self) -> ModuleType:
        """The stage's module, `unlearnbench.stages.<name>`."""
        return importlib.import_module(f"unlearnbench.stages.{self.name}")

    @property
    def run(self) -> Callable:
        """The entry point, `run(ctx)`."""
        return self.module.run

    @property
    def outputs(self) -> tuple[str, ...]:
        """What the stage writes in the run directory (removed by --force)."""
        return self.module.OUTPUTS

    @property
    def sections(self) -> tuple[str, ...]:
        """The config keys the stage's outputs depend on (its fingerprint)."""
        return self.module.SECTIONS


STAGES: dict[str, Stage] = {name: Stage(name) for name in ("prepare", "train", "score", "unlearn", "attack", "report")}
