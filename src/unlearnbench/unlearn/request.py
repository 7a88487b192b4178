"""One forget request, in named parts: `Worker` (how this process takes part), `setup` (model, optimizer,
backend), `step` (one optimisation step, callable alone), `StopRule` (when to stop), `finish` (files and
result). `unlearn_request` strings them together in a loop that reads top to bottom.

At step 0 and on the evaluation schedule, the evaluator (`evaluation.RequestEvaluator`) scores the request's
examples, their references and the utility sets; the loop stops when the UQ target held for `patience`
evaluations, on divergence (non-finite loss, exploding gradient, perplexity past `max_ppl_ratio` x θ₀'s) or at
`max_steps`. Each finished request writes its files; `result.json` last, so a rerun skips finished requests.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from unlearnbench import interrupt, metrics
from unlearnbench.batching import collate, shard_batch, token_logprobs
from unlearnbench.config import Config
from unlearnbench.distributed import configure_deepspeed_batch, inference_model, zero_stage
from unlearnbench.evaluation import RequestEvaluator
from unlearnbench.io import write_json, write_parquet
from unlearnbench.models import load_trained, save_local_model, save_model
from unlearnbench.scoring import scored_logprobs, split_head
from unlearnbench.unlearn.methods import LossInputs, MethodParams, MethodSpec, get_method

_MANTISSAS = (1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.0)


def eval_steps(cfg: Config) -> list[int]:
    """Step 0, then log-spaced (1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, ...) or every k steps; always max_steps."""
    u = cfg.unlearn
    if u.eval_schedule == "every":
        steps = set(range(0, u.max_steps + 1, u.eval_every))
    else:
        steps = {0, 1, 2, 3, 4, 6, 8}
        decade = 10
        while decade <= u.max_steps:
            steps |= {int(round(m * decade)) for m in _MANTISSAS}
            decade *= 10
    steps.add(u.max_steps)
    return sorted(s for s in steps if s <= u.max_steps)


@dataclass
class Request:
    """A forget request: a named set of forget examples unlearned together from θ₀."""

    name: str
    example_ids: list[str]
    kind: str
    repetitions: int
    replicate: int = 0  # which of the data.replicates disjoint groups of its (kind, repetitions)


# ----------------------------------------------------------------------------------------------- worker


@dataclass
class Worker:
    """How this process takes part in a request: alone on its own model copy (`local`, request-parallel: no
    collective operation, it writes the request's files itself) or as one rank of a data-parallel group."""

    acc: Any
    local: bool

    @property
    def world(self) -> int:
        """Processes sharing this request's batches."""
        return 1 if self.local else self.acc.num_processes

    @property
    def rank(self) -> int:
        """This process's shard of each batch."""
        return 0 if self.local else self.acc.process_index

    @property
    def writes(self) -> bool:
        """Whether this process writes the request's files."""
        return self.local or self.acc.is_main_process

    def prepare(self, model, opt, micro_batch: int, grad_clip: float | None):
        """Move (local) or wrap (DDP / DeepSpeed / FSDP) the model and optimizer."""
        if self.local:
            return model.to(self.acc.device), opt
        configure_deepspeed_batch(self.acc, micro_batch, 1, grad_clip)
        self.acc.gradient_accumulation_steps = 1
        return self.acc.prepare(model, opt)

    def backward(self, loss: torch.Tensor) -> float:
        """Backpropagate; the step's loss summed over the ranks' contributions (each is a share of the global)."""
        if self.local:
            loss.backward()
            return float(loss.detach())
        self.acc.backward(loss)
        return self.acc.reduce(loss.detach().float().reshape(1), reduction="sum").item() / self.world

    def clip_grad_norm(self, model, clip: float | None) -> float:
        """Clip (when `clip`) and return the global gradient norm; DeepSpeed clips inside its engine."""
        limit = clip if clip else float("inf")
        if self.local:
            return float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
        if self.acc.state.deepspeed_plugin is not None:
            norm = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
            return float(norm) if norm is not None else 0.0
        return float(self.acc.clip_grad_norm_(model.parameters(), limit))

    def eval_model(self, model):
        """The model the evaluator scores: unwrapped, except under ZeRO-3 (the engine gathers the shards)."""
        return model if self.local or zero_stage(self.acc) == 3 else self.acc.unwrap_model(model)

    def save(self, model, tok, path: Path) -> None:
        """Save the unlearned model as safetensors with its tokenizer."""
        if self.local:
            save_local_model(model, tok, path)
        else:
            save_model(self.acc, model, tok, path)

    def done(self) -> None:
        """Wait for the other ranks of a data-parallel request and release what Accelerate holds."""
        if not self.local:
            self.acc.wait_for_everyone()
            self.acc.free_memory()


# ----------------------------------------------------------------------------------------------- setup


@dataclass
class RequestData:
    """The rows a request's steps draw from: forget rows in a seeded order, the retain rows, token spans."""

    all_ids: list
    starts: list
    ends: list
    lengths: np.ndarray
    forget_rows: list[int]
    retain_rows: list[int]
    order: np.ndarray
    pad_id: int

    @classmethod
    def build(cls, cfg: Config, request: Request, columns: dict, pad_id: int) -> "RequestData":
        """From every prepared example as plain column lists (the stage converts them once)."""
        row_of = {e: i for i, e in enumerate(columns["example_id"])}
        all_ids, starts, ends = (columns[c] for c in ("input_ids", "score_start", "score_end"))
        forget_rows = [row_of[e] for e in request.example_ids]
        order = np.random.default_rng([cfg.run.seed, 104729]).permutation(len(forget_rows))
        return cls(all_ids, starts, ends, np.array([len(x) for x in all_ids]), forget_rows,
                   [i for i, s in enumerate(columns["split"]) if s == "retain"], order, pad_id)

    def batch(self, rows: list[int], device) -> dict:
        """Collated tensors of these rows on `device`."""
        b = collate([self.all_ids[i] for i in rows], [self.starts[i] for i in rows], [self.ends[i] for i in rows],
                    self.pad_id)
        return {k: v.to(device) for k, v in b.items()}

    def tokens(self, rows: list[int]) -> int:
        """Scored tokens of these rows."""
        return int(sum(self.ends[r] - self.starts[r] for r in rows))


@dataclass
class Unlearner:
    """Everything a step needs: the model being unlearned, its optimizer and schedule, the frozen θ₀ for methods
    that compare with it, the method, and how this process takes part."""

    cfg: Config
    worker: Worker
    data: RequestData
    model: Any
    opt: torch.optim.Optimizer
    sched: Any
    spec: MethodSpec
    params: MethodParams
    reference: Any = None
    head: Any = None
    ref_head: Any = None
    lora: Any = None  # the PeftModel around `model` when unlearn.lora.rank > 0 (unlearn/lora.py)

    def reference_mode(self):
        """The context θ₀'s forward runs in: with LoRA, the model itself with its adapters disabled."""
        if self.lora is None:
            return nullcontext()
        from unlearnbench.unlearn.lora import adapters_off

        return adapters_off(self.lora, self.reference)


def make_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """The unlearning optimizer over the trainable parameters."""
    u = cfg.unlearn
    params = [p for p in model.parameters() if p.requires_grad]
    if u.optimizer == "sgd":
        return torch.optim.SGD(params, lr=u.lr, weight_decay=u.weight_decay)
    if u.optimizer == "adam":
        return torch.optim.Adam(params, lr=u.lr, weight_decay=u.weight_decay)
    return torch.optim.AdamW(params, lr=u.lr, weight_decay=u.weight_decay)


def lr_factor(cfg: Config):
    """Learning-rate multiplier per step: linear warm-up, then constant, linear or cosine decay to max_steps."""
    u = cfg.unlearn

    def f(step: int) -> float:
        warm = (step + 1) / u.warmup_steps if step < u.warmup_steps else 1.0
        if u.scheduler == "constant":
            return warm
        progress = min(1.0, step / max(1, u.max_steps))
        return warm * ((1 - progress) if u.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))
    return f


