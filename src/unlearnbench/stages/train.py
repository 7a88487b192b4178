"""The train stage: `original` (train pool + forget sets with repetitions), `oracle` (train pool only) and
optional shadow models (train pool + a random half of the forget examples), each saved under `models/<name>`.

A plain Accelerate loop: the same code runs on one process, DDP, DeepSpeed and FSDP. The global batch is fixed
by config; each step's examples are a function of (seed, step) only, so runs with different process counts
see the same batches and a resumed run continues exactly where it stopped.

How several processes share the models is decided here, once (`parallel_mode`): job-parallel (`jobs`: each
process trains whole models on its own device, no collective inside a model's loop, bit-identical to training
that model in a 1-process run) or data-parallel (`data`: every model on all processes, gradients all-reduced).
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
from unlearnbench import integrity, interrupt
from unlearnbench.config import Config
from unlearnbench.data.build import load_examples, load_tokenizer
from unlearnbench.distributed import configure_deepspeed_batch, is_sharded, peak_memory_mib
from unlearnbench.errors import UserError
from unlearnbench.io import write_json
from unlearnbench.models import build_model, model_dir, n_params, save_local_model, save_model
from unlearnbench.records import clear_outputs, finish_stage, require, should_run
from unlearnbench.rundir import Context
from unlearnbench.tracking import open_tracker

NAME = "train"


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


def parallel_rule(choice: str, processes: int, untrained: int, sharded: bool) -> str:
    """`jobs` (job-parallel: each process trains whole models alone) or `data` (every model on all processes).

    Auto rule: job-parallel when there are several processes, at least as many untrained models as processes, and
    the launch does not shard the model (no DeepSpeed ZeRO, no FSDP); data-parallel otherwise. A forced `jobs`
    with a sharded launch is refused; with one process both modes are the same loop, reported as `data`.
    """
    if choice == "jobs" and sharded:
        raise UserError("train.parallel=jobs trains each model whole on one device, but this launch shards the "
                        "model (DeepSpeed ZeRO or FSDP). Use train.parallel=data (or auto), or launch with a DDP "
                        "accelerate config (accelerate_configs/cpu_ddp.yaml, multi_gpu.yaml).")
    if choice != "auto":
        return choice if processes > 1 else "data"
    return "jobs" if processes > 1 and untrained >= processes and not sharded else "data"


def parallel_mode(acc, choice: str, untrained: int) -> str:
    """`parallel_rule` for this launch. fp16 needs accelerate's gradient scaler, which only the data path has:
    auto picks `data` there and a forced `jobs` is refused."""
    sharded = is_sharded(acc)
    if getattr(acc, "mixed_precision", "no") == "fp16":
        if choice == "jobs" and acc.num_processes > 1:
            raise UserError("train.parallel=jobs does not support mixed_precision fp16 (it needs accelerate's "
                            "gradient scaler). Use bf16 or no mixed precision, or train.parallel=data.")
        sharded = True  # not sharded, but the same answer: every model data-parallel
    return parallel_rule(choice, acc.num_processes, untrained, sharded)


def run(ctx: Context) -> None:
    """Train original and oracle (and K shadow models), resuming from checkpoints."""
    require(ctx, "prepare")
    if not should_run(ctx, NAME):
        return
    if ctx.force:
        clear_outputs(ctx, NAME)
    acc = ctx.acc
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    masks = shadow_masks(examples, ctx.cfg.score.shadow_models, ctx.cfg.run.seed) if ctx.cfg.score.shadow_models else []
    if masks and ctx.is_main:
        write_json(ctx.run_dir / "models" / "shadow_masks.json", masks)
    # train.oracle=false (no-oracle mode): no θᵣ; the score stage takes e_r from held-out references instead
    names = ["original"] + (["oracle"] if ctx.cfg.train.oracle else []) + [f"shadow_{j}" for j in range(len(masks))]
    todo = []
    for name in names:
        if (ctx.run_dir / "models" / name / "config.json").exists():
            acc.print(f"[train] {name}: already trained, skipping")
        else:
            todo.append(name)
    acc.wait_for_everyone()  # every process has listed the untrained models before any of them is written
    mode = parallel_mode(acc, ctx.cfg.train.parallel, len(todo))
    job_parallel = mode == "jobs"
    # job-parallel: each process logs its own models' curves to metrics.jsonl; W&B stays on the main process
    trk = open_tracker(ctx, NAME, job_parallel=job_parallel)
    if todo:
        acc.print(f"[train] {len(todo)} model(s) to train, "
                  + (f"job-parallel: each of {acc.num_processes} processes trains whole models on its own device"
                     if job_parallel else f"data-parallel over {acc.num_processes} process(es)"))
    mine = todo[acc.process_index::acc.num_processes] if job_parallel else todo  # untrained model i: process i mod N
    infos = {}
    for name in mine:
        mask = masks[int(name.split("_")[1])] if name.startswith("shadow_") else None
        offset = 1000 + int(name.split("_")[1]) if mask is not None else 0
        # a stop (SIGINT / SIGTERM) is taken after an optimizer step: checkpoint, then `Interrupted` (interrupt.py)
        with interrupt.safe_points(acc, collective=not job_parallel, stage="train", what=name):
            infos[name] = train_model(acc, ctx.cfg, ctx.run_dir, name, examples, tok, trk, mask, offset,
                                      job_parallel=job_parallel)
    trk.finish()
    acc.wait_for_everyone()  # only once every process has finished its models
    if job_parallel:
        from accelerate.utils import gather_object

        merged = {k: v for part in gather_object([infos]) for k, v in part.items()}
        infos = {name: merged[name] for name in names if name in merged}
    ckpts = ctx.run_dir / "checkpoints"
    if ctx.is_main and ckpts.is_dir() and not any(ckpts.iterdir()):
        ckpts.rmdir()  # every model's checkpoints went once it was saved and verified (train.keep_checkpoints=0)
    flops = float(sum(i.get("flops", 0.0) for i in infos.values()))
    finish_stage(ctx, NAME, {"models": infos, "parallel": mode, "flops": flops, **peak_memory_mib()})


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


def train_model(acc, cfg: Config, run_dir: Path, name: str, examples, tokenizer, tracker=None,
                shadow_mask: dict | None = None, seed_offset: int = 0, job_parallel: bool = False) -> dict:
    """Train one model of the study and save it under `models/<name>` with its tokenizer.

    `job_parallel`: this process trains the model alone on its own device: no wrapper, no collective, its
    own checkpoints and files; the same per-step arithmetic as the 1-process data path, so the same weights.
    """
    t = cfg.train
    seed = cfg.run.seed + seed_offset
    rows = mixture(examples, name if shadow_mask is None else "oracle", shadow_mask)
    all_ids = list(examples["input_ids"])  # plain lists: lazy column lookups cost ~0.2 ms each
    lengths = np.array([len(x) for x in all_ids])[rows]
    if len(rows) < t.batch_size:
        raise UserError(f"The training mixture of '{name}' has {len(rows)} sequences, fewer than one batch "
                        f"(train.batch_size={t.batch_size}). Lower the batch size or add data.")
    world, rank = (1, 0) if job_parallel else (acc.num_processes, acc.process_index)
    micro, accum = batch_geometry(t.batch_size, t.micro_batch_size, world)
    model, opt, sched = _build(acc, cfg, tokenizer, seed, micro, accum, job_parallel)
    ckpt_root = Path(run_dir) / "checkpoints" / name
    say = (lambda msg: print(msg, flush=True)) if job_parallel else acc.print
    start = _resume(acc, model, opt, sched, ckpt_root, name, say, job_parallel)
    stream = training_schedule(lengths, t.batch_size, seed, t.length_grouping)
    for _ in range(start):
        next(stream)
    info = {"model": name, "params": n_params(model if job_parallel else acc.unwrap_model(model)), "steps": t.steps,
            "batch_size": t.batch_size, "micro_batch_size": micro, "grad_accum": accum, "num_processes": world,
            "sequences": len(rows)}
    if job_parallel:
        info["process_index"] = acc.process_index
    say(f"[train] {name}: {info['params']:,} parameters, {len(rows)} sequences, effective batch "
        f"{t.batch_size} = {micro} x {accum} accumulation x {world} processes, {t.steps} steps"
        + (f" (job-parallel, process {acc.process_index})" if job_parallel else ""))
    model.train()
    bar = tqdm(total=t.steps, initial=start, desc=f"train {name}", disable=not acc.is_main_process, leave=False)
    t0, tokens, loss_acc, trained_tokens = time.perf_counter(), 0, 0.0, 0
    pad = tokenizer.pad_token_id or 0
    for step in range(start, t.steps):
        batch = next(stream)
        global_tokens = int(sum(lengths[i] - 1 for i in batch))
        trained_tokens += global_tokens
        seqs = [[all_ids[rows[i]] for i in mb] for mb in shard_batch(batch, lengths, rank, world, micro)]
        step_loss, step_tokens = _train_step(acc, model, opt, seqs, pad, global_tokens, accum, t.grad_clip,
                                             job_parallel)
        tokens += step_tokens
        sched.step()
        loss_acc += step_loss
        bar.update(1)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            _log_progress(acc, tracker, bar, name, step, start, t.log_every, sched, loss_acc, tokens,
                          time.perf_counter() - t0, job_parallel)
            loss_acc = 0.0
        if (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
            _save_checkpoint(acc, model, opt, ckpt_root, step + 1, max(1, t.keep_checkpoints), job_parallel)
        # Safe point: every rank of a data-parallel model agrees (one scalar all-reduce); job-parallel asks itself.
        # After the last step the model is saved first (the stop is taken when train_model returns).
        if step + 1 < t.steps and interrupt.should_stop(acc, collective=not job_parallel):
            path = ckpt_root / f"step_{step + 1:07d}"
            if (step + 1) % t.checkpoint_every:  # not written just above
                _save_checkpoint(acc, model, opt, ckpt_root, step + 1, max(1, t.keep_checkpoints), job_parallel)
            bar.close()
            raise interrupt.Interrupted(stage="train", step=step + 1, checkpoint=path, what=name, local=job_parallel)
    bar.close()
    info["train_seconds"] = time.perf_counter() - t0
    # Estimated FLOPs of the steps this invocation ran (all of them unless it resumed): 6N per trained token
    # (forward 2N, backward 4N), the attention's sequence-length term left out, as for the unlearning requests.
    info["tokens_trained"] = trained_tokens
    info["flops"] = float(6 * info["params"] * trained_tokens)
    _save_trained(acc, model, tokenizer, Path(run_dir), name, ckpt_root, cfg.train.keep_checkpoints, job_parallel)
    if job_parallel:
        say(f"[train] {name}: trained in {info['train_seconds']:.1f}s (process {acc.process_index})")
    return info


def _build(acc, cfg: Config, tokenizer, seed: int, micro: int, accum: int, job_parallel: bool):
    """The model, its AdamW optimizer and learning-rate schedule, prepared for this launch (moved to this
    process's device when `job_parallel`)."""
    t = cfg.train
    if not job_parallel:  # before the model is built: a ZeRO-3 from_pretrained reads the DeepSpeed config
        acc.gradient_accumulation_steps = accum
        configure_deepspeed_batch(acc, micro, accum, t.grad_clip)
    model = build_model(cfg, len(tokenizer), seed, tokenizer.bos_token_id, tokenizer.pad_token_id)
    model.config.use_cache = False
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))
    if job_parallel:
        model = model.to(acc.device)  # the optimizer keeps the same Parameter objects
    else:
        model, opt = acc.prepare(model, opt)
    # The scheduler is stepped by hand (accelerate's wrapper steps it once per process) and is not registered for
    # checkpointing: accelerate reloads custom objects unpickled (weights_only=False). Its state is the step.
    return model, opt, sched


