"""The run directory: what a stage is given (`Context`), where things are in the directory (stage records, the
`seed_*` sub-runs of a multi-seed run, the `map/*` settings of the findings map), keeping library caches and
temporary files inside it, and removing outputs from it. It decides nothing about stages: the stage records
(`records.py`) say what to remove and when.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from unlearnbench.config import Config
from unlearnbench.errors import UserError


@dataclass
class Context:
    """Everything a stage needs: config, run directory, accelerator, flags."""

    cfg: Config
    run_dir: Path
    acc: Any
    force: bool = False
    started: float | None = None  # when the current stage started (perf_counter), for its record's cost

    @property
    def is_main(self) -> bool:
        """Only the main process writes files."""
        return self.acc.is_main_process


# Libraries that write caches and logs under $HOME unless told otherwise; a run keeps them in <run.dir>/.cache.
# Only set when the user has not: an exported variable (e.g. a shared TORCH_EXTENSIONS_DIR) wins.
_CACHE_ENV = {
    "WANDB_DIR": "", "WANDB_CACHE_DIR": ".cache/wandb", "WANDB_DATA_DIR": ".cache/wandb-data",
    "WANDB_CONFIG_DIR": ".cache/wandb-config", "MPLCONFIGDIR": ".cache/matplotlib",
    "TORCH_EXTENSIONS_DIR": ".cache/torch_extensions", "TRITON_CACHE_DIR": ".cache/triton",
    "TORCHINDUCTOR_CACHE_DIR": ".cache/torchinductor",
}


_OURS: dict[str, str] = {}


def _matplotlib_fallback(path: str) -> bool:
    """True for the temporary directory matplotlib makes (and exports as MPLCONFIGDIR) when its config directory
    cannot be created: that value was not the user's choice, so the run may replace it."""
    import tempfile

    p = Path(path)
    return p.name.startswith("matplotlib-") and p.parent == Path(tempfile.gettempdir())


def contain_writes(run_dir: Path) -> dict:
    """Point library caches (W&B, matplotlib, DeepSpeed's compiled ops, Triton) into the run directory, so a run
    writes nothing outside it. Model and dataset downloads keep the user's HF cache: they are inputs.
    (Temporary files: `contained_tmp`, for the duration of an invocation.)"""
    run_dir = Path(run_dir).resolve()
    for var, sub in _CACHE_ENV.items():
        cur = os.environ.get(var)
        ours = cur is None or _OURS.get(var) == cur or (var == "MPLCONFIGDIR" and _matplotlib_fallback(cur))
        if ours:  # unset, set by an earlier run here, or matplotlib's own temporary fallback
            os.environ[var] = _OURS[var] = str(run_dir / sub) if sub else str(run_dir)
    return {v: os.environ[v] for v in _CACHE_ENV}


TMP_SUBDIR = ".cache/tmp"


@contextmanager
def contained_tmp(run_dir: Path) -> Iterator[Path]:
    """For the block, temporary files go to `<run_dir>/.cache/tmp` (TMPDIR for child processes such as W&B's
    service, `tempfile.tempdir` for this one): W&B stages media, tables and artifacts and keeps its service's
    socket and port files there. Restored afterwards, and the directory removed when empty."""
    import tempfile

    tmp = Path(run_dir).resolve() / TMP_SUBDIR
    tmp.mkdir(parents=True, exist_ok=True)
    saved_env, saved_mod = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    try:
        yield tmp
    finally:
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        tempfile.tempdir = saved_mod
        try:
            tmp.rmdir()
        except OSError:
            pass