def method_params(cfg: Config) -> MethodParams:
    """The method's hyper-parameters from the config (simnpo has its own beta)."""
    u = cfg.unlearn
    return MethodParams(beta=u.simnpo_beta if u.method == "simnpo" else u.beta, gamma=u.gamma,
                        retain_weight=u.retain_weight, nll_clamp=u.nll_clamp)


def setup(cfg: Config, worker: Worker, model, data: RequestData, load_reference=None) -> Unlearner:
    """Optimizer, schedule and backend for unlearning `model` (θ₀, freshly loaded) on a request's data.

    `load_reference()`: frozen θ₀ for methods that compare with it (npo, ga_kl, ...), called after the model is
    wrapped (under ZeRO-3 both are partitioned in that order). With LoRA (`unlearn.lora.rank` > 0) only adapters
    are trained and θ₀ is the same model with its adapters disabled: `load_reference` is not called.
    """
    spec = get_method(cfg.unlearn.method)
    model.config.use_cache = False
    adapter = None
    if cfg.unlearn.lora.rank > 0:
        from unlearnbench.unlearn import lora

        lora.check_backend(worker.acc)
        adapter = lora.attach(cfg.unlearn.lora, model, cfg.run.seed)  # in place: `model` stays the transformers model
    opt = make_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    per_rank = max(1, math.ceil(min(cfg.unlearn.batch_size, len(data.forget_rows)) / worker.world))
    model, opt = worker.prepare(model, opt, per_rank, cfg.unlearn.grad_clip)
    if adapter is not None:
        reference = worker.eval_model(model) if spec.needs_reference else None
    else:
        reference = load_reference() if spec.needs_reference and load_reference is not None else None
    # output layer on the scored positions only, where the model is not wrapped (one process, request-parallel)
    head = split_head(worker.acc, model, worker.local)
    ref_head = split_head(worker.acc, reference, worker.local) if reference is not None else None
    return Unlearner(cfg, worker, data, model, opt, sched, spec, method_params(cfg), reference, head, ref_head,
                     adapter)