def _resume(acc, model, opt, sched, ckpt_root: Path, name: str, say, job_parallel: bool) -> int:
    """Load the newest complete checkpoint, if any, and step the schedule to it; returns the step to start at."""
    latest = integrity.latest_checkpoint(ckpt_root, "train")  # a damaged one is reported, never resumed from
    if latest is None:
        return 0
    if job_parallel:
        _load_local_checkpoint(model, opt, latest[0])
    else:
        acc.load_state(str(latest[0]))
    start = latest[1]
    for _ in range(start):
        sched.step()
    say(f"[train] {name}: resuming from step {start} ({latest[0]})")
    return start


def _train_step(acc, model, opt, micro_batches: list[list], pad: int, global_tokens: int, accum: int,
                grad_clip: float, job_parallel: bool) -> tuple[float, int]:
    """One optimizer step over this process's micro-batches (token id lists); returns the step's loss (summed
    NLL of this process over the global token count) and the tokens it computed (padding excluded)."""
    step_loss, tokens = 0.0, 0
    for k, seqs in enumerate(micro_batches):
        b = collate(seqs, [1] * len(seqs), [len(s) for s in seqs], pad)
        b = {key: v.to(acc.device) for key, v in b.items()}
        if job_parallel:
            nll_sum = _local_micro_step(acc, model, opt, b, global_tokens, accum, grad_clip,
                                        last=k == len(micro_batches) - 1)
        else:
            with acc.accumulate(model):
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                logp, mask = token_logprobs(out.logits, b["labels"])
                nll_sum = -(logp * mask).sum()
                # Sum over this shard / global token count, scaled back up for the gradient averaging of DDP
                # (over processes) and accumulation (over micro-batches): the step's gradient is the global mean.
                loss = nll_sum / global_tokens * acc.num_processes * accum
                acc.backward(loss)
                if acc.sync_gradients and grad_clip > 0 and not acc.state.deepspeed_plugin:
                    acc.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        step_loss += float(nll_sum.detach()) / global_tokens
        tokens += int(b["attention_mask"].sum())
    return step_loss, tokens


