"""The train stage: `original` (train pool + forget sets with repetitions), `oracle` (train pool only) and
optional shadow models (train pool + a random half of the forget examples), each saved under `models/<name>`.

A plain Accelerate loop: the same code runs on one process, DDP, DeepSpeed and FSDP. The global batch is fixed
by config; each step's examples are a function of (seed, step) only, so runs with different process counts
see the same batches and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unlearnbench.batching import collate, shard_batch, token_logprobs, training_schedule
from unlearnbench.config import Config
from unlearnbench.data.build import load_examples, load_tokenizer
from unlearnbench.distributed import configure_deepspeed_batch, peak_memory_mib
from unlearnbench.errors import UserError
from unlearnbench.io import read_json, write_json
from unlearnbench.models import build_model, model_dir, n_params, save_model
from unlearnbench.rundir import Context, clear_outputs, finish_stage, require, should_run
from unlearnbench.tracking import open_tracker

NAME = "train"
OUTPUTS = ("models", "checkpoints")
SECTIONS = ("data", "model", "train", "run.seed", "score.shadow_models")


def shadow_masks(examples, k: int, seed: int) -> list[dict]:
    """For each forget example, a random half of the K shadow models train on it."""
    rng = np.random.default_rng([seed, 7919])
    ids = [e for e, s in zip(examples["example_id"], examples["split"]) if s == "forget"]
    masks = [dict() for _ in range(k)]
    for eid in ids:
        chosen = set(rng.permutation(k)[: k // 2].tolist()) if k > 1 else {int(rng.integers(0, 2)) - 1}
        for j in range(k):
            masks[j][eid] = j in chosen
    return masks


def run(ctx: Context) -> None:
    """Train original and oracle (and K shadow models), resuming from checkpoints."""
    require(ctx, "prepare")
    if not should_run(ctx, NAME):
        return
    if ctx.force:
        clear_outputs(ctx, NAME)
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    trk = open_tracker(ctx, NAME)
    infos = {}
    names = ["original", "oracle"]
    masks = shadow_masks(examples, ctx.cfg.score.shadow_models, ctx.cfg.run.seed) if ctx.cfg.score.shadow_models else []
    if masks and ctx.is_main:
        write_json(ctx.run_dir / "models" / "shadow_masks.json", masks)
    for name in names + [f"shadow_{j}" for j in range(len(masks))]:
        if (ctx.run_dir / "models" / name / "config.json").exists():
            ctx.acc.print(f"[train] {name}: already trained, skipping")
            continue
        mask = masks[int(name.split("_")[1])] if name.startswith("shadow_") else None
        offset = 1000 + int(name.split("_")[1]) if mask is not None else 0
        infos[name] = train_model(ctx.acc, ctx.cfg, ctx.run_dir, name, examples, tok, trk, mask, offset)
    trk.finish()
    finish_stage(ctx, NAME, {"models": infos, **peak_memory_mib()})


def mixture(examples, model_name: str, shadow_mask: dict | None = None) -> list[int]:
    """Row indices of the training mixture of a model, each forget example repeated `repetitions` times."""
    if model_name == "original":
        flag = np.asarray(examples["in_original"])
    else:
        flag = np.asarray(examples["in_oracle"])
    reps = np.maximum(np.asarray(examples["repetitions"]), 1)
    rows = np.nonzero(flag)[0].tolist()
    if shadow_mask is not None:  # shadow models: the train pool plus a random half of the forget examples
        ids = examples["example_id"]
        rows += [i for i, eid in enumerate(ids) if shadow_mask.get(eid, False)]
    out: list[int] = []
    for i in rows:
        out += [i] * int(reps[i])
    return out


def batch_geometry(cfg_batch: int, micro: int | None, world: int) -> tuple[int, int]:
    """(micro batch per device, accumulation steps) for a fixed effective batch."""
    if cfg_batch % world:
        raise UserError(f"The effective batch size {cfg_batch} is not divisible by the {world} processes. "
                        f"Choose a batch size that is a multiple of {world}.")
    per_rank = cfg_batch // world
    micro = micro or per_rank
    if per_rank % micro:
        raise UserError(f"Per-process batch {per_rank} (= batch_size / processes) is not a multiple of "
                        f"micro_batch_size={micro}. Pick a micro batch that divides it.")
    return micro, per_rank // micro


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up, then cosine decay to `min_ratio` of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _latest_checkpoint(ckpt_root: Path) -> tuple[Path, int] | None:
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "complete.json").exists())
    if not done:
        return None
    return done[-1], read_json(done[-1] / "complete.json")["step"]


def train_model(acc, cfg: Config, run_dir: Path, name: str, examples, tokenizer, tracker=None,
                shadow_mask: dict | None = None, seed_offset: int = 0) -> dict:
    """Train one model of the study and save it under `models/<name>` with its tokenizer."""
    t = cfg.train
    seed = cfg.run.seed + seed_offset
    rows = mixture(examples, name if shadow_mask is None else "oracle", shadow_mask)
    all_ids = list(examples["input_ids"])  # plain lists: lazy column lookups cost ~0.2 ms each
    lengths_all = np.array([len(x) for x in all_ids])
    lengths = lengths_all[rows]
    if len(rows) < t.batch_size:
        raise UserError(f"The training mixture of '{name}' has {len(rows)} sequences, fewer than one batch "
                        f"(train.batch_size={t.batch_size}). Lower the batch size or add data.")
    micro, accum = batch_geometry(t.batch_size, t.micro_batch_size, acc.num_processes)
    acc.gradient_accumulation_steps = accum
    configure_deepspeed_batch(acc, micro, accum, t.grad_clip)
    model = build_model(cfg, len(tokenizer), seed)
    model.config.use_cache = False
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))
    model, opt = acc.prepare(model, opt)
    # The scheduler is stepped by hand (accelerate's wrapper steps it once per process) and is not registered for
    # checkpointing: accelerate reloads custom objects unpickled (weights_only=False). Its state is the step.
    ckpt_root = Path(run_dir) / "checkpoints" / name
    start = 0
    latest = _latest_checkpoint(ckpt_root)
    if latest is not None:
        acc.load_state(str(latest[0]))
        start = latest[1]
        for _ in range(start):
            sched.step()
        acc.print(f"[train] {name}: resuming from step {start} ({latest[0]})")
    stream = training_schedule(lengths, t.batch_size, seed, t.length_grouping)
    for _ in range(start):
        next(stream)
    info = {"model": name, "params": n_params(acc.unwrap_model(model)), "steps": t.steps, "batch_size": t.batch_size,
            "micro_batch_size": micro, "grad_accum": accum, "num_processes": acc.num_processes,
            "sequences": len(rows)}
    acc.print(f"[train] {name}: {info['params']:,} parameters, {len(rows)} sequences, effective batch "
              f"{t.batch_size} = {micro} x {accum} accumulation x {acc.num_processes} processes, {t.steps} steps")
    model.train()
    bar = tqdm(total=t.steps, initial=start, desc=f"train {name}", disable=not acc.is_main_process, leave=False)
    t0, tokens, loss_acc = time.perf_counter(), 0, 0.0
    for step in range(start, t.steps):
        batch = next(stream)
        global_tokens = int(sum(lengths[i] - 1 for i in batch))
        micro_batches = shard_batch(batch, lengths, acc.process_index, acc.num_processes, micro)
        step_loss = 0.0
        for mb in micro_batches:
            seqs = [all_ids[rows[i]] for i in mb]
            b = collate(seqs, [1] * len(seqs), [len(s) for s in seqs], tokenizer.pad_token_id or 0)
            b = {k: v.to(acc.device) for k, v in b.items()}
            with acc.accumulate(model):
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                logp, mask = token_logprobs(out.logits, b["labels"])
                nll_sum = -(logp * mask).sum()
                # Sum over this shard / global token count, scaled back up for the gradient averaging of DDP
                # (over processes) and accumulation (over micro-batches): the step's gradient is the global mean.
                loss = nll_sum / global_tokens * acc.num_processes * accum
                acc.backward(loss)
                if acc.sync_gradients and t.grad_clip > 0 and not acc.state.deepspeed_plugin:
                    acc.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step_loss += float(nll_sum.detach()) / global_tokens
            tokens += int(b["attention_mask"].sum())
        sched.step()
        loss_acc += step_loss
        bar.update(1)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            total_loss = acc.reduce(torch.tensor(loss_acc, device=acc.device), reduction="sum").item()
            elapsed = time.perf_counter() - t0
            tok_s = acc.reduce(torch.tensor(float(tokens), device=acc.device), reduction="sum").item() / elapsed
            n_logged = (step + 1) % t.log_every or t.log_every
            if tracker is not None:
                tracker.log({f"train/{name}/loss": total_loss / n_logged, f"train/{name}/lr": sched.get_last_lr()[0],
                             f"train/{name}/tokens_per_s": tok_s}, step=step + 1, model=name)
            bar.set_postfix(loss=f"{total_loss / n_logged:.3f}", tok_s=f"{tok_s:,.0f}")
            loss_acc = 0.0
        if (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
            _checkpoint(acc, ckpt_root, step + 1)
    bar.close()
    info["train_seconds"] = time.perf_counter() - t0
    save_model(acc, model, tokenizer, model_dir(run_dir, name))
    acc.wait_for_everyone()
    if acc.is_main_process and ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    acc.free_memory()
    return info


def _checkpoint(acc, ckpt_root: Path, step: int) -> None:
    path = ckpt_root / f"step_{step:07d}"
    acc.save_state(str(path))
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json(path / "complete.json", {"step": step})  # written last: only complete checkpoints count
        for old in ckpt_root.glob("step_*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