# ----------------------------------------------------------------------------------------------- step


@dataclass
class StepResult:
    """What one step did: its loss, gradient norm, the method's statistics, tokens, and why it was refused."""

    loss: float
    grad_norm: float
    stats: dict = field(default_factory=dict)
    tokens: int = 0
    diverged: str | None = None  # the reason, when the update was refused


def _full_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def step(u: Unlearner, step_index: int) -> StepResult:
    """One optimisation step of the method on this step's forget batch (and retain batch, for methods that use one).

    The forget batch is a window of the request's seeded order; each rank computes its shard's contribution to
    the global loss. A non-finite loss or a gradient norm above `unlearn.max_grad_norm` refuses the update (the
    model keeps its last good state) and says why.
    """
    cfg, w, d = u.cfg, u.worker, u.data
    bsz = min(cfg.unlearn.batch_size, len(d.forget_rows))
    start = (step_index * bsz) % len(d.forget_rows)
    global_rows = [d.forget_rows[i] for i in np.concatenate([d.order, d.order])[start:start + bsz]]
    mine = shard_batch(list(range(len(global_rows))), d.lengths[global_rows], w.rank, w.world, bsz)
    mine_rows = [global_rows[i] for i in (mine[0] if mine else [])]
    inputs: dict[str, Any] = {"forget_tokens": d.tokens(global_rows), "forget_seqs": len(global_rows),
                              "token_weight": float(w.world)}
    u.model.train()
    r_mine: list[int] = []
    if u.spec.needs_retain:
        r_rng = np.random.default_rng([cfg.run.seed, 7, step_index])
        n_retain = min(cfg.unlearn.retain_batch_size, len(d.retain_rows))
        r_global = [d.retain_rows[i] for i in r_rng.choice(len(d.retain_rows), size=n_retain, replace=False)]
        r_shard = shard_batch(list(range(len(r_global))), d.lengths[r_global], w.rank, w.world, len(r_global))
        r_mine = [r_global[i] for i in (r_shard or [[]])[0]]
        inputs.update({"retain_tokens": d.tokens(r_global), "retain_seqs": len(r_global)})
    stats, tokens = {}, 0
    if mine_rows:
        fb = d.batch(mine_rows, w.acc.device)
        inputs.update(_forget_inputs(u, fb))
        if u.spec.needs_retain and r_mine:
            inputs.update(_retain_inputs(u, d.batch(r_mine, w.acc.device)))
        loss, stats = u.spec.fn(LossInputs(**inputs), u.params)
        tokens = int(fb["attention_mask"].sum())
    else:  # this process has no example this step; it still joins the gradient all-reduce
        loss = sum(p.sum() for p in u.model.parameters()) * 0.0
    total_loss = w.backward(loss)
    grad_norm = w.clip_grad_norm(u.model, cfg.unlearn.grad_clip)
    if not math.isfinite(total_loss) or not math.isfinite(grad_norm) or grad_norm > cfg.unlearn.max_grad_norm:
        u.opt.zero_grad(set_to_none=True)
        reason = (f"non-finite loss ({total_loss})" if not math.isfinite(total_loss)
                  else f"gradient norm {grad_norm:.3g} (limit unlearn.max_grad_norm={cfg.unlearn.max_grad_norm:g})")
        return StepResult(total_loss, grad_norm, stats, tokens, diverged=reason)
    u.opt.step()
    u.sched.step()
    u.opt.zero_grad(set_to_none=True)
    return StepResult(total_loss, grad_norm, stats, tokens)


def _forget_inputs(u: Unlearner, fb: dict) -> dict:
    f_logp, f_mask = scored_logprobs(u.model, fb, u.head)
    out = {"forget_logp": f_logp, "forget_mask": f_mask}
    if u.spec.needs_reference:
        with torch.no_grad(), u.reference_mode():
            out["forget_ref_logp"], _ = scored_logprobs(u.reference, fb, u.ref_head)
    return out


def _retain_inputs(u: Unlearner, rb: dict) -> dict:
    if not u.spec.needs_full_retain_dist:
        r_logp, r_mask = scored_logprobs(u.model, rb, u.head)
        return {"retain_logp": r_logp, "retain_mask": r_mask}
    r_logits = _full_logits(u.model, rb)
    r_logp, r_mask = token_logprobs(r_logits, rb["labels"])
    with torch.no_grad(), u.reference_mode():
        ref = torch.log_softmax(_full_logits(u.reference, rb)[:, :-1].float(), -1)
    return {"retain_logp": r_logp, "retain_mask": r_mask,
            "retain_logprobs": torch.log_softmax(r_logits[:, :-1].float(), -1), "retain_ref_logprobs": ref}


# ----------------------------------------------------------------------------------------------- stopping rule


