"""The checkpoint of an interrupted forget request: `unlearn/<request>/checkpoint/step_<N>/` (docs/outputs.md).

Written between two steps on SIGINT / SIGTERM, read by the next run of the same request, removed once its result is
written. It holds what the request needs to go on to the same numbers: the trained parameters and optimizer, the
scheduler and RNG, the loop's counters, curve rows and trajectories so far, and the evaluator's and the stopping
rule's states as their `state_dict()` gave them. A checkpoint is only a resume aid: one this run cannot use is
reported and the request starts again from θ₀.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from unlearnbench import integrity
from unlearnbench.config import Config
from unlearnbench.io import write_parquet, write_text
from unlearnbench.unlearn.state import StepResult, Unlearner
from unlearnbench.unlearn.worker import Worker

CHECKPOINT = "checkpoint"  # unlearn/<request>/checkpoint/step_<N>/: written on SIGINT / SIGTERM, gone once done
# of loop.json. 3: the window's steps say `collapsed` (was `diverged`) and the layout `job_parallel` (was `local`);
# 2: the evaluator's and stopping rule's state_dict; 1 (no "format" key) kept the evaluator's last scores in
# last_scores.parquet
FORMAT = 3


def checkpoint_identity(cfg: Config, worker: Worker) -> dict:
    """What a request checkpoint must share with the run resuming it: the unlearn stage's fingerprint (every
    setting the trajectory depends on) and the process layout (job-parallel or not, and how many ranks)."""
    from unlearnbench.records import stage_fingerprint

    return {"fingerprint": stage_fingerprint(cfg, "unlearn"), "job_parallel": bool(worker.job_parallel),
            "world": 1 if worker.job_parallel else int(worker.acc.num_processes)}


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _rng_file(path: Path, w: Worker) -> Path:
    return path / (f"rng_{w.acc.process_index}.pt" if not w.job_parallel else "rng.pt")


def save_request_checkpoint(out_dir: Path, u: Unlearner, state: dict) -> Path:
    """Write the request's state after `state["step"]` steps under `<out_dir>/checkpoint/step_<N>`: trained
    parameters and optimizer (a DDP or 1-process model: the trainable parameters as safetensors, whatever a LoRA
    adapter or a full model trains; ZeRO / FSDP: accelerate's sharded state), scheduler, RNG, and `state` (the
    loop's counters, its curve rows, trajectories and steps since the last evaluation, and the plain `evaluator`
    and `rule` states). `complete.json` last (sizes and checksums), then older request checkpoints go. Every rank of
    a data-parallel request calls it."""
    from safetensors.torch import save_file

    w, acc = u.worker, u.worker.acc
    root = out_dir / CHECKPOINT
    path = root / f"step_{int(state['step']):07d}"
    if w.writes:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    if not w.job_parallel:
        acc.wait_for_everyone()
    if w.sharded:
        acc.save_state(str(path / "state"))
    elif w.writes:
        model = u.model if w.job_parallel else acc.unwrap_model(u.model)
        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
                  str(path / "trainable.safetensors"), metadata={"format": "pt"})
        torch.save(u.opt.state_dict(), path / "optimizer.bin")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, _rng_file(path, w))
    if w.writes:
        torch.save({"scheduler": u.sched.state_dict()}, path / "scheduler.pt")
        loop = {k: v for k, v in state.items() if k not in ("trajs", "window")}
        loop.update(format=FORMAT, window=[dataclasses.asdict(r) for r in state["window"]],
                    n_trajs=len(state["trajs"]), sharded=w.sharded, **checkpoint_identity(u.cfg, w))
        write_text(path / "loop.json", json.dumps(loop, default=_json_default, indent=1) + "\n")  # NaN kept as NaN
        if state["trajs"]:
            write_parquet(path / "trajectory.parquet", pd.concat(
                [t.assign(_eval=i) for i, t in enumerate(state["trajs"])], ignore_index=True))
    if not w.job_parallel:
        acc.wait_for_everyone()
    if w.writes:
        integrity.mark_complete(path, int(state["step"]))
        for old in root.glob("step_*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    if not w.job_parallel:
        acc.wait_for_everyone()
    return path


def _unusable(loop: dict, u: Unlearner) -> str | None:
    """Why this run cannot resume from a checkpoint whose loop state is `loop`, when it cannot: it was written by
    an older version, for another config or for another process layout."""
    if loop.get("format") != FORMAT:
        return (f"it was written by an older unlearnbench (checkpoint format {loop.get('format', 1)}; this version "
                f"reads format {FORMAT})")
    # an interrupted stage has no record to compare: a checkpoint of another config (lr, method, LoRA) or process
    # layout would resume the wrong trajectory, or fail to load
    changed = [k for k, v in checkpoint_identity(u.cfg, u.worker).items() if loop.get(k) != v]
    if changed:
        return "it was written for another " + ("config" if "fingerprint" in changed
                                                 else "process layout (" + ", ".join(changed) + ")")
    return None


def load_request_checkpoint(out_dir: Path, u: Unlearner) -> dict | None:
    """Restore the newest complete request checkpoint into the freshly set-up `u` (parameters, optimizer, scheduler,
    RNG); the state it saved (with "path", the window as `StepResult`s and the trajectories as tables; `evaluator`
    and `rule` for their `load_state_dict`), or None when there is none to resume from (the request starts at
    step 0). An unusable checkpoint is reported and removed."""
    from accelerate.utils import load as safe_torch_load  # torch.load with weights_only=True, as accelerate reads it
    from safetensors.torch import load_file

    w, acc = u.worker, u.worker.acc
    say = (lambda msg: print(msg, flush=True)) if w.writes else (lambda msg: None)
    latest = integrity.latest_checkpoint(out_dir / CHECKPOINT, "unlearn", say)
    if latest is None:
        return None
    path = latest[0]
    loop = json.loads((path / "loop.json").read_text(encoding="utf-8"))
    why = _unusable(loop, u)
    if why is not None:
        say(f"[unlearn] not resuming from {path}: {why}; this request starts again from θ₀ and the checkpoint is "
            "removed (a request checkpoint is only a resume aid).")
        if not w.job_parallel:
            acc.wait_for_everyone()  # every rank has read it before it goes
        if w.writes:
            shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)
        return None
    if loop.get("sharded") != w.sharded:
        say(f"[unlearn] not resuming from {path}: it was written by a "
            f"{'sharded' if loop.get('sharded') else 'DDP or 1-process'} launch; this request starts again from θ₀.")
        return None
    if w.sharded:
        acc.load_state(str(path / "state"))
    else:
        model = u.model if w.job_parallel else acc.unwrap_model(u.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(path / "trainable.safetensors")).items():
                params[name].copy_(tensor.to(params[name].device))
        u.opt.load_state_dict(safe_torch_load(path / "optimizer.bin", map_location="cpu", weights_only=True))
    u.sched.load_state_dict(safe_torch_load(path / "scheduler.pt", weights_only=True)["scheduler"])
    if _rng_file(path, w).exists():
        rng = safe_torch_load(_rng_file(path, w), weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    trajs = []
    if loop["n_trajs"]:
        frame = pd.read_parquet(path / "trajectory.parquet")
        trajs = [frame[frame._eval == i].drop(columns="_eval").reset_index(drop=True) for i in range(loop["n_trajs"])]
    return {**loop, "trajs": trajs, "window": [StepResult(**r) for r in loop["window"]], "path": path}
