"""The outcome of a finished forget request, analysis rather than training: its result.json and forgetting table
(`summarize_request`), how it ended at each UQ target (`request_outcomes`), what it cost (`request_cost`), and the
curve row's summary of the steps between two evaluations (`window_summary`). Definitions: docs/definitions.md."""

from __future__ import annotations

import numpy as np
import pandas as pd

from unlearnbench import metrics
from unlearnbench.config import Config
from unlearnbench.evaluation import RequestEvaluator
from unlearnbench.unlearn.state import Request, StepResult, Unlearner


def window_summary(window: list[StepResult]) -> dict:
    """Mean training loss and method statistics over the steps since the last evaluation."""
    out = {"train_loss": float(np.mean([r.loss for r in window])) if window else float("nan")}
    for key in sorted({k for r in window for k in r.stats}):
        out[f"method_{key}"] = float(np.mean([r.stats[key] for r in window if key in r.stats]))
    return out


def summarize_request(cfg: Config, request: Request, curve: pd.DataFrame, traj: pd.DataFrame,
                      forget_scores: pd.DataFrame, status: str, reason: str, steps_run: int, wall: float,
                      evaluator: RequestEvaluator) -> tuple[dict, pd.DataFrame]:
    """result.json (when the request was unlearned, the utility cost there) and the forgetting table (each example's
    steps to forget, memorization, difficulty: `forgetting.parquet`)."""
    # The evaluation that found the utility collapsed is not a state anyone would keep: forgetting "at the collapse"
    # and a crossing there do not count (the request collapsed at that step).
    valid = curve.iloc[:-1] if status == "collapsed" and "perplexity" in reason and len(curve) > 1 else curve
    steps = valid.step.to_numpy()
    wide = traj.pivot(index="step", columns="example_id", values="forgotten").loc[steps, request.example_ids]
    # Censored at the last valid evaluation: a request that stopped early (all forgotten, or collapsed) did not
    # observe its remaining examples beyond it, so max_steps would overstate their steps to forget.
    per_steps, censored = metrics.steps_to_forget(steps, wide.to_numpy(), int(steps[-1]))
    forget_scores = forget_scores.set_index("example_id").loc[request.example_ids]  # the request's rows
    forgetting = pd.DataFrame({"example_id": request.example_ids, "kind": forget_scores.kind.to_numpy(),
                                "repetitions": forget_scores.repetitions.to_numpy(), "steps_to_forget": per_steps,
                                "censored": censored, "memorization": forget_scores.memorization.to_numpy(),
                                "exposure_memorization": forget_scores.exposure_memorization.to_numpy(),
                                "difficulty": forget_scores.difficulty.to_numpy(),
                                "exposure_original": evaluator.e_0, "exposure_oracle": evaluator.e_r,
                                "exposure_final": traj[traj.step == steps[-1]].exposure.to_numpy()})
    for col in ("cf_memorization", "cf_difficulty"):
        if col in forget_scores:
            forgetting[col] = forget_scores[col].to_numpy()
    uq = valid.uq.to_numpy()
    v_steps = valid.step.to_numpy()
    unlearned_step = metrics.first_crossing(v_steps[1:], uq[1:], cfg.metrics.uq_target) if len(v_steps) > 1 else None
    at = curve[curve.step == unlearned_step].iloc[0] if unlearned_step is not None else None
    first = curve.iloc[0]
    nothing = bool(first.nothing_to_forget)
    outcomes = request_outcomes(valid, cfg.metrics.uq_target, status == "collapsed", int(curve.step.iloc[-1]))
    auc = metrics.uq_auc(v_steps, uq, cfg.unlearn.max_steps) if len(v_steps) else float("nan")
    result = {
        "request": request.name, "kind": request.kind, "repetitions": request.repetitions,
        "group": request.group, "n_examples": len(request.example_ids), "method": cfg.unlearn.method,
        "lr": cfg.unlearn.lr,
        "status": "nothing_to_forget" if nothing and status != "collapsed" else status,
        "stop_reason": reason, "steps_run": steps_run, "collapsed": status == "collapsed",
        "unlearned": unlearned_step is not None, "steps_to_unlearn": unlearned_step,
        "outcome": outcomes[f"{cfg.metrics.uq_target:g}"]["outcome"], "outcomes": outcomes, "uq_auc": auc,
        # the first evaluated step at or above UQ 0.5 / 0.8 (the request table's step_uq_* are interpolated)
        "eval_step_uq_0.5": metrics.first_crossing(v_steps[1:], uq[1:], 0.5),
        "eval_step_uq_0.8": metrics.first_crossing(v_steps[1:], uq[1:], 0.8),
        "utility_drop_at_unlearned": float(at.utility_drop) if at is not None else None,
        "id_holdout_ppl_at_unlearned": float(at.id_holdout_ppl) if at is not None else None,
        "uq_final": float(curve.uq.iloc[-1]), "uq_max": float(np.nanmax(curve.uq)),
        "uq_example_final": float(curve.uq_example.iloc[-1]), "forget_quality_final": float(curve.forget_quality.iloc[-1]),
        "utility_drop_final": float(curve.utility_drop.iloc[-1]),
        "exposure_original_mean": float(np.mean(evaluator.e_0)), "exposure_oracle_mean": float(np.mean(evaluator.e_r)),
        "exposure_gap_bits": float(first.gap), "nothing_to_forget": nothing,
        "forgotten_fraction_final": float(curve.forgotten_fraction.iloc[-1]),
        "steps_to_forget_mean": float(per_steps.mean()), "censored_fraction": float(censored.mean()),
        "memorization_mean": float(forgetting.memorization.mean()),
        "difficulty_mean": float(forgetting.difficulty.mean()),
        "id_holdout_ppl_0": float(evaluator.ppl_0), "wall_seconds": wall, "eval_seconds": evaluator.seconds,
        "eval_share": evaluator.seconds / wall if wall else None,
    }
    return result, forgetting


