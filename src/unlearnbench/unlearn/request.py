"""One forget request's loop: `setup` (model, optimizer, backend), `step` (one optimisation step, callable alone),
`StopRule` (when to stop), `finish` (files and result); `unlearn_request` strings them together in a loop that reads
top to bottom. The request's other parts live beside it: its state (`unlearn/state.py`), who runs and writes what
(`unlearn/worker.py`), the checkpoint of an interrupted request (`unlearn/checkpoint.py`) and the outcome summary of
a finished one (`unlearn/outcome.py`).

At step 0 and on the evaluation schedule, the evaluator (`evaluation.RequestEvaluator`) scores the request's
examples, their references and the utility sets; the loop stops when the UQ target held for `patience`
evaluations, when it collapses (non-finite loss, exploding gradient, perplexity past `max_ppl_ratio` x θ₀'s) or at
`max_steps`. Each finished request writes its files; `result.json` last, so a rerun skips finished requests.
"""

from __future__ import annotations

import math
import shutil
import time
import zlib
from typing import Any

import numpy as np
import pandas as pd
import torch

from unlearnbench import interrupt
from unlearnbench.batching import shard_batch, token_logprobs
from unlearnbench.config import Config
from unlearnbench.distributed import inference_model
from unlearnbench.evaluation import RequestEvaluator
from unlearnbench.io import write_json, write_parquet
from unlearnbench.models import load_trained
from unlearnbench.scoring import scored_logprobs, split_head
from unlearnbench.unlearn.checkpoint import (CHECKPOINT, checkpoint_identity, load_request_checkpoint,
                                             save_request_checkpoint)
from unlearnbench.unlearn.methods import LossInputs, MethodParams, get_method
from unlearnbench.unlearn.outcome import request_cost, summarize_request, window_summary
from unlearnbench.unlearn.state import Request, RequestData, StepResult, Unlearner
from unlearnbench.unlearn.worker import Worker

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


# ----------------------------------------------------------------------------------------------- setup


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
    # output layer on the scored positions only, where the model is not wrapped (one process, job-parallel)
    head = split_head(worker.acc, model, worker.job_parallel)
    ref_head = split_head(worker.acc, reference, worker.job_parallel) if reference is not None else None
    return Unlearner(cfg, worker, data, model, opt, sched, spec, method_params(cfg), reference, head, ref_head,
                     adapter)


# ----------------------------------------------------------------------------------------------- step


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
        return StepResult(total_loss, grad_norm, stats, tokens, collapsed=reason)
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
    """When a request stops: utility perplexity past `max_ppl_ratio` x θ₀'s (collapsed); once the UQ target held
    for `patience` evaluations (if `stop_on_target`) and, with `until_all_forgotten`, every example of the request
    is forgotten (the run goes on past the target so that every example's steps to forget are observed); or at
    `max_steps`. The request's own verdict uses its first crossing whatever happens after it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.held = 0
        self.reached = False

    def state_dict(self) -> dict:
        """How far the request has come towards its target, as plain data (for a request checkpoint)."""
        return {"held": self.held, "reached": self.reached}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` gave."""
        self.held, self.reached = int(state["held"]), bool(state["reached"])

    def check(self, row: dict, step_index: int, ppl_0: float) -> tuple[str, str] | None:
        """(status, reason) when the request stops at this evaluation, else None."""
        m, u = self.cfg.metrics, self.cfg.unlearn
        if step_index == 0 and u.skip_nothing_to_forget and row.get("nothing_to_forget"):
            return "max_steps", (f"nothing to forget: the exposure gap is under metrics.uq_min_gap_bits="
                                 f"{m.uq_min_gap_bits:g}, so no unlearning step is taken (unlearn.skip_nothing_to_forget)")
        self.held = self.held + 1 if row["uq"] >= m.uq_target and step_index > 0 else 0
        ppl = row["id_holdout_ppl"]
        if not np.isfinite(ppl) or ppl > m.max_ppl_ratio * ppl_0:
            return "collapsed", f"ID-holdout perplexity {ppl:.3g} exceeds {m.max_ppl_ratio:g} x θ₀'s {ppl_0:.3g}"
        self.reached = self.reached or self.held >= u.patience
        all_forgotten = row["forgotten_fraction"] >= 1.0
        if u.stop_on_target and self.reached and (all_forgotten or not u.until_all_forgotten):
            return "target", (f"UQ >= {m.uq_target} held for {u.patience} evaluation(s)"
                                 + (" and every example is forgotten" if u.until_all_forgotten else ""))
        if step_index >= u.max_steps:
            return "max_steps", f"reached max_steps={u.max_steps}"
        return None


# ----------------------------------------------------------------------------------------------- the loop