def _log_progress(acc, tracker, bar, name: str, step: int, start: int, log_every: int, sched, loss_acc: float,
                  tokens: int, elapsed: float, job_parallel: bool) -> None:
    """Log the mean loss of the steps since the last log, the learning rate and the throughput (over processes
    for a data-parallel model)."""
    if job_parallel:
        total_loss, tok_s = loss_acc, tokens / elapsed
    else:
        total_loss = acc.reduce(torch.tensor(loss_acc, device=acc.device), reduction="sum").item()
        tok_s = acc.reduce(torch.tensor(float(tokens), device=acc.device), reduction="sum").item() / elapsed
    n_logged = min((step + 1) % log_every or log_every, step + 1 - start)  # fewer after a resume
    if tracker is not None:
        tracker.log({f"train/{name}/loss": total_loss / n_logged, f"train/{name}/lr": sched.get_last_lr()[0],
                     f"train/{name}/tokens_per_s": tok_s}, step=step + 1, model=name)
    bar.set_postfix(loss=f"{total_loss / n_logged:.3f}", tok_s=f"{tok_s:,.0f}")


def _save_checkpoint(acc, model, opt, ckpt_root: Path, step: int, keep: int, job_parallel: bool) -> None:
    """A checkpoint at `step`: job-parallel on this process alone, data-parallel through accelerate."""
    if job_parallel:
        _local_checkpoint(model, opt, ckpt_root, step, keep)
    else:
        _checkpoint(acc, ckpt_root, step, keep)