def request_outcomes(curve: pd.DataFrame, uq_target: float, collapsed: bool, last_step: int) -> dict[str, dict]:
    """`request_outcome` at 0.5, 0.8, 0.9 and the configured target, keyed by the target as `f"{t:g}"`."""
    return {f"{t:g}": request_outcome(curve, t, collapsed, last_step)
            for t in sorted({*metrics.UQ_TARGETS, float(uq_target)})}


def request_outcome(curve: pd.DataFrame, target: float, collapsed: bool, last_step: int) -> dict:
    """How a request ended with respect to one UQ target: `unlearned` at the crossing step (interpolated linearly
    in log(1+step) between evaluations), `collapsed` (the request collapsed first) or `censored` (stopped first), at
    the last step observed. With the utility cost there: log(ppl/ppl_0) on the ID holdout, interpolated the same
    way."""
    steps, uq = curve.step.to_numpy(), curve.uq.to_numpy()
    step = metrics.interpolated_crossing(steps, uq, target) if len(steps) > 1 else None
    if step is None:
        return {"outcome": "collapsed" if collapsed else "censored", "step": float(last_step), "grid_step": None,
                "log_ppl_ratio": None, "utility_drop": None}
    log_ratio = np.log1p(curve.utility_drop.to_numpy().astype(float))
    lr = float(metrics.value_at_step(steps, log_ratio, step))
    return {"outcome": "unlearned", "step": float(step),
            "grid_step": int(metrics.first_crossing(steps[1:], uq[1:], target)),
            "log_ppl_ratio": lr, "utility_drop": float(np.expm1(lr))}


def request_cost(u: Unlearner, evaluator: RequestEvaluator, n_evals: int, steps_run: int, wall: float) -> dict:
    """What the request cost: estimated FLOPs (4·N + 2·N_trained per trained token, i.e. 6·N when every weight is
    trained, 2·N per scored token, plus 2·N per token of the frozen θ₀ for methods that use it; N = parameters),
    device-seconds (wall time x devices it held), peak memory, the trained parameters and the bytes of this process's
    optimizer state (what LoRA saves)."""
    from unlearnbench.distributed import peak_memory_mib
    from unlearnbench.models import n_params
    from unlearnbench.unlearn.lora import optimizer_state_bytes, trainable_params

    unwrapped = u.worker.acc.unwrap_model(u.model) if not u.worker.job_parallel else u.model
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