def unlearn_request(ctx, request: Request, columns: dict, subset, meta: pd.DataFrame,
                    forget_scores: pd.DataFrame, tok, trk, worker: Worker) -> dict:
    """Run the configured method on one request from θ₀; write its trajectory, curve and result.

    `columns`: every prepared example as plain column lists; `forget_scores`: the score stage's table of the forget
    examples (`scores/forget.parquet`).
    On SIGINT / SIGTERM the request stops between two steps (every rank at the same step when data-parallel),
    writes a request checkpoint (`unlearn/<name>/checkpoint/`) and raises `interrupt.Interrupted`; the next run
    resumes from it to the same numbers. The checkpoint goes once the request's result is written.
    """
    with interrupt.safe_points(worker.acc, not worker.job_parallel, stage="unlearn", what=request.name):
        return _run_request(ctx, request, columns, subset, meta, forget_scores, tok, trk, worker)


def _run_request(ctx, request: Request, columns: dict, subset, meta: pd.DataFrame,
                 forget_scores: pd.DataFrame, tok, trk, worker: Worker) -> dict:
    cfg = ctx.cfg
    out_dir = ctx.run_dir / "unlearn" / request.name
    pad_id = tok.pad_token_id or 0
    evaluator = RequestEvaluator(worker.acc, cfg, request.example_ids, subset, meta, forget_scores, pad_id,
                                 worker.job_parallel)
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
    resumed = load_request_checkpoint(out_dir, u)
    if resumed is not None:
        evaluator.load_state_dict(resumed["evaluator"])
        rule.load_state_dict(resumed["rule"])
        step_index, curve, trajs, window, saved = (resumed[k] for k in ("step", "curve", "trajs", "window", "saved"))
        train_time, tokens, t_start = resumed["train_time"], resumed["tokens"], t_start - resumed["elapsed_seconds"]
        msg = f"[unlearn] {request.name}: resuming at step {step_index} ({resumed['path']})"
        print(msg, flush=True) if worker.job_parallel else worker.acc.print(msg)
    while True:
        if step_index in schedule:
            row, traj = evaluator.evaluate(worker.eval_model(u.model), step_index)
            row.update(window_summary(window), lr=u.sched.get_last_lr()[0],
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
        if res.collapsed:
            status, reason = "collapsed", res.collapsed
            break  # the last good state is the one before this step; it is not updated
        window.append(res)
        tokens += res.tokens
        train_time += time.perf_counter() - t0
        step_index += 1
        if interrupt.should_stop(worker.acc, collective=not worker.job_parallel):  # safe point: between two steps
            path = save_request_checkpoint(out_dir, u, {
                "step": step_index, "curve": curve, "trajs": trajs, "window": window, "saved": saved,
                "train_time": train_time, "tokens": tokens, "elapsed_seconds": time.perf_counter() - t_start,
                "evaluator": evaluator.state_dict(), "rule": rule.state_dict()})
            raise interrupt.Interrupted(stage="unlearn", step=step_index, checkpoint=path, what=request.name,
                                        local=worker.job_parallel)
    if worker.writes:
        # before result.json: a kill in between loses only a finished trajectory (rerun, bit for bit), while a
        # checkpoint left beside a result would never be removed
        shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)
    return finish(ctx, request, u, evaluator, curve, trajs, status, reason, step_index, t_start, forget_scores, tok,
                  trk)


# ----------------------------------------------------------------------------------------------- finish


def finish(ctx, request: Request, u: Unlearner, evaluator: RequestEvaluator, curve: list[dict], trajs: list,
           status: str, reason: str, steps_run: int, t_start: float, forget_scores: pd.DataFrame, tok, trk) -> dict:
    """The final full check, the request's files (trajectory, curve, forgetting table, model) and result.json."""
    cfg, w = ctx.cfg, u.worker
    out_dir = ctx.run_dir / "unlearn" / request.name
    final_all = evaluator.evaluate_full(w.eval_model(u.model)) if evaluator.sampled else {}
    wall = time.perf_counter() - t_start
    cost = request_cost(u, evaluator, len(curve), steps_run, wall)
    curve_df = pd.DataFrame(curve)
    traj_df = pd.concat(trajs, ignore_index=True)
    result, forgetting = summarize_request(cfg, request, curve_df, traj_df, forget_scores, status, reason,
                                           steps_run, wall, evaluator)
    result.update(final_all, in_loop_sample={"examples": len(evaluator.meta), "all": len(evaluator.full_meta)}, **cost)
    if w.writes:
        write_parquet(out_dir / "trajectory.parquet", traj_df)
        write_parquet(out_dir / "curve.parquet", curve_df)
        write_parquet(out_dir / "forgetting.parquet", forgetting)
        trk.log_table(f"unlearn/{request.name}/forgetting", forgetting)
    if cfg.unlearn.save_model:
        w.save(u.model, tok, out_dir / "model")
    if w.writes:
        # last: its presence marks the request as done, for the config whose fingerprint it carries
        write_json(out_dir / "result.json", {**result, "fingerprint": checkpoint_identity(cfg, w)["fingerprint"]})
    w.done()
    return result