def _save_trained(acc, model, tokenizer, run_dir: Path, name: str, ckpt_root: Path, keep: int,
                  job_parallel: bool) -> None:
    """Save the trained model with its tokenizer, read it back whole, and only then prune its checkpoints."""
    if job_parallel:
        save_local_model(model, tokenizer, model_dir(run_dir, name))
        verify_saved_model(model_dir(run_dir, name))
        prune_checkpoints(ckpt_root, keep)  # only once the model is saved and verified
        return
    save_model(acc, model, tokenizer, model_dir(run_dir, name))
    acc.wait_for_everyone()
    if acc.is_main_process:
        verify_saved_model(model_dir(run_dir, name))
        prune_checkpoints(ckpt_root, keep)  # only once the model is saved and verified
    acc.free_memory()


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints under `ckpt_root` (0: remove them all, and the folder)."""
    steps = sorted(ckpt_root.glob("step_*")) if ckpt_root.exists() else []
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    if keep == 0 and ckpt_root.exists():
        shutil.rmtree(ckpt_root, ignore_errors=True)


def verify_saved_model(path: Path) -> None:
    """The saved model reads back whole (every tensor of every safetensors file) before its checkpoints go."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"The trained model at {path} has no safetensors file after saving; its checkpoints are kept. "
                        "Check the disk (space, quota) and rerun `unlearnbench train` to resume from them.")
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                fh.get_tensor(key)


