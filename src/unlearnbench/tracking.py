"""Experiment tracking: every scalar to `<run.dir>/metrics.jsonl`, and to W&B when it works (main process only)."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from unlearnbench.config import Config, to_dict


class Tracker:
    """One tracking session per stage invocation: W&B run (if enabled) + local jsonl."""

    def __init__(self, cfg: Config, run_dir: Path, job_type: str, is_main: bool, extra_config: dict | None = None):
        self.is_main = is_main
        self.job_type = job_type
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.offline_dir: str | None = None
        if not is_main:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        t = cfg.tracking
        if t.backend == "none":
            return
        mode = t.mode or os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
        if mode == "disabled":
            return
        try:
            import wandb

            settings = wandb.Settings(init_timeout=30, silent=True, console="off")
            self.wandb_run = wandb.init(
                project=t.project, entity=t.entity, group=t.group or cfg.run.name, job_type=job_type,
                name=f"{cfg.run.name}-{job_type}", tags=list(t.tags) + [cfg.preset], mode=mode,
                dir=str(run_dir), config={**to_dict(cfg), **(extra_config or {})}, reinit="finish_previous",
                settings=settings)
            if mode == "offline" and self.wandb_run is not None:
                self.offline_dir = str(Path(self.wandb_run.dir).parent)
        except Exception as exc:  # a tracker must never end a run
            warnings.warn(f"W&B could not start ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"continuing with local files only ({self.jsonl}).", stacklevel=2)
            self.wandb_run = None

    def define_step(self, step_key: str, prefix: str) -> None:
        """Plot metrics under `prefix` against `step_key` (e.g. the unlearning step)."""
        if self.wandb_run is not None:
            try:
                self.wandb_run.define_metric(step_key)
                self.wandb_run.define_metric(f"{prefix}/*", step_metric=step_key)
            except Exception:
                pass

    def log(self, values: dict[str, Any], **context: Any) -> None:
        """Log scalars (and context such as the request or step) locally and to W&B."""
        if not self.is_main:
            return
        record = {"time": time.time(), "job_type": self.job_type, **context, **values}
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in values.items() if _is_number(v)})
            except Exception as exc:
                self._fail(exc)

    def log_table(self, key: str, df) -> None:
        """A per-example table (a pandas DataFrame) as a wandb.Table."""
        if self.wandb_run is not None:
            try:
                import wandb

                self.wandb_run.log({key: wandb.Table(dataframe=df.reset_index(drop=True))})
            except Exception as exc:
                self._fail(exc)

    def log_images(self, images: dict[str, str]) -> None:
        """PNG files as wandb.Image."""
        if self.wandb_run is not None:
            try:
                import wandb

                self.wandb_run.log({k: wandb.Image(v) for k, v in images.items()})
            except Exception as exc:
                self._fail(exc)

    def summary(self, values: dict[str, Any]) -> None:
        """Summary metrics of the stage."""
        if self.wandb_run is not None:
            try:
                for k, v in values.items():
                    self.wandb_run.summary[k] = v
            except Exception as exc:
                self._fail(exc)

    def finish(self) -> None:
        """Close the W&B run and say how to sync an offline one."""
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as exc:
                self._fail(exc)
            if self.offline_dir:
                print(f"W&B offline run saved; upload it with: wandb sync {self.offline_dir}")
        self.wandb_run = None

    def _fail(self, exc: Exception) -> None:
        warnings.warn(f"W&B logging failed ({type(exc).__name__}); continuing with local files only.", stacklevel=3)
        self.wandb_run = None


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return str(v)
