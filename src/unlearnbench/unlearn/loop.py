"""The unlearn stage: for each forget request, start from θ₀ and run the method in a plain Accelerate loop.

At step 0 and on the evaluation schedule, one sharded pass scores the request's examples, their references and
the utility sets; exposure, unlearning quality and utility come from the pure metrics. The loop stops when the
UQ target held for `patience` evaluations, on divergence (non-finite loss, exploding gradient, perplexity past
`max_ppl_ratio` x θ₀'s) or at `max_steps`. Each finished request writes its files; a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from unlearnbench import metrics
from unlearnbench.batching import collate, shard_batch, token_logprobs
from unlearnbench.config import Config
from unlearnbench.data.prepare import load_examples, load_tokenizer
from unlearnbench.distributed import inference_model, peak_memory_mib, zero_stage
from unlearnbench.errors import UserError
from unlearnbench.io import atomic_dir, read_json, write_json, write_parquet
from unlearnbench.models import load_trained
from unlearnbench.runner import Context, clear_outputs, finish_stage, require, should_run
from unlearnbench.scoring import score_pass, scored_logprobs, split_head
from unlearnbench.stages import eval_subset, exposures, tracker, utility_table
from unlearnbench.tracking import Tracker
from unlearnbench.unlearn.methods import LossInputs, MethodParams, get_method

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


def build_requests(cfg: Config, forget: pd.DataFrame) -> list[Request]:
    """Requests per (kind, repetitions) group, per example, or one user-given list of example ids."""
    u = cfg.unlearn
    if u.request_kinds:
        forget = forget[forget.kind.isin(u.request_kinds)]
    if u.requests == "groups":
        return [Request(f"{k}_r{r}", sorted(g.example_id), k, int(r))
                for (k, r), g in forget.groupby(["kind", "repetitions"])]
    if u.requests == "per_example":
        rows = forget.sort_values("example_id")
        if u.max_per_example_requests:
            rows = rows.groupby(["kind", "repetitions"]).head(
                max(1, u.max_per_example_requests // max(1, rows.groupby(["kind", "repetitions"]).ngroups)))
        return [Request(f"ex_{r.example_id}", [r.example_id], r.kind, int(r.repetitions)) for r in rows.itertuples()]
    known = set(forget.example_id)
    missing = [e for e in u.example_ids if e not in known]
    if missing:
        raise UserError(f"unlearn.example_ids has ids that are not forget examples of this run: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Valid ids look like "
                        f"{', '.join(sorted(known)[:3])} (see scores/examples.parquet).")
    sub = forget[forget.example_id.isin(u.example_ids)]
    kinds = sorted(set(sub.kind))
    reps = sorted(set(sub.repetitions))
    return [Request("ids_" + "_".join(kinds), sorted(u.example_ids), "+".join(kinds), int(reps[0]) if len(reps) == 1 else -1)]


def _optimizer(cfg: Config, model):
    u = cfg.unlearn
    params = [p for p in model.parameters() if p.requires_grad]
    if u.optimizer == "sgd":
        return torch.optim.SGD(params, lr=u.lr, weight_decay=u.weight_decay)
    if u.optimizer == "adam":
        return torch.optim.Adam(params, lr=u.lr, weight_decay=u.weight_decay)
    return torch.optim.AdamW(params, lr=u.lr, weight_decay=u.weight_decay)


def _lr_factor(cfg: Config):
    u = cfg.unlearn

    def f(step: int) -> float:
        warm = (step + 1) / u.warmup_steps if step < u.warmup_steps else 1.0
        if u.scheduler == "constant":
            return warm
        progress = min(1.0, step / max(1, u.max_steps))
        return warm * ((1 - progress) if u.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))
    return f


class RequestEvaluator:
    """Scores a model on a request's examples, their references and the utility sets; turns that into metrics.

    In-loop evaluations score a fixed, seeded sample of at most `unlearn.eval_references` references per kind and
    `unlearn.eval_utility` examples per utility set (0: all), the same sample at every step, step 0 included; the
    oracle's exposure is recomputed against the same references from θᵣ's stored scores, so UQ compares like with
    like. `evaluate_full` scores every reference and utility example once, for the final state.
    """

    def __init__(self, ctx: Context, request: Request, subset, meta: pd.DataFrame, oracle: pd.DataFrame, pad_id: int,
                 local: bool = False, oracle_scores: pd.DataFrame | None = None):
        cfg = ctx.cfg
        self.local = local
        self.ctx, self.request, self.cfg = ctx, request, cfg
        kinds = set(meta.set_index("example_id").loc[request.example_ids, "kind"])
        target = meta.example_id.isin(request.example_ids).to_numpy()
        refs = ((meta.split == "reference") & meta.kind.isin(kinds)).to_numpy()
        util = meta.split.isin(["holdout", "retain"]).to_numpy()
        full = np.nonzero(target | refs | util)[0]
        rng = np.random.default_rng([cfg.run.seed, 7919])
        sample = [np.nonzero(target)[0]]
        for mask, cap in ((refs, cfg.unlearn.eval_references), (util, cfg.unlearn.eval_utility)):
            for _, group in meta[mask].groupby(["split", "kind"], sort=True):
                rows = group.index.to_numpy()
                sample.append(np.sort(rng.choice(rows, size=cap, replace=False)) if 0 < cap < len(rows) else rows)
        idx = np.sort(np.concatenate(sample))
        self.sampled = len(idx) < len(full)
        # plain lists once: a lazy `datasets` column costs ~0.2 ms per row lookup, at every evaluation
        cols = ("example_id", "input_ids", "score_start", "score_end")
        self.data = subset.select(idx).select_columns(list(cols)).to_dict()
        self.meta = meta.iloc[idx].reset_index(drop=True)
        self.full_data = subset.select(full).select_columns(list(cols)).to_dict() if self.sampled else self.data
        self.full_meta = meta.iloc[full].reset_index(drop=True)
        self.pad_id = pad_id
        col = f"exposure_{cfg.metrics.exposure}"
        table = oracle.set_index("example_id").loc[request.example_ids]
        self.e_r_full = table[f"{col}_oracle"].to_numpy()
        self.e_0_full = table[f"{col}_original"].to_numpy() if f"{col}_original" in table else None
        if self.sampled and oracle_scores is not None:
            scored = self.meta.merge(oracle_scores[["example_id", "nll", "nll_sum"]], on="example_id")
            self.e_r = exposures(scored, cfg.metrics.loss, request.example_ids)[col].to_numpy()
        else:
            self.e_r = self.e_r_full
        self.e_0: np.ndarray | None = None
        self.ppl_0: float | None = None
        self.seconds = 0.0

    def evaluate(self, model, step: int) -> tuple[dict, pd.DataFrame]:
        """Curve row and per-example trajectory rows at this step."""
        cfg = self.cfg
        t0 = time.perf_counter()
        scores, _ = score_pass(self.ctx.acc, model, self.data, cfg.score.batch_size, self.pad_id, local=self.local)
        self.seconds += time.perf_counter() - t0
        traj = exposures(self.meta.merge(scores, on="example_id"), cfg.metrics.loss, self.request.example_ids)
        traj["exposure"] = traj[f"exposure_{cfg.metrics.exposure}"]
        e_t = traj.exposure.to_numpy()
        e_r = self.e_r
        if self.e_0 is None:
            self.e_0 = e_t.copy()
        traj["forgotten"] = metrics.forgotten(e_t, e_r, cfg.metrics.tolerance_bits)
        traj.insert(0, "step", step)
        q = metrics.uq_with_ci(e_t, self.e_0, e_r, cfg.metrics.uq_min_gap_bits, cfg.metrics.n_boot, cfg.run.seed)
        util = utility_table(scores, self.meta)
        if self.ppl_0 is None:
            self.ppl_0 = util["id_holdout_ppl"]
        row = {"step": step, **q, "exposure_mean": float(e_t.mean()),
               "exposure_rank_mean": float(traj.exposure_rank.mean()),
               "exposure_oracle_mean": float(e_r.mean()), "forgotten_fraction": float(traj.forgotten.mean()),
               "forget_nll": float(traj.nll.mean()), **util,
               "utility_drop": float(metrics.utility_drop(util["id_holdout_ppl"], self.ppl_0))}
        return row, traj

    def evaluate_full(self, model) -> dict:
        """The final state against every reference and utility example, relative to the score stage's θ₀ and θᵣ
        exposures (which used every reference too): a check on the in-loop sample."""
        cfg = self.cfg
        t0 = time.perf_counter()
        scores, _ = score_pass(self.ctx.acc, model, self.full_data, cfg.score.batch_size, self.pad_id,
                               local=self.local)
        self.seconds += time.perf_counter() - t0
        traj = exposures(self.full_meta.merge(scores, on="example_id"), cfg.metrics.loss, self.request.example_ids)
        e_t = traj[f"exposure_{cfg.metrics.exposure}"].to_numpy()
        e_0 = self.e_0_full if self.e_0_full is not None else self.e_0
        uq = metrics.unlearning_quality(e_t, e_0, self.e_r_full, cfg.metrics.uq_min_gap_bits).uq
        util = utility_table(scores, self.full_meta)
        return {"uq_final_all": float(uq), "exposure_final_all_mean": float(e_t.mean()),
                "forgotten_fraction_final_all": float(metrics.forgotten(e_t, self.e_r_full,
                                                                        cfg.metrics.tolerance_bits).mean()),
                "id_holdout_ppl_final_all": float(util["id_holdout_ppl"])}


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _batch(all_ids, starts, ends, rows, pad_id, device):
    b = collate([all_ids[i] for i in rows], [starts[i] for i in rows], [ends[i] for i in rows], pad_id)
    return {k: v.to(device) for k, v in b.items()}


def unlearn_request(ctx: Context, request: Request, examples, subset, meta, oracle_table, tok, trk,
                    local: bool = False, oracle_scores: pd.DataFrame | None = None) -> dict:
    """Run the configured method on one request from θ₀; write its trajectory, curve and result.

    `examples`: every prepared example as plain column lists (`run_unlearn` converts them once).
    `local=True` (request-parallel mode): this process runs the whole request on its own model copy with no
    collective operation, and writes the request's files itself.
    """
    cfg, acc = ctx.cfg, ctx.acc
    u = cfg.unlearn
    spec = get_method(u.method)
    params = MethodParams(beta=u.simnpo_beta if u.method == "simnpo" else u.beta, gamma=u.gamma,
                          retain_weight=u.retain_weight, nll_clamp=u.nll_clamp)
    out_dir = ctx.run_dir / "unlearn" / request.name
    pad_id = tok.pad_token_id or 0
    evaluator = RequestEvaluator(ctx, request, subset, meta, oracle_table, pad_id, local, oracle_scores)
    row_of = {e: i for i, e in enumerate(examples["example_id"])}
    all_ids, starts, ends = (examples[c] for c in ("input_ids", "score_start", "score_end"))
    forget_rows = [row_of[e] for e in request.example_ids]
    retain_rows = [i for i, s in enumerate(examples["split"]) if s == "retain"]
    lengths = np.array([len(x) for x in all_ids])
    world, rank = (1, 0) if local else (acc.num_processes, acc.process_index)
    writer = local or acc.is_main_process
    model = load_trained(ctx.run_dir, "original", cfg.model.dtype)
    model.config.use_cache = False
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg))
    if acc.state.deepspeed_plugin is not None and not local:
        per_rank = max(1, math.ceil(min(u.batch_size, len(forget_rows)) / world))
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds.update({"train_micro_batch_size_per_gpu": per_rank, "gradient_accumulation_steps": 1,
                   "train_batch_size": per_rank * world})
        # DeepSpeed clips at 1.0 when the key is absent; 0 turns it off, as grad_clip=None does elsewhere
        ds["gradient_clipping"] = float(u.grad_clip or 0.0)
    if local:
        model = model.to(acc.device)
    else:
        acc.gradient_accumulation_steps = 1
        model, opt = acc.prepare(model, opt)
    reference = None
    if spec.needs_reference:
        reference = _reference_model(ctx)
    # output layer on the scored positions only, where the model is not wrapped (one process, request-parallel)
    head = split_head(acc, model, local)
    ref_head = split_head(acc, reference, local) if reference is not None else None
    eval_model = model if local or zero_stage(acc) == 3 else acc.unwrap_model(model)
    schedule = set(eval_steps(cfg))
    curve, trajs = [], []
    status, reason, unlearned_step, held = "max_steps", "", None, 0
    rng = np.random.default_rng([cfg.run.seed, 104729])
    perm = rng.permutation(len(forget_rows))
    t_start, train_time, tokens, loss_window = time.perf_counter(), 0.0, 0, []
    step = 0
    while True:
        if step in schedule:
            row, traj = evaluator.evaluate(eval_model, step)
            elapsed = time.perf_counter() - t_start
            row.update({"train_loss": float(np.mean(loss_window)) if loss_window else float("nan"),
                        "lr": sched.get_last_lr()[0], "tokens_per_s": tokens / train_time if train_time else float("nan"),
                        "eval_seconds": evaluator.seconds, "elapsed_seconds": elapsed})
            loss_window = []
            curve.append(row)
            trajs.append(traj)
            trk.log({f"unlearn/{request.name}/{k}": v for k, v in row.items() if k != "step"},
                    **{"unlearn/step": step}, request=request.name)
            if row["uq"] >= cfg.metrics.uq_target and step > 0:
                held += 1
                unlearned_step = step if unlearned_step is None else unlearned_step
            else:
                held = 0
            if not np.isfinite(row["id_holdout_ppl"]) or row["id_holdout_ppl"] > cfg.metrics.max_ppl_ratio * evaluator.ppl_0:
                status, reason = "diverged", (f"ID-holdout perplexity {row['id_holdout_ppl']:.3g} exceeds "
                                              f"{cfg.metrics.max_ppl_ratio:g} x θ₀'s {evaluator.ppl_0:.3g}")
                break
            if u.stop_on_target and held >= u.patience:
                status, reason = "unlearned", f"UQ >= {cfg.metrics.uq_target} held for {held} evaluation(s)"
                break
            if step >= u.max_steps:
                reason = f"reached max_steps={u.max_steps}"
                break
        # one optimisation step
        t0 = time.perf_counter()
        bsz = min(u.batch_size, len(forget_rows))
        start = (step * bsz) % len(forget_rows)
        order = np.concatenate([perm, perm])[start:start + bsz]
        global_rows = [forget_rows[i] for i in order]
        mine = shard_batch(list(range(len(global_rows))), lengths[global_rows], rank, world, bsz)
        mine_rows = [global_rows[i] for i in (mine[0] if mine else [])]
        forget_tokens = int(sum(ends[r] - starts[r] for r in global_rows))
        inputs = {"forget_tokens": forget_tokens, "forget_seqs": len(global_rows), "token_weight": float(world)}
        model.train()
        if spec.needs_retain:
            r_rng = np.random.default_rng([cfg.run.seed, 7, step])
            r_global = [retain_rows[i] for i in r_rng.choice(len(retain_rows), size=min(u.retain_batch_size,
                                                                                         len(retain_rows)), replace=False)]
            r_mine = [r_global[i] for i in (shard_batch(list(range(len(r_global))), lengths[r_global],
                                                        rank, world, len(r_global)) or [[]])[0]]
            inputs.update({"retain_tokens": int(sum(ends[r] - starts[r] for r in r_global)),
                           "retain_seqs": len(r_global)})
        if mine_rows:
            fb = _batch(all_ids, starts, ends, mine_rows, pad_id, acc.device)
            f_logp, f_mask = scored_logprobs(model, fb, head)
            inputs.update({"forget_logp": f_logp, "forget_mask": f_mask})
            if spec.needs_reference:
                with torch.no_grad():
                    ref_logp, _ = scored_logprobs(reference, fb, ref_head)
                inputs["forget_ref_logp"] = ref_logp
            if spec.needs_retain and r_mine:
                rb = _batch(all_ids, starts, ends, r_mine, pad_id, acc.device)
                if spec.needs_full_retain_dist:
                    r_logits = _logits(model, rb)
                    r_logp, r_mask = token_logprobs(r_logits, rb["labels"])
                else:
                    r_logp, r_mask = scored_logprobs(model, rb, head)
                inputs.update({"retain_logp": r_logp, "retain_mask": r_mask})
                if spec.needs_full_retain_dist:
                    inputs["retain_logprobs"] = torch.log_softmax(r_logits[:, :-1].float(), -1)
                    with torch.no_grad():
                        inputs["retain_ref_logprobs"] = torch.log_softmax(
                            _logits(reference, rb)[:, :-1].float(), -1)
            loss, _ = spec.fn(LossInputs(**inputs), params)
            tokens += int(fb["attention_mask"].sum())
        else:  # this process has no example this step; it still joins the gradient all-reduce
            loss = sum(p.sum() for p in model.parameters()) * 0.0
        if local:
            loss.backward()
            total_loss = float(loss.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), u.grad_clip or float("inf")))
        else:
            acc.backward(loss)
            total_loss = acc.reduce(loss.detach().float().reshape(1), reduction="sum").item() / world
            grad_norm = _grad_norm(acc, model, u.grad_clip)
        if not math.isfinite(total_loss) or not math.isfinite(grad_norm) or grad_norm > u.max_grad_norm:
            opt.zero_grad(set_to_none=True)
            status = "diverged"
            reason = (f"non-finite loss ({total_loss})" if not math.isfinite(total_loss)
                      else f"gradient norm {grad_norm:.3g} (limit unlearn.max_grad_norm={u.max_grad_norm:g})")
            break  # the last good state is the one before this step; it is not updated
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_window.append(total_loss)
        train_time += time.perf_counter() - t0
        step += 1
    final_all = evaluator.evaluate_full(eval_model) if evaluator.sampled else {}
    wall = time.perf_counter() - t_start
    curve_df = pd.DataFrame(curve)
    traj_df = pd.concat(trajs, ignore_index=True)
    result = summarize_request(cfg, request, curve_df, traj_df, oracle_table, status, reason, step, wall, evaluator)
    result.update(final_all, in_loop_sample={"examples": len(evaluator.meta), "all": len(evaluator.full_meta)})
    per_example = result.pop("_per_example")
    if writer:
        write_parquet(out_dir / "trajectory.parquet", traj_df)
        write_parquet(out_dir / "curve.parquet", curve_df)
        write_parquet(out_dir / "examples.parquet", per_example)
        trk.log_table(f"unlearn/{request.name}/examples", per_example)
    if u.save_model:
        from unlearnbench.train import _save_model

        if local:
            with atomic_dir(out_dir / "model") as tmp:
                model.save_pretrained(str(tmp), safe_serialization=True)
                tok.save_pretrained(str(tmp))
        else:
            _save_model(acc, model, tok, out_dir / "model")
    if writer:
        write_json(out_dir / "result.json", result)  # last: its presence marks the request as done
    if not local:
        acc.wait_for_everyone()
        acc.free_memory()
    del model, opt, reference
    return result


def _grad_norm(acc, model, clip: float | None) -> float:
    if acc.state.deepspeed_plugin is not None:
        norm = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
        return float(norm) if norm is not None else 0.0
    return float(acc.clip_grad_norm_(model.parameters(), clip if clip else float("inf")))


def _reference_model(ctx: Context):
    """θ₀, frozen, for npo / ga_kl; a DeepSpeed inference engine under ZeRO-3 so its parameters are sharded."""
    return inference_model(ctx.acc, load_trained(ctx.run_dir, "original", ctx.cfg.model.dtype))


def summarize_request(cfg: Config, request: Request, curve: pd.DataFrame, traj: pd.DataFrame, oracle_table,
                      status: str, reason: str, steps_run: int, wall: float, evaluator) -> dict:
    """result.json: when the request was unlearned, the utility cost there, steps to forget per example."""
    steps = curve.step.to_numpy()
    wide = traj.pivot(index="step", columns="example_id", values="forgotten").loc[steps, request.example_ids]
    # Censored at the last evaluated step: a request that stopped early (unlearned or diverged) did not observe
    # its remaining examples beyond it, so max_steps would overstate their steps to forget.
    per_steps, censored = metrics.steps_to_forget(steps, wide.to_numpy(), int(steps[-1]))
    info = oracle_table.set_index("example_id").loc[request.example_ids]
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
    uq = curve.uq.to_numpy()
    unlearned_step = metrics.first_crossing(steps[1:], uq[1:], cfg.metrics.uq_target) if len(steps) > 1 else None
    at = curve[curve.step == unlearned_step].iloc[0] if unlearned_step is not None else None
    first = curve.iloc[0]
    nothing = bool(first.nothing_to_forget)
    return {
        "request": request.name, "kind": request.kind, "repetitions": request.repetitions,
        "n_examples": len(request.example_ids), "method": cfg.unlearn.method, "lr": cfg.unlearn.lr,
        "status": "nothing_to_forget" if nothing and status != "diverged" else status,
        "stop_reason": reason, "steps_run": steps_run, "diverged": status == "diverged",
        "unlearned": unlearned_step is not None, "steps_to_unlearn": unlearned_step,
        "steps_to_unlearn_censored": unlearned_step if unlearned_step is not None else cfg.unlearn.max_steps,
        "step_uq_0.5": metrics.first_crossing(steps[1:], uq[1:], 0.5),
        "step_uq_0.8": metrics.first_crossing(steps[1:], uq[1:], 0.8),
        "utility_drop_at_unlearned": float(at.utility_drop) if at is not None else None,
        "id_holdout_ppl_at_unlearned": float(at.id_holdout_ppl) if at is not None else None,
        "uq_final": float(uq[-1]), "uq_max": float(np.nanmax(uq)),
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
        "_per_example": per_example,
    }


def run_unlearn(ctx: Context) -> None:
    """Every forget request of the run, then summary.json with the study's findings."""
    from unlearnbench.summary import summarize_run

    require(ctx, "score")
    if not should_run(ctx, "unlearn"):
        return
    cfg = ctx.cfg
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    subset = eval_subset(examples)
    # plain lists once for every request: indexing a lazy `datasets` column costs ~0.2 ms a lookup
    columns = examples.select_columns(["example_id", "input_ids", "score_start", "score_end", "split"]).to_dict()
    meta = subset.select_columns(["example_id", "kind", "repetitions", "split"]).to_pandas()
    oracle_table = pd.read_parquet(ctx.run_dir / "scores" / "examples.parquet")
    oracle_scores = pd.read_parquet(ctx.run_dir / "scores" / "oracle.parquet")
    requests = build_requests(cfg, oracle_table)
    if not requests or any(not r.example_ids for r in requests):
        raise UserError("The forget request is empty: no forget example matches unlearn.requests / request_kinds. "
                        "Check unlearn.request_kinds and data.kinds.")
    clear_outputs(ctx, "unlearn")  # only once the requests are valid: a bad config destroys nothing
    mode = parallel_mode(ctx, len(requests))
    acc = ctx.acc
    trk = tracker(ctx, "unlearn")
    if mode == "requests" and not acc.is_main_process:
        # each process logs the requests it runs to metrics.jsonl; W&B stays on the main process
        trk = Tracker(dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, backend="none")),
                      ctx.run_dir, "unlearn", True)
    trk.define_step("unlearn/step", "unlearn")
    acc.print(f"[unlearn] {len(requests)} request(s), method {cfg.unlearn.method}, "
              + ("request-parallel: each process runs whole requests on its own model copy" if mode == "requests"
                 else f"data-parallel over {acc.num_processes} process(es)"))
    mine = requests[acc.process_index::acc.num_processes] if mode == "requests" else requests
    for req in mine:
        done = ctx.run_dir / "unlearn" / req.name / "result.json"
        if done.exists():
            acc.print(f"[unlearn] {req.name}: already done, skipping")
            continue
        res = unlearn_request(ctx, req, columns, subset, meta, oracle_table, tok, trk, local=mode == "requests",
                              oracle_scores=oracle_scores)
        msg = (f"[unlearn] {req.name}: {res['status']} after {res['steps_run']} steps; steps to unlearn "
               f"{res['steps_to_unlearn']}, utility drop there {_fmt(res['utility_drop_at_unlearned'])}, "
               f"final UQ {res['uq_final']:.2f} (gap {res['exposure_gap_bits']:.1f} bits)")
        print(msg, flush=True) if mode == "requests" else acc.print(msg)
    acc.wait_for_everyone()
    results = [read_json(ctx.run_dir / "unlearn" / r.name / "result.json") for r in requests]
    summary = summarize_run(cfg, ctx.run_dir, results)
    if ctx.is_main:
        write_json(ctx.run_dir / "summary.json", summary)
        trk.summary(flatten_findings(summary))
    trk.finish()
    ctx.acc.print(format_findings(summary))
    finish_stage(ctx, "unlearn", {"requests": len(results), **peak_memory_mib()})