def _local_micro_step(acc, model, opt, b: dict, global_tokens: int, accum: int, grad_clip: float,
                      last: bool) -> torch.Tensor:
    """One micro-batch of a job-parallel step: what the 1-process data path computes, op for op (accelerate's
    autocast around the forward, `backward` dividing by the accumulation steps, then torch's clipping and the
    optimizer step on the last micro-batch), with no collective. Returns the micro-batch's summed NLL."""
    with acc.autocast():  # a no-op without mixed precision; bf16 as accelerate wraps a prepared model's forward
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    logp, mask = token_logprobs(out.logits, b["labels"])
    nll_sum = -(logp * mask).sum()
    loss = nll_sum / global_tokens * accum  # the data path with one process (x * 1 is exact)
    (loss / accum).backward()
    if last:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return nll_sum


def _checkpoint(acc, ckpt_root: Path, step: int, keep: int = 1) -> None:
    path = ckpt_root / f"step_{step:07d}"
    acc.save_state(str(path))
    acc.wait_for_everyone()
    if acc.is_main_process:
        integrity.mark_complete(path, step)  # written last, with sizes and checksums: only complete checkpoints count
        prune_checkpoints(ckpt_root, keep)
    acc.wait_for_everyone()


# Job-parallel checkpoints use accelerate's file names for a DDP / 1-process launch (`model.safetensors`,
# `optimizer.bin`), so either mode resumes the other's checkpoint (a run killed in one mode and relaunched with a
# process count that selects the other). DeepSpeed checkpoints are engine directories: only DeepSpeed reads them.
_WEIGHTS, _OPTIMIZER = "model.safetensors", "optimizer.bin"


def _local_checkpoint(model, opt, ckpt_root: Path, step: int, keep: int = 1) -> None:
    """Save a job-parallel model's weights (safetensors) and optimizer state (torch.save of plain tensors and
    numbers, read back with weights_only=True); `complete.json` last, then older checkpoints go."""
    from safetensors.torch import save_model as save_safetensors

    path = ckpt_root / f"step_{step:07d}"
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, str(path / _WEIGHTS), metadata={"format": "pt"})  # drops the tied lm_head copy
    torch.save(opt.state_dict(), path / _OPTIMIZER)
    integrity.mark_complete(path, step)  # written last, with sizes and checksums: only complete checkpoints count
    prune_checkpoints(ckpt_root, keep)


def _load_local_checkpoint(model, opt, path: Path) -> None:
    from accelerate.utils import load as safe_torch_load  # torch.load with weights_only=True, as accelerate reads it
    from safetensors.torch import load_model as load_safetensors

    if not (path / _WEIGHTS).exists() or not (path / _OPTIMIZER).exists():
        raise UserError(f"The checkpoint {path} was not written by a DDP or 1-process launch (a DeepSpeed checkpoint?), "
                        "so job-parallel training cannot resume it. Relaunch with the accelerate config that wrote it "
                        f"and train.parallel=data, or delete {path.parent} to train this model from the start.")
    device = next(model.parameters()).device
    load_safetensors(model, str(path / _WEIGHTS), device=str(device))
    opt.load_state_dict(safe_torch_load(path / _OPTIMIZER, map_location="cpu", weights_only=True))