class StopRule:
    """When a request stops: utility perplexity past `max_ppl_ratio` x θ₀'s (diverged); once the UQ target held
    for `patience` evaluations (if `stop_on_target`) and, with `until_all_forgotten`, every example of the request
    is forgotten (the run goes on past the target so that every example's steps to forget are observed); or at
    `max_steps`. The request's own verdict uses its first crossing whatever happens after it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.held = 0
        self.reached = False

    def check(self, row: dict, step_index: int, ppl_0: float) -> tuple[str, str] | None:
        """(status, reason) when the request stops at this evaluation, else None."""
        m, u = self.cfg.metrics, self.cfg.unlearn
        if step_index == 0 and u.skip_nothing_to_forget and row.get("nothing_to_forget"):
            return "max_steps", (f"nothing to forget: the exposure gap is under metrics.uq_min_gap_bits="
                                 f"{m.uq_min_gap_bits:g}, so no unlearning step is taken (unlearn.skip_nothing_to_forget)")
        self.held = self.held + 1 if row["uq"] >= m.uq_target and step_index > 0 else 0
        ppl = row["id_holdout_ppl"]
        if not np.isfinite(ppl) or ppl > m.max_ppl_ratio * ppl_0:
            return "diverged", f"ID-holdout perplexity {ppl:.3g} exceeds {m.max_ppl_ratio:g} x θ₀'s {ppl_0:.3g}"
        self.reached = self.reached or self.held >= u.patience
        all_forgotten = row["forgotten_fraction"] >= 1.0
        if u.stop_on_target and self.reached and (all_forgotten or not u.until_all_forgotten):
            return "unlearned", (f"UQ >= {m.uq_target} held for {u.patience} evaluation(s)"
                                 + (" and every example is forgotten" if u.until_all_forgotten else ""))
        if step_index >= u.max_steps:
            return "max_steps", f"reached max_steps={u.max_steps}"
        return None


# ----------------------------------------------------------------------------------------------- the loop


def unlearn_request(ctx, request: Request, columns: dict, subset, meta: pd.DataFrame, forget_table: pd.DataFrame,
                    tok, trk, worker: Worker) -> dict:
    """Run the configured method on one request from θ₀; write its trajectory, curve and result.

    `columns`: every prepared example as plain column lists; `forget_table`: the score stage's per-example table.
    On SIGINT / SIGTERM the request stops between two steps (every rank at the same step when data-parallel),
    writes a request checkpoint (`unlearn/<name>/checkpoint/`) and raises `interrupt.Interrupted`; the next run
    resumes from it to the same numbers. The checkpoint goes once the request's result is written.
    """
    with interrupt.safe_points(worker.acc, not worker.local, stage="unlearn", what=request.name):
        return _run_request(ctx, request, columns, subset, meta, forget_table, tok, trk, worker)


def _run_request(ctx, request: Request, columns: dict, subset, meta: pd.DataFrame, forget_table: pd.DataFrame,
                 tok, trk, worker: Worker) -> dict:
    cfg = ctx.cfg
    out_dir = ctx.run_dir / "unlearn" / request.name
    pad_id = tok.pad_token_id or 0
    evaluator = RequestEvaluator(worker.acc, cfg, request.example_ids, subset, meta, forget_table, pad_id,
                                 worker.local)
    data = RequestData.build(cfg, request, columns, pad_id)
    # θ₀ frozen, for methods that compare with it: a DeepSpeed inference engine under ZeRO-3 (sharded parameters)
    # The random state is the request's own (dropout in LoRA or a pretrained model's config; any method that
    # samples): the same whichever requests this process ran before, and in any process layout or resume order.
    seed = zlib.crc32(f"{cfg.run.seed}/{request.name}".encode())
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    u = setup(cfg, worker, load_trained(ctx.run_dir, "original", cfg.model.dtype), data,
              lambda: inference_model(worker.acc, load_trained(ctx.run_dir, "original", cfg.model.dtype)))
    schedule, rule, saved = set(eval_steps(cfg)), StopRule(cfg), False
    curve, trajs, window = [], [], []
    status, reason = "max_steps", ""
    t_start, train_time, tokens = time.perf_counter(), 0.0, 0
    step_index = 0
    resumed = load_request_checkpoint(out_dir, u, evaluator, rule)
    if resumed is not None:
        step_index, curve, trajs, window, saved = (resumed[k] for k in ("step", "curve", "trajs", "window", "saved"))
        train_time, tokens, t_start = resumed["train_time"], resumed["tokens"], t_start - resumed["elapsed_seconds"]
        msg = f"[unlearn] {request.name}: resuming at step {step_index} ({resumed['path']})"
        print(msg, flush=True) if worker.local else worker.acc.print(msg)
    while True:
        if step_index in schedule:
            row, traj = evaluator.evaluate(worker.eval_model(u.model), step_index)
            row.update(_window_summary(window), lr=u.sched.get_last_lr()[0],
                       tokens_per_s=tokens / train_time if train_time else float("nan"),
                       eval_seconds=evaluator.seconds, elapsed_seconds=time.perf_counter() - t_start)
            window = []
            curve.append(row)
            trajs.append(traj)
            trk.log({f"unlearn/{request.name}/{k}": v for k, v in row.items() if k != "step"},
                    **{"unlearn/step": step_index}, request=request.name)
            stop = rule.check(row, step_index, evaluator.ppl_0)
            if rule.reached and not saved and cfg.unlearn.save_unlearned:
                # the state the attacks start from: the model at the step the request became unlearned
                worker.save(u.model, tok, ctx.run_dir / "unlearn" / request.name / "model_unlearned")
                saved = True
            if stop is not None:
                status, reason = stop
                break
        t0 = time.perf_counter()
        res = step(u, step_index)
        if res.diverged:
            status, reason = "diverged", res.diverged
            break  # the last good state is the one before this step; it is not updated
        window.append(res)
        tokens += res.tokens
        train_time += time.perf_counter() - t0
        step_index += 1
        if interrupt.should_stop(worker.acc, collective=not worker.local):  # safe point: between two steps
            path = save_request_checkpoint(out_dir, u, evaluator, rule, {
                "step": step_index, "curve": curve, "trajs": trajs, "window": window, "saved": saved,
                "train_time": train_time, "tokens": tokens, "elapsed_seconds": time.perf_counter() - t_start})
            raise interrupt.Interrupted(stage="unlearn", step=step_index, checkpoint=path, what=request.name,
                                        local=worker.local)
    if worker.writes:
        # before result.json: a kill in between loses only a finished trajectory (rerun, bit for bit), while a
        # checkpoint left beside a result would never be removed
        shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)
    return finish(ctx, request, u, evaluator, curve, trajs, status, reason, step_index, t_start, forget_table, tok,
                  trk)


# ----------------------------------------------------------------------------------------------- request checkpoint

CHECKPOINT = "checkpoint"  # unlearn/<request>/checkpoint/step_<N>/: written on SIGINT / SIGTERM, gone once done


def _checkpoint_identity(cfg: Config, worker: Worker) -> dict:
    """What a request checkpoint must share with the run resuming it: the unlearn stage's fingerprint (every
    setting the trajectory depends on) and the process layout (request-parallel or not, and how many ranks)."""
    from unlearnbench.records import stage_fingerprint

    return {"fingerprint": stage_fingerprint(cfg, "unlearn"), "local": bool(worker.local),
            "world": 1 if worker.local else int(worker.acc.num_processes)}


def _sharded(worker: Worker) -> bool:
    acc = worker.acc
    return not worker.local and (zero_stage(acc) > 0 or "FSDP" in str(acc.distributed_type))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def save_request_checkpoint(out_dir: Path, u: Unlearner, evaluator: RequestEvaluator, rule: StopRule,
                            state: dict) -> Path:
    """Write the request's state after `state["step"]` steps under `<out_dir>/checkpoint/step_<N>`: trained
    parameters and optimizer (a DDP or 1-process model: the trainable parameters as safetensors, whatever a LoRA
    adapter or a full model trains; ZeRO / FSDP: accelerate's sharded state), scheduler, RNG, the loop's counters,
    its curve rows and trajectories so far and the evaluator's state. `complete.json` last (sizes and checksums),
    then older request checkpoints go. Every rank of a data-parallel request calls it."""
    import json

    from safetensors.torch import save_file

    from unlearnbench import integrity
    from unlearnbench.io import write_text

    w, acc = u.worker, u.worker.acc
    root = out_dir / CHECKPOINT
    path = root / f"step_{int(state['step']):07d}"
    if w.writes:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    if not w.local:
        acc.wait_for_everyone()
    if _sharded(w):
        acc.save_state(str(path / "state"))
    elif w.writes:
        model = u.model if w.local else acc.unwrap_model(u.model)
        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
                  str(path / "trainable.safetensors"), metadata={"format": "pt"})
        torch.save(u.opt.state_dict(), path / "optimizer.bin")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path / (f"rng_{acc.process_index}.pt" if not w.local else "rng.pt"))
    if w.writes:
        torch.save({"scheduler": u.sched.state_dict()}, path / "scheduler.pt")
        last = evaluator._last
        theta0 = evaluator._theta0 is not None and last is evaluator._theta0["scores"]
        loop = {k: v for k, v in state.items() if k not in ("trajs", "window")}
        loop.update(window=[dataclasses.asdict(r) for r in state["window"]], n_trajs=len(state["trajs"]),
                    rule={"held": rule.held, "reached": rule.reached}, sharded=_sharded(w),
                    **_checkpoint_identity(evaluator.cfg, w),
                    evaluator={"seconds": evaluator.seconds, "tokens_scored": evaluator.tokens_scored,
                               "e_0": None if evaluator.e_0 is None else [float(x) for x in evaluator.e_0],
                               "ppl_0": evaluator.ppl_0, "last": "theta0" if theta0 else (None if last is None
                                                                                          else "file")})
        write_text(path / "loop.json", json.dumps(loop, default=_json_default, indent=1) + "\n")  # NaN kept as NaN
        if state["trajs"]:
            write_parquet(path / "trajectory.parquet", pd.concat(
                [t.assign(_eval=i) for i, t in enumerate(state["trajs"])], ignore_index=True))
        if last is not None and not theta0:
            write_parquet(path / "last_scores.parquet", last)
    if not w.local:
        acc.wait_for_everyone()
    if w.writes:
        integrity.mark_complete(path, int(state["step"]))
        for old in root.glob("step_*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    if not w.local:
        acc.wait_for_everyone()
    return path


def load_request_checkpoint(out_dir: Path, u: Unlearner, evaluator: RequestEvaluator, rule: StopRule) -> dict | None:
    """Restore the newest complete request checkpoint into the freshly set-up `u`, `evaluator` and `rule`; the loop
    state it saved (with "path"), or None when there is none to resume from (then the request starts at step 0)."""
    import json

    from accelerate.utils import load as safe_torch_load  # torch.load with weights_only=True, as accelerate reads it
    from safetensors.torch import load_file

    from unlearnbench import integrity

    w, acc = u.worker, u.worker.acc
    path = None
    for cand in sorted((out_dir / CHECKPOINT).glob("step_*"), reverse=True):
        step, why = integrity.check_checkpoint(cand)
        if step is not None:
            path = cand
            break
        if w.writes and (cand / integrity.COMPLETE).exists():
            print(f"[unlearn] not resuming from {cand}: {why}. It is ignored.", flush=True)
    if path is None:
        return None
    loop = json.loads((path / "loop.json").read_text(encoding="utf-8"))
    mine = _checkpoint_identity(evaluator.cfg, w)
    changed = [k for k, v in mine.items() if loop.get(k) != v]
    if changed:
        # an interrupted stage has no record to compare: a checkpoint of another config (lr, method, LoRA) or
        # process layout would resume the wrong trajectory, or fail to load
        if w.writes:
            what = "config" if "fingerprint" in changed else "process layout (" + ", ".join(changed) + ")"
            print(f"[unlearn] not resuming from {path}: it was written for another {what}; this request starts "
                  "again from θ₀ and the checkpoint is removed.", flush=True)
        if not w.local:
            w.acc.wait_for_everyone()  # every rank has read it before it goes
        if w.writes:
            shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)
        return None
    if loop.get("sharded") != _sharded(w):
        if w.writes:
            print(f"[unlearn] not resuming from {path}: it was written by a {'sharded' if loop.get('sharded') else 'DDP or 1-process'} "
                  "launch; this request starts again from θ₀.", flush=True)
        return None
    if _sharded(w):
        acc.load_state(str(path / "state"))
    else:
        model = u.model if w.local else acc.unwrap_model(u.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(path / "trainable.safetensors")).items():
                params[name].copy_(tensor.to(params[name].device))
        u.opt.load_state_dict(safe_torch_load(path / "optimizer.bin", map_location="cpu", weights_only=True))
    u.sched.load_state_dict(safe_torch_load(path / "scheduler.pt", weights_only=True)["scheduler"])
    rng_file = path / (f"rng_{acc.process_index}.pt" if not w.local else "rng.pt")
    if rng_file.exists():
        rng = safe_torch_load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    ev = loop["evaluator"]
    evaluator.seconds, evaluator.tokens_scored, evaluator.ppl_0 = ev["seconds"], ev["tokens_scored"], ev["ppl_0"]
    evaluator.e_0 = None if ev["e_0"] is None else np.asarray(ev["e_0"], dtype=float)
    if ev["last"] == "theta0":
        evaluator._last = evaluator._theta0["scores"]
    elif ev["last"] == "file":
        evaluator._last = pd.read_parquet(path / "last_scores.parquet")
    rule.held, rule.reached = loop["rule"]["held"], loop["rule"]["reached"]
    trajs = []
    if loop["n_trajs"]:
        frame = pd.read_parquet(path / "trajectory.parquet")
        trajs = [frame[frame._eval == i].drop(columns="_eval").reset_index(drop=True) for i in range(loop["n_trajs"])]
    return {**loop, "trajs": trajs, "window": [StepResult(**r) for r in loop["window"]], "path": path}


def _window_summary(window: list[StepResult]) -> dict:
    """Mean training loss and method statistics over the steps since the last evaluation."""
    out = {"train_loss": float(np.mean([r.loss for r in window])) if window else float("nan")}
    for key in sorted({k for r in window for k in r.stats}):
        out[f"method_{key}"] = float(np.mean([r.stats[key] for r in window if key in r.stats]))
    return out


# ----------------------------------------------------------------------------------------------- finish


def finish(ctx, request: Request, u: Unlearner, evaluator: RequestEvaluator, curve: list[dict], trajs: list,
           status: str, reason: str, steps_run: int, t_start: float, forget_table: pd.DataFrame, tok, trk) -> dict:
    """The final full check, the request's files (trajectory, curve, per-example table, model) and result.json."""
    cfg, w = ctx.cfg, u.worker
    out_dir = ctx.run_dir / "unlearn" / request.name
    final_all = evaluator.evaluate_full(w.eval_model(u.model)) if evaluator.sampled else {}
    wall = time.perf_counter() - t_start
    cost = request_cost(u, evaluator, len(curve), steps_run, wall)
    curve_df = pd.DataFrame(curve)
    traj_df = pd.concat(trajs, ignore_index=True)
    result, per_example = summarize_request(cfg, request, curve_df, traj_df, forget_table, status, reason, steps_run,
                                            wall, evaluator)
    result.update(final_all, in_loop_sample={"examples": len(evaluator.meta), "all": len(evaluator.full_meta)}, **cost)
    if w.writes:
        write_parquet(out_dir / "trajectory.parquet", traj_df)
        write_parquet(out_dir / "curve.parquet", curve_df)
        write_parquet(out_dir / "examples.parquet", per_example)
        trk.log_table(f"unlearn/{request.name}/examples", per_example)
    if cfg.unlearn.save_model:
        w.save(u.model, tok, out_dir / "model")
    if w.writes:
        # last: its presence marks the request as done, for the config whose fingerprint it carries
        write_json(out_dir / "result.json", {**result, "fingerprint": _checkpoint_identity(cfg, w)["fingerprint"]})
    w.done()
    return result


def request_cost(u: Unlearner, evaluator: RequestEvaluator, n_evals: int, steps_run: int, wall: float) -> dict:
    """What the request cost: estimated FLOPs (4·N + 2·N_trained per trained token, i.e. 6·N when every weight is
    trained, 2·N per scored token, plus 2·N per token of the frozen θ₀ for methods that use it; N = parameters),
    device-seconds (wall time x devices it held), peak memory, the trained parameters and the bytes of this process's
    optimizer state (what LoRA saves)."""
    from unlearnbench.distributed import peak_memory_mib
    from unlearnbench.models import n_params
    from unlearnbench.unlearn.lora import optimizer_state_bytes, trainable_params

    unwrapped = u.worker.acc.unwrap_model(u.model) if not u.worker.local else u.model
    n, trained = n_params(unwrapped), trainable_params(unwrapped)
    per_eval = sum(len(x) for x in evaluator.data["input_ids"])
    full = sum(len(x) for x in evaluator.full_data["input_ids"]) if evaluator.sampled else 0
    bsz = min(u.cfg.unlearn.batch_size, len(u.data.forget_rows))
    train_tokens = steps_run * bsz * float(np.mean([len(u.data.all_ids[r]) for r in u.data.forget_rows]))
    if u.spec.needs_retain:
        train_tokens += steps_run * min(u.cfg.unlearn.retain_batch_size, len(u.data.retain_rows)) * float(
            np.mean([len(u.data.all_ids[r]) for r in u.data.retain_rows]))
    flops = (4 * n + 2 * trained) * train_tokens + 2 * n * (n_evals * per_eval + full)
    if u.spec.needs_reference:
        flops += 2 * n * train_tokens
    mem = peak_memory_mib()
    return {"flops": float(flops), "device_seconds": wall * u.worker.world,
            "peak_memory_mib": float(mem.get("cuda_max_allocated_mib", mem["cpu_max_rss_mib"])),
            "params": int(n), "trainable_params": int(trained), "optimizer_state_bytes": optimizer_state_bytes(u.opt),
            "lora_rank": u.cfg.unlearn.lora.rank}


def summarize_request(cfg: Config, request: Request, curve: pd.DataFrame, traj: pd.DataFrame,
                      forget_table: pd.DataFrame, status: str, reason: str, steps_run: int, wall: float,
                      evaluator: RequestEvaluator) -> tuple[dict, pd.DataFrame]:
    """result.json (when the request was unlearned, the utility cost there) and the per-example table (steps to
    forget, memorization, difficulty)."""
    # The evaluation that found the utility diverged is not a state anyone would keep: forgetting "at the collapse"
    # and a crossing there do not count (the request collapsed at that step).
    valid = curve.iloc[:-1] if status == "diverged" and "perplexity" in reason and len(curve) > 1 else curve
    steps = valid.step.to_numpy()
    wide = traj.pivot(index="step", columns="example_id", values="forgotten").loc[steps, request.example_ids]
    # Censored at the last valid evaluation: a request that stopped early (all forgotten, or diverged) did not
    # observe its remaining examples beyond it, so max_steps would overstate their steps to forget.
    per_steps, censored = metrics.steps_to_forget(steps, wide.to_numpy(), int(steps[-1]))
    info = forget_table.set_index("example_id").loc[request.example_ids]
    per_example = pd.DataFrame({"example_id": request.example_ids, "kind": info.kind.to_numpy(),
                                "repetitions": info.repetitions.to_numpy(), "steps_to_forget": per_steps,
                                "censored": censored, "memorization": info.memorization.to_numpy(),
                                "exposure_memorization": info.exposure_memorization.to_numpy(),
                                "difficulty": info.difficulty.to_numpy(),
                                "exposure_original": evaluator.e_0, "exposure_oracle": evaluator.e_r,
                                "exposure_final": traj[traj.step == steps[-1]].exposure.to_numpy()})
    for col in ("cf_memorization", "cf_difficulty"):
        if col in info:
            per_example[col] = info[col].to_numpy()
    uq = valid.uq.to_numpy()
    v_steps = valid.step.to_numpy()
    unlearned_step = metrics.first_crossing(v_steps[1:], uq[1:], cfg.metrics.uq_target) if len(v_steps) > 1 else None
    at = curve[curve.step == unlearned_step].iloc[0] if unlearned_step is not None else None
    first = curve.iloc[0]
    nothing = bool(first.nothing_to_forget)
    outcomes = request_outcomes(valid, cfg.metrics.uq_target, status == "diverged", int(curve.step.iloc[-1]))
    auc = metrics.uq_auc(v_steps, uq, cfg.unlearn.max_steps) if len(v_steps) else float("nan")
    result = {
        "request": request.name, "kind": request.kind, "repetitions": request.repetitions,
        "replicate": request.replicate, "n_examples": len(request.example_ids), "method": cfg.unlearn.method, "lr": cfg.unlearn.lr,
        "status": "nothing_to_forget" if nothing and status != "diverged" else status,
        "stop_reason": reason, "steps_run": steps_run, "diverged": status == "diverged",
        "unlearned": unlearned_step is not None, "steps_to_unlearn": unlearned_step,
        "outcome": outcomes[f"{cfg.metrics.uq_target:g}"]["outcome"], "outcomes": outcomes, "uq_auc": auc,
        "step_uq_0.5": metrics.first_crossing(v_steps[1:], uq[1:], 0.5),
        "step_uq_0.8": metrics.first_crossing(v_steps[1:], uq[1:], 0.8),
        "utility_drop_at_unlearned": float(at.utility_drop) if at is not None else None,
        "id_holdout_ppl_at_unlearned": float(at.id_holdout_ppl) if at is not None else None,
        "uq_final": float(curve.uq.iloc[-1]), "uq_max": float(np.nanmax(curve.uq)),
        "uq_example_final": float(curve.uq_example.iloc[-1]), "forget_quality_final": float(curve.forget_quality.iloc[-1]),
        "utility_drop_final": float(curve.utility_drop.iloc[-1]),
        "exposure_original_mean": float(np.mean(evaluator.e_0)), "exposure_oracle_mean": float(np.mean(evaluator.e_r)),
        "exposure_gap_bits": float(first.gap), "nothing_to_forget": nothing,
        "forgotten_fraction_final": float(curve.forgotten_fraction.iloc[-1]),
        "steps_to_forget_mean": float(per_steps.mean()), "censored_fraction": float(censored.mean()),
        "memorization_mean": float(per_example.memorization.mean()),
        "difficulty_mean": float(per_example.difficulty.mean()),
        "id_holdout_ppl_0": float(evaluator.ppl_0), "wall_seconds": wall, "eval_seconds": evaluator.seconds,
        "eval_share": evaluator.seconds / wall if wall else None,
    }
    return result, per_example


def request_outcomes(curve: pd.DataFrame, uq_target: float, diverged: bool, last_step: int) -> dict[str, dict]:
    """`request_outcome` at 0.5, 0.8, 0.9 and the configured target, keyed by the target as `f"{t:g}"`."""
    return {f"{t:g}": request_outcome(curve, t, diverged, last_step)
            for t in sorted({*metrics.UQ_TARGETS, float(uq_target)})}


def request_outcome(curve: pd.DataFrame, target: float, diverged: bool, last_step: int) -> dict:
    """How a request ended with respect to one UQ target: `unlearned` at the crossing step (interpolated linearly
    in log(1+step) between evaluations), `collapsed` (diverged first) or `censored` (stopped first), at the last
    step observed. With the utility cost there: log(ppl/ppl_0) on the ID holdout, interpolated the same way."""
    steps, uq = curve.step.to_numpy(), curve.uq.to_numpy()
    step = metrics.interpolated_crossing(steps, uq, target) if len(steps) > 1 else None
    if step is None:
        return {"outcome": "collapsed" if diverged else "censored", "step": float(last_step), "grid_step": None,
                "log_ppl_ratio": None, "utility_drop": None}
    log_ratio = np.log1p(curve.utility_drop.to_numpy().astype(float))
    lr = float(metrics.value_at_step(steps, log_ratio, step))
    return {"outcome": "unlearned", "step": float(step),
            "grid_step": int(metrics.first_crossing(steps[1:], uq[1:], target)),
            "log_ppl_ratio": lr, "utility_drop": float(np.expm1(lr))}