def parallel_mode(ctx: Context, n_requests: int) -> str:
    """`requests` (each process runs whole requests on its own copy) or `data` (every request on all processes).

    Auto rule: request-parallel when there are several processes, at least as many requests as processes, and the
    model fits one device (plain DDP, no ZeRO or FSDP sharding); data-parallel otherwise.
    """
    acc, choice = ctx.acc, ctx.cfg.unlearn.parallel
    sharded = zero_stage(acc) > 0 or "FSDP" in str(acc.distributed_type)
    if choice == "requests" and sharded:
        raise UserError("unlearn.parallel=requests needs a model that fits one device, but this launch shards it "
                        "(DeepSpeed ZeRO or FSDP). Use unlearn.parallel=data or a DDP accelerate config.")
    if choice != "auto":
        return choice if acc.num_processes > 1 else "data"
    return "requests" if acc.num_processes > 1 and n_requests >= acc.num_processes and not sharded else "data"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def flatten_findings(summary: dict) -> dict:
    """F1-F3 numbers and verdicts as flat W&B summary keys."""
    out = {}
    for key, f in summary.get("findings", {}).items():
        out[f"findings/{key}/verdict"] = f["verdict"]
    return out


def format_findings(summary: dict) -> str:
    """The findings block printed at the end of unlearn."""
    lines = ["[findings]"]
    for key, f in summary.get("findings", {}).items():
        lines.append(f"  {key}: {f['verdict']} — {f['statement']}")
    return "\n".join(lines)