def check_run_dir(run_dir: str | Path) -> Path | None:
    """Refuse a run directory that cannot be one (an existing file, or a path through a file); returns the first
    directory of the path that does not exist yet (what creating it would create), or None when it exists."""
    path = Path(os.path.abspath(run_dir))
    missing = None
    for p in (path, *path.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            what = "an existing file" if p.is_file() else ("a broken symbolic link" if not p.exists() else
                                                          "not a directory")
            if p == path:
                raise UserError(f"run.dir={run_dir} is {what}, not a directory. Point run.dir at a directory (it is "
                                f"created if missing), e.g. run.dir={run_dir}.d, or move the file away.")
            raise UserError(f"run.dir={run_dir} cannot be created: {p} is {what}. Point run.dir at a path under "
                            "a directory.")
        missing = p
    return missing


def resolve_run(cfg: Config) -> Config:
    """Fill defaults that depend on other keys: the run name and directory."""
    name = cfg.run.name or cfg.preset
    run_dir = cfg.run.dir or str(Path("runs") / name)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, dir=run_dir))


# ----------------------------------------------------------------------------------------------- layout

RECORDS_DIR = "stages"  # <run.dir>/stages/<stage>.json: each stage's record
MAP_DIR = "map"  # <run.dir>/map/<setting>/: the findings map's sub-runs
POINTS_DIR = "points"  # <run.dir>/points/<point>/: a ladder's studies (docs/ladder.md)


def record_path(run_dir: Path, stage: str) -> Path:
    """Where a stage's record lives: `<run_dir>/stages/<stage>.json`."""
    return Path(run_dir) / RECORDS_DIR / f"{stage}.json"


def seed_dir(run_dir: str | Path, seed: int) -> Path:
    """The sub-run of one seed of a multi-seed run: `<run_dir>/seed_<seed>`."""
    return Path(run_dir) / f"seed_{seed}"


def map_dir(run_dir: str | Path) -> Path:
    """The findings map of a run: `<run_dir>/map` (its settings' sub-runs and the map itself)."""
    return Path(run_dir) / MAP_DIR


def map_setting_dir(run_dir: str | Path, setting: str) -> Path:
    """The sub-run of one setting of the findings map: `<run_dir>/map/<setting>`."""
    return map_dir(run_dir) / setting


def ladder_point_dir(run_dir: str | Path, point: str) -> Path:
    """The study of one point of a ladder: `<run_dir>/points/<point>`."""
    return Path(run_dir) / POINTS_DIR / point


def nested_runs(run_dir: str | Path) -> list[Path]:
    """The run directories whose invocations write into this one or under it: the parent of a `seed_*` sub-run, of
    a findings-map setting or of a ladder point (one to three levels up: a point's seed), and this directory's own
    `seed_*`, `map/*` and `points/*` sub-runs."""
    run_dir = Path(os.path.abspath(run_dir))
    subs = [p for p in (*sorted(run_dir.glob("seed_*")), *sorted(map_dir(run_dir).glob("*")),
                        *sorted((run_dir / POINTS_DIR).glob("*"))) if p.is_dir()]
    return [run_dir.parent, run_dir.parent.parent, run_dir.parent.parent.parent, *subs]


# ----------------------------------------------------------------------------------------------- removing files

def remove_outputs(run_dir: Path, outputs: Iterable[str]) -> None:
    """Remove a stage's outputs (files or directories relative to the run directory) before it is recomputed."""
    for name in outputs:
        p = Path(run_dir) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def damaged_unit(rel: str) -> str:
    """What to remove when the recorded file `rel` is damaged: the file, or its top-level output's direct child
    (one model, one request, one data set), which the stage then recomputes while keeping the rest."""
    return "/".join(rel.split("/")[:2])


def remove_damaged(run_dir: Path, rels: Iterable[str]) -> None:
    """Remove the unit (`damaged_unit`) of each damaged recorded file."""
    for rel in rels:
        p = Path(run_dir) / damaged_unit(rel)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)


def empty_if_unfinished(run_dir: Path, keep: Iterable[str] = ()) -> bool:
    """Remove everything in `run_dir` except the names in `keep`, unless a stage finished there or in one of its
    sub-runs (then nothing is removed and the answer is False): what a failed invocation leaves in a directory it
    created (config.yaml, caches)."""
    run_dir = Path(run_dir)
    if any(run_dir.glob(f"{RECORDS_DIR}/*.json")) or any(run_dir.glob(f"*/{RECORDS_DIR}/*.json")):
        return False
    keep = set(keep)
    for p in run_dir.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return True
