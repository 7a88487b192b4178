"""Experiment tracking: every scalar to `<run.dir>/metrics.jsonl` (the project's own record), and to the trackers
named in `tracking.backends` (main process only), through Accelerate's tracker classes.

`tracking.backends` takes any tracker Accelerate knows by name (`wandb`, the default, `tensorboard`, `mlflow`,
`comet_ml`, `aim`, `clearml`, `dvclive`, `swanlab`, `trackio`); `[]` keeps metrics.jsonl only. Each stage
invocation is one tracker run: `accelerate.tracking.<Name>Tracker` objects built from `LOGGER_TYPE_TO_CLASS`,
started, given the resolved config (`store_init_configuration`), logged to and finished by this module, rather than
`Accelerator.init_trackers` / `log` / `end_training`: the study's one Accelerator spans several stages and seeds
(its `log_with` is fixed when it is built, `init_trackers` only appends, and `end_training` also destroys the
process group), `Accelerator.log` hands every tracker the same values and stops at the first one that fails, and
the extras below differ per tracker.

W&B is accelerate's `WandBTracker` with this project's `wandb.init` (offline when no API key is configured, the
`wandb sync` command printed at the end, an init timeout, group = run name, job type = stage) and the extras through
its run: `define_metric` step axes, tables, images, summary. TensorBoard writes `<run.dir>/tensorboard/<stage>/<time>/`
(scalars on the same step axes, tables as text, figures as images); MLflow gets tables and figures as artifacts;
other trackers get the scalars and the summary's numbers.

A tracker never decides whether a run finishes: any failure (bad key, unreachable host, init timeout, a broken
tracker) is one warning per tracker and process, after which that tracker is off and the local files, and the other
trackers, carry everything. A tracker that is not installed is refused before any stage runs (`check_backends`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import numbers
import os
import time
import warnings
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from unlearnbench.config import TRACKERS, Config, to_dict
from unlearnbench.errors import UserError

# Seconds wandb.init may take before we give up on W&B (WANDB_INIT_TIMEOUT overrides). wandb's own default
# (90 s) is long for a run that does not need it; an unreachable host otherwise retries until then.
INIT_TIMEOUT_S = 30.0

# Tracker setups (name, and for W&B its mode, host, key) that already failed in this process: warn once, then stay
# quiet and local.
_FAILED: set[tuple] = set()

# Sessions not finished yet: a stage stopped by SIGINT / SIGTERM (or an error) raises past its `finish()`; the CLI
# closes them on the way out (`finish_open`), so TensorBoard flushes its last events and MLflow/W&B runs end.
_OPEN: "weakref.WeakSet[Tracker]" = weakref.WeakSet()


def finish_open() -> None:
    """Finish every tracking session still open in this process."""
    for trk in list(_OPEN):
        trk.finish()

LABELS = {"wandb": "W&B", "tensorboard": "TensorBoard", "mlflow": "MLflow", "comet_ml": "Comet ML", "aim": "Aim",
          "clearml": "ClearML", "dvclive": "DVCLive", "swanlab": "SwanLab", "trackio": "Trackio"}
# Modules of which one must be importable for the tracker to start (default: the tracker's name).
_MODULES = {"tensorboard": ("tensorboard", "tensorboardX")}
TABLE_ROWS = 200  # rows of a table shown as TensorBoard text (the whole table stays in the run directory)


def backends(cfg: Config) -> list[str]:
    """The trackers this config asks for (the deprecated `tracking.backend` already folded in by config.normalize)."""
    t = cfg.tracking
    if t.backend is not None:
        return [] if t.backend == "none" else [t.backend]
    return list(dict.fromkeys(t.backends))


def check_backends(cfg: Config) -> None:
    """Refuse, before any stage runs, a tracker name Accelerate does not know or whose package is not installed."""
    names = backends(cfg)
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise UserError(f"tracking.backends has unknown tracker(s) {', '.join(map(repr, bad))}. Supported "
                        f"(Accelerate's trackers): {', '.join(TRACKERS)}.")
    missing = [n for n in names if not any(importlib.util.find_spec(m) for m in _MODULES.get(n, (n,)))]
    if missing:
        one = len(missing) == 1
        extra = ", or `pip install unlearnbench[tensorboard]`" if "tensorboard" in missing else ""
        raise UserError(f"tracking.backends asks for {', '.join(missing)}, but {'it is' if one else 'they are'} not "
                        f"installed in this environment. Install {'it' if one else 'them'} (`pip install "
                        f"{' '.join(TRACKERS[n] for n in missing)}`{extra}), or drop {'it' if one else 'them'} from "
                        "tracking.backends (e.g. tracking.backends=[wandb], or [] for metrics.jsonl only).")


def wandb_mode(cfg: Config) -> str | None:
    """The W&B mode for this config and environment (online/offline), or None when W&B is off."""
    t = cfg.tracking
    env = os.environ.get("WANDB_MODE")
    off = env == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true")
    if "wandb" not in backends(cfg) or off:
        return None
    mode = t.mode or env or ("online" if _has_api_key() else "offline")
    return None if mode == "disabled" else mode


def open_tracker(ctx, job_type: str, job_parallel: bool = False) -> "Tracker":
    """The tracking session of one stage invocation. The main process writes metrics.jsonl and runs the trackers;
    with `job_parallel` (each process runs whole jobs alone) every process writes its own records to metrics.jsonl,
    while the trackers still run on the main process only."""
    return Tracker(ctx.cfg, ctx.run_dir, job_type, ctx.is_main or job_parallel, use_wandb=ctx.is_main)


def _wandb_tracker_class():
    from accelerate.tracking import WandBTracker

    class ProjectWandBTracker(WandBTracker):
        """accelerate's WandBTracker, started with this project's settings (mode, timeout, reinit)."""

        def __init__(self, run_name: str, mode: str, **init_kwargs: Any):
            super().__init__(run_name, **init_kwargs)
            self.mode = mode

        def start(self) -> None:
            import wandb

            settings = wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)),
                                      silent=True, console="off")
            self.run = wandb.init(name=self.run_name, mode=self.mode, reinit="finish_previous", settings=settings,
                                  **self.init_kwargs)

    return ProjectWandBTracker


class Tracker:
    """One tracking session per stage invocation: the configured trackers (main process) + local jsonl."""

    def __init__(self, cfg: Config, run_dir: Path, job_type: str, is_main: bool, extra_config: dict | None = None,
                 use_wandb: bool = True):
        """`use_wandb=False` keeps this session local (metrics.jsonl only), whatever `tracking.backends` says."""
        self.is_main = is_main
        self.job_type = job_type
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.trackers: dict[str, Any] = {}  # name -> started accelerate GeneralTracker
        self.offline_dir: str | None = None
        self._setups: dict[str, tuple] = {}
        self._axes: list[tuple[str, str]] = []  # (prefix, step key) from define_step
        self._calls = 0
        _OPEN.add(self)
        if not is_main:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        if not use_wandb:
            return
        config = {**to_dict(cfg), **_run_record(self.run_dir), **(extra_config or {})}
        for name in backends(cfg):
            if name == "wandb":
                mode = wandb_mode(cfg)
                if mode is None:
                    continue
                setup = ("wandb", mode, os.environ.get("WANDB_BASE_URL"), hash(os.environ.get("WANDB_API_KEY")))
            else:
                setup = (name,)
            self._setups[name] = setup
            if setup in _FAILED:
                continue
            try:
                trk = self._make(name, cfg, config)
                trk.start()
                if name != "wandb":  # W&B gets the config in wandb.init (one run record)
                    trk.store_init_configuration(_flat_params(config))
                self.trackers[name] = trk
                if name == "wandb" and setup[1] == "offline" and trk.tracker is not None:
                    self.offline_dir = str(Path(trk.tracker.dir).parent)
            except Exception as exc:  # a tracker must never end a run
                self._fail(name, exc, "could not start")

    def _make(self, name: str, cfg: Config, config: dict):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        t = cfg.tracking
        run_name = f"{cfg.run.name}-{self.job_type}"
        if name == "wandb":
            return _wandb_tracker_class()(
                run_name, self._setups["wandb"][1], project=t.project, entity=t.entity, group=t.group or cfg.run.name,
                job_type=self.job_type, tags=list(t.tags) + [cfg.preset, self.job_type], dir=str(self.run_dir),
                config=config)
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":  # one TensorBoard run per stage invocation: <run.dir>/tensorboard/<stage>/<time>
            return cls(f"{self.job_type}/{time.strftime('%Y%m%d-%H%M%S')}", str(self.run_dir / "tensorboard"))
        if name == "mlflow":
            return cls(experiment_name=t.project, run_name=run_name,
                       tags={"group": t.group or cfg.run.name, "job_type": self.job_type, "preset": cfg.preset,
                             **{tag: "" for tag in t.tags}})
        if name == "aim":
            return cls(run_name, str(self.run_dir / "aim"))
        if cls.requires_logging_directory:
            return cls(t.project, str(self.run_dir / name))
        return cls(t.project) if name not in ("clearml", "dvclive") else cls(run_name)

    @property
    def wandb_run(self):
        """The underlying wandb run, or None when W&B is off."""
        trk = self.trackers.get("wandb")
        return None if trk is None else trk.tracker

    def define_step(self, step_key: str, prefix: str) -> None:
        """Plot metrics under `prefix` against `step_key` (e.g. the unlearning step)."""
        self._axes.append((prefix, step_key))
        run = self.wandb_run
        if run is not None:
            try:
                run.define_metric(step_key)
                run.define_metric(f"{prefix}/*", step_metric=step_key)
            except Exception as exc:
                self._fail("wandb", exc, "define_metric failed")

    def log(self, values: dict[str, Any], **context: Any) -> None:
        """Log scalars (and context such as the request or step) locally and to the trackers.

        Numeric context (e.g. `unlearn/step`) goes to W&B too: it is the x-axis `define_step` names. The other
        trackers get each value at its step: the `define_step` key of its prefix, else `step`, else the number of
        this session's log calls (as W&B counts them).
        """
        if not self.is_main:
            return
        self._write({"time": time.time(), "job_type": self.job_type, **context, **values})
        self._calls += 1
        for name in list(self.trackers):
            try:
                if name == "wandb":
                    self.trackers[name].log({k: v for k, v in {**context, **values}.items() if _is_number(v)})
                else:
                    for step, part in self._by_step(values, context).items():
                        self.trackers[name].log(part, step=step)
            except Exception as exc:
                self._fail(name, exc, "log failed")

    def _by_step(self, values: dict[str, Any], context: dict[str, Any]) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        default = context.get("step")
        default = int(default) if _is_number(default) else self._calls - 1
        for k, v in values.items():
            if not _is_number(v):
                continue
            step = default
            for prefix, key in self._axes:
                if k.startswith(prefix + "/") and _is_number(context.get(key)):
                    step = int(context[key])
            out.setdefault(step, {})[k] = float(v)
        return out

    def log_table(self, key: str, df) -> None:
        """A per-example table (a pandas DataFrame): a wandb.Table, TensorBoard text (its first rows), an MLflow
        table artifact; trackers without tables skip it (the run directory holds it whole)."""
        for name in list(self.trackers):
            trk = self.trackers[name]
            try:
                if name == "wandb":
                    trk.log_table(key, dataframe=df.reset_index(drop=True))
                elif name == "tensorboard":
                    trk.tracker.add_text(key, _markdown_table(df), global_step=0)
                    trk.tracker.flush()
                elif name == "mlflow":
                    import mlflow

                    mlflow.log_table(data=df.reset_index(drop=True), artifact_file=f"tables/{key}.json")
            except Exception as exc:
                self._fail(name, exc, "log_table failed")

    def log_images(self, images: dict[str, str]) -> None:
        """PNG files (key -> path): wandb.Image, TensorBoard images, MLflow artifacts; other trackers skip them."""
        for name in list(self.trackers):
            trk = self.trackers[name]
            try:
                if name == "wandb":
                    import wandb

                    trk.tracker.log({k: wandb.Image(str(v)) for k, v in images.items()})
                elif name == "tensorboard":
                    from matplotlib.image import imread

                    for k, v in images.items():
                        trk.tracker.add_image(k, imread(str(v))[..., :3], global_step=0, dataformats="HWC")
                    trk.tracker.flush()
                elif name == "mlflow":
                    for v in images.values():
                        trk.log_artifact(str(v), artifact_path="figures")
            except Exception as exc:
                self._fail(name, exc, "log_images failed")

    def summary(self, values: dict[str, Any]) -> None:
        """Summary metrics of the stage (also written to metrics.jsonl as a `summary` record): the W&B run summary;
        for the other trackers numbers as scalars at step 0 (TensorBoard also takes the verdicts as text)."""
        if not self.is_main:
            return
        self._write({"time": time.time(), "job_type": self.job_type, "record": "summary", **values})
        for name in list(self.trackers):
            trk = self.trackers[name]
            try:
                if name == "wandb":
                    for k, v in values.items():
                        trk.tracker.summary[k] = v
                    continue
                keep = {k: (float(v) if _is_number(v) else v) for k, v in values.items()
                        if _is_number(v) and math.isfinite(float(v)) or name == "tensorboard" and isinstance(v, str)}
                if keep:
                    trk.log(keep, step=0)
            except Exception as exc:
                self._fail(name, exc, "summary failed")

    def finish(self) -> None:
        """Close every tracker's run and say how to sync an offline W&B one."""
        _OPEN.discard(self)
        for name in list(self.trackers):
            try:
                self.trackers[name].finish()
            except Exception as exc:
                self._fail(name, exc, "finish failed")
        if self.offline_dir and "wandb" in self.trackers:
            print(f"W&B offline run saved; upload it with: wandb sync {self.offline_dir}")
        self.trackers = {}
        self.offline_dir = None

    def _write(self, record: dict) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")

    def _fail(self, name: str, exc: Exception, what: str) -> None:
        self.trackers.pop(name, None)
        if name == "wandb":
            self.offline_dir = None
        setup = self._setups.get(name, (name,))
        if setup in _FAILED:
            return
        _FAILED.add(setup)
        first = str(exc).splitlines()[0] if str(exc) else ""
        label = LABELS.get(name, name)
        hint = ("Set WANDB_MODE=offline to keep an offline W&B run, or drop wandb from tracking.backends to silence "
                "this." if name == "wandb" else f"Drop {name} from tracking.backends to silence this.")
        warnings.warn(f"{label} {what} ({type(exc).__name__}: {first}); {label} is off for the rest of this process "
                      f"and the run continues with local files only ({self.jsonl}) and any other tracker. {hint}",
                      stacklevel=3)


def _flat_params(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as flat `section.key` hyperparameters of plain types (what every tracker accepts)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def _markdown_table(df) -> str:
    """The first TABLE_ROWS rows of a DataFrame as a markdown table (TensorBoard's text tab renders it)."""
    head = df.head(TABLE_ROWS)
    cols = [str(c) for c in head.columns]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        s = str(v).replace("|", "/").replace("\n", " ")
        return s if len(s) <= 60 else s[:57] + "..."

    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in head.itertuples(index=False)]
    if len(df) > len(head):
        rows.append(f"\n(first {len(head)} of {len(df)} rows; the whole table is in the run directory)")
    return "\n".join(rows)


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
