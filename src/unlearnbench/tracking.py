"""Experiment tracking: every scalar to `<run.dir>/metrics.jsonl`, and to W&B when it works (main process only).

W&B never decides whether a run finishes: it is offline when no API key is configured (the `wandb sync`
command is printed at the end), off with `tracking.backend=none` or `WANDB_MODE=disabled`, and any failure
(bad key, unreachable host, init timeout) is one warning per process, after which the local files carry
everything.
"""

from __future__ import annotations

import json
import netrc
import numbers
import os
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from unlearnbench.config import Config, to_dict

# Seconds wandb.init may take before we give up on W&B (WANDB_INIT_TIMEOUT overrides). wandb's own default
# (90 s) is long for a run that does not need it; an unreachable host otherwise retries until then.
INIT_TIMEOUT_S = 30.0

# W&B setups (mode, host, key) that already failed in this process: warn once, then stay quiet and local.
_FAILED: set[tuple] = set()


def wandb_mode(cfg: Config) -> str | None:
    """The W&B mode for this config and environment (online/offline), or None when W&B is off."""
    t = cfg.tracking
    env = os.environ.get("WANDB_MODE")
    if t.backend == "none" or env == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return None
    mode = t.mode or env or ("online" if _has_api_key() else "offline")
    return None if mode == "disabled" else mode


def open_tracker(ctx, job_type: str, writer: bool | None = None) -> "Tracker":
    """The tracking session of one stage invocation. `writer` (default: the main process) writes metrics.jsonl;
    W&B runs only on the main process, so a request-parallel worker that writes its own records stays local."""
    if writer is None or ctx.is_main:
        return Tracker(ctx.cfg, ctx.run_dir, job_type, ctx.is_main if writer is None else writer)
    return Tracker(ctx.cfg, ctx.run_dir, job_type, writer, use_wandb=False)


class Tracker:
    """One tracking session per stage invocation: W&B run (if enabled) + local jsonl."""

    def __init__(self, cfg: Config, run_dir: Path, job_type: str, is_main: bool, extra_config: dict | None = None,
                 use_wandb: bool = True):
        self.is_main = is_main
        self.job_type = job_type
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.offline_dir: str | None = None
        self._setup: tuple | None = None
        if not is_main:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(cfg) if use_wandb else None
        if mode is None:
            return
        self._setup = (mode, os.environ.get("WANDB_BASE_URL"), hash(os.environ.get("WANDB_API_KEY")))
        if self._setup in _FAILED:
            return
        t = cfg.tracking
        try:
            import wandb

            settings = wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)),
                                      silent=True, console="off")
            config = {**to_dict(cfg), **_run_record(Path(run_dir)), **(extra_config or {})}
            self.wandb_run = wandb.init(
                project=t.project, entity=t.entity, group=t.group or cfg.run.name, job_type=job_type,
                name=f"{cfg.run.name}-{job_type}", tags=list(t.tags) + [cfg.preset, job_type], mode=mode,
                dir=str(run_dir), config=config, reinit="finish_previous", settings=settings)
            if mode == "offline" and self.wandb_run is not None:
                self.offline_dir = str(Path(self.wandb_run.dir).parent)
        except Exception as exc:  # a tracker must never end a run
            self._fail(exc, "could not start")

    def define_step(self, step_key: str, prefix: str) -> None:
        """Plot metrics under `prefix` against `step_key` (e.g. the unlearning step)."""
        if self.wandb_run is not None:
            try:
                self.wandb_run.define_metric(step_key)
                self.wandb_run.define_metric(f"{prefix}/*", step_metric=step_key)
            except Exception as exc:
                self._fail(exc, "define_metric failed")

    def log(self, values: dict[str, Any], **context: Any) -> None:
        """Log scalars (and context such as the request or step) locally and to W&B.

        Numeric context (e.g. `unlearn/step`) goes to W&B too: it is the x-axis `define_step` names.
        """
        if not self.is_main:
            return
        self._write({"time": time.time(), "job_type": self.job_type, **context, **values})
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in {**context, **values}.items() if _is_number(v)})
            except Exception as exc:
                self._fail(exc, "log failed")

    def log_table(self, key: str, df) -> None:
        """A per-example table (a pandas DataFrame) as a wandb.Table."""
        if self.wandb_run is not None:
            try:
                import wandb

                self.wandb_run.log({key: wandb.Table(dataframe=df.reset_index(drop=True))})
            except Exception as exc:
                self._fail(exc, "log_table failed")

    def log_images(self, images: dict[str, str]) -> None:
        """PNG files (key -> path) as wandb.Image."""
        if self.wandb_run is not None:
            try:
                import wandb

                self.wandb_run.log({k: wandb.Image(str(v)) for k, v in images.items()})
            except Exception as exc:
                self._fail(exc, "log_images failed")

    def summary(self, values: dict[str, Any]) -> None:
        """Summary metrics of the stage (also written to metrics.jsonl as a `summary` record)."""
        if not self.is_main:
            return
        self._write({"time": time.time(), "job_type": self.job_type, "record": "summary", **values})
        if self.wandb_run is not None:
            try:
                for k, v in values.items():
                    self.wandb_run.summary[k] = v
            except Exception as exc:
                self._fail(exc, "summary failed")

    def finish(self) -> None:
        """Close the W&B run and say how to sync an offline one."""
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as exc:
                self._fail(exc, "finish failed")
            if self.offline_dir:
                print(f"W&B offline run saved; upload it with: wandb sync {self.offline_dir}")
        self.wandb_run = None

    def _write(self, record: dict) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")

    def _fail(self, exc: Exception, what: str) -> None:
        self.wandb_run = None
        self.offline_dir = None
        if self._setup in _FAILED:
            return
        _FAILED.add(self._setup)
        first = str(exc).splitlines()[0] if str(exc) else ""
        warnings.warn(f"W&B {what} ({type(exc).__name__}: {first}); W&B is off for the rest of this process and "
                      f"the run continues with local files only ({self.jsonl}). Set WANDB_MODE=offline to keep an "
                      "offline W&B run, or tracking.backend=none to silence this.", stacklevel=3)


def _run_record(run_dir: Path) -> dict:
    """Fingerprints, git revision, package versions and distributed setup from the run's config.yaml."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in doc.items() if k != "config"}


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return str(v)
