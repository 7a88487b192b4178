"""The score stage: one sharded pass of each trained model over the evaluation examples, then per forget example
its exposure under original and oracle, memorization and difficulty (`scores/`).

Without an oracle (`train.oracle=false`) e_r, the `exposure_*_oracle` columns, is the held-out-reference estimate
(`evaluation.held_out_e_r`): per kind, the mean leave-one-out exposure of the references under θ₀; the θᵣ losses,
memorization and difficulty are NaN, and `e_r_source` says which was used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from unlearnbench import metrics
from unlearnbench.data.build import load_examples, load_tokenizer
from unlearnbench.distributed import inference_model, peak_memory_mib
from unlearnbench.evaluation import e_r_source, eval_subset, exposures, held_out_e_r, utility_table
from unlearnbench.io import read_json, write_json, write_parquet
from unlearnbench.models import load_trained, n_params
from unlearnbench.records import clear_outputs, finish_stage, require, should_run
from unlearnbench.rundir import Context
from unlearnbench.scoring import score_pass
from unlearnbench.tracking import open_tracker

NAME = "score"


def score_model(ctx: Context, name: str, subset, tok) -> tuple[pd.DataFrame, dict]:
    """One sharded pass of a trained model over the evaluation examples."""
    raw = load_trained(ctx.run_dir, name, ctx.cfg.model.dtype)
    vocab = raw.config.vocab_size
    model = inference_model(ctx.acc, raw)
    df, stats = score_pass(ctx.acc, model, subset, ctx.cfg.score.batch_size, tok.pad_token_id or 0, vocab,
                           batch_tokens=ctx.cfg.score.batch_tokens)
    del model
    # estimated FLOPs: a forward pass, 2N per computed token slot (padding included: it is computed too)
    return df, {"examples": stats.examples, "seconds": stats.seconds, "padding_fraction": stats.padding_fraction,
                "examples_per_s": stats.examples / max(stats.seconds, 1e-9), "token_slots": stats.slots,
                "flops": float(2 * n_params(raw) * stats.slots)}


def run(ctx: Context) -> None:
    """Score original and oracle (and shadows); per-example exposure, memorization and difficulty."""
    require(ctx, "train")
    if not should_run(ctx, NAME):
        return
    clear_outputs(ctx, NAME)
    cfg = ctx.cfg
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    subset = eval_subset(examples)
    meta = subset.select_columns(["example_id", "kind", "repetitions", "group", "split"]).to_pandas()
    trk = open_tracker(ctx, NAME)
    names = ["original"] + (["oracle"] if cfg.train.oracle else []) + [f"shadow_{j}" for j in range(cfg.score.shadow_models)]
    scores, info = {}, {}
    for name in names:
        scores[name], info[name] = score_model(ctx, name, subset, tok)
        if ctx.is_main:
            write_parquet(ctx.run_dir / "scores" / f"{name}.parquet", meta.merge(scores[name], on="example_id"))
        ctx.acc.print(f"[score] {name}: {info[name]['examples']} examples in {info[name]['seconds']:.1f}s "
                      f"(padding {info[name]['padding_fraction']:.1%})")
    forget_scores = build_forget_scores(cfg, meta, scores, ctx.run_dir)
    utility = {name: utility_table(scores[name], meta) for name in ("original", "oracle") if name in scores}
    cells = cell_summary(forget_scores)
    if ctx.is_main:
        write_parquet(ctx.run_dir / "scores" / "forget.parquet", forget_scores)
        write_json(ctx.run_dir / "scores" / "utility.json", utility)
        write_json(ctx.run_dir / "scores" / "cells.json", cells.to_dict(orient="records"))
        trk.log_table("score/forget", forget_scores)
        for rec in cells.to_dict(orient="records"):
            trk.log({f"score/{rec['kind']}_r{rec['repetitions']}/{k}": v for k, v in rec.items()
                     if k not in ("kind", "repetitions")})
        trk.summary({f"utility/{m}/{k}": v for m, u in utility.items() for k, v in u.items()})
    ctx.acc.print(format_cell_table(cells))
    ctx.acc.print("[score] utility: " + ", ".join(f"{m} ID-holdout ppl {u.get('id_holdout_ppl', float('nan')):.1f}"
                                                  for m, u in utility.items()))
    if not cfg.train.oracle:
        ctx.acc.print("[score] no oracle (train.oracle=false): e_r is the mean leave-one-out exposure of each kind's "
                      "held-out references under θ₀; memorization and difficulty need θᵣ and are not computed")
    trk.finish()
    flops = float(sum(i["flops"] for i in info.values()))
    finish_stage(ctx, NAME, {"passes": info, "e_r_source": e_r_source(cfg), "flops": flops, **peak_memory_mib()})


def build_forget_scores(cfg, meta: pd.DataFrame, scores: dict, run_dir: Path) -> pd.DataFrame:
    """One row per forget example: losses and exposures under original and oracle, memorization, difficulty.

    Without oracle scores (no-oracle mode) the oracle columns hold e_r from the held-out references (one value per
    kind, `held_out_e_r` under θ₀) and NaN losses."""
    loss = cfg.metrics.loss
    forget = meta[meta.split == "forget"][["example_id", "kind", "repetitions", "group"]].reset_index(drop=True)
    forget_scores = forget.copy()
    if "oracle" not in scores:
        e_r = held_out_e_r(meta.merge(scores["original"], on="example_id"), loss).set_index("kind")
        for col in ("nll_oracle", "loss_oracle", "accuracy_oracle"):
            forget_scores[col] = np.nan
        for form in ("rank", "extrapolated"):
            forget_scores[f"exposure_{form}_oracle"] = e_r.loc[forget_scores.kind,
                                                                f"exposure_{form}"].to_numpy(dtype=float)
        forget_scores["exposure_oracle"] = forget_scores[f"exposure_{cfg.metrics.exposure}_oracle"]
    for name in [n for n in ("original", "oracle") if n in scores]:
        s = scores[name].set_index("example_id")
        forget_scores[f"nll_{name}"] = s.loc[forget_scores.example_id, "nll"].to_numpy()
        forget_scores[f"loss_{name}"] = s.loc[forget_scores.example_id, loss].to_numpy()
        forget_scores[f"accuracy_{name}"] = s.loc[forget_scores.example_id, "accuracy"].to_numpy()
        exp = exposures(meta.merge(scores[name], on="example_id"), loss,
                        forget_scores.example_id).set_index("example_id")
        for form in ("rank", "extrapolated"):
            forget_scores[f"exposure_{form}_{name}"] = exp.loc[forget_scores.example_id, f"exposure_{form}"].to_numpy()
        forget_scores[f"exposure_{name}"] = forget_scores[f"exposure_{cfg.metrics.exposure}_{name}"]
    forget_scores["e_r_source"] = "oracle" if "oracle" in scores else "held_out_references"
    forget_scores["memorization"] = metrics.memorization(forget_scores.nll_original.to_numpy(),
                                                         forget_scores.nll_oracle.to_numpy())
    forget_scores["exposure_memorization"] = metrics.exposure_memorization(forget_scores.exposure_original.to_numpy(),
                                                                           forget_scores.exposure_oracle.to_numpy())
    forget_scores["difficulty"] = metrics.difficulty(forget_scores.nll_oracle.to_numpy())
    k = cfg.score.shadow_models
    if k:
        masks = read_json(run_dir / "models" / "shadow_masks.json")
        losses = np.stack([scores[f"shadow_{j}"].set_index("example_id").loc[forget_scores.example_id,
                                                                                 "nll"].to_numpy() for j in range(k)])
        trained = np.array([[masks[j][e] for e in forget_scores.example_id] for j in range(k)], dtype=bool)
        forget_scores["cf_memorization"] = metrics.counterfactual_memorization(losses, trained)
        forget_scores["cf_difficulty"] = metrics.counterfactual_difficulty(losses, trained)
    return forget_scores


def cell_summary(forget_scores: pd.DataFrame) -> pd.DataFrame:
    """Means per (kind, repetitions): exposure under original and oracle, memorization, difficulty, counts."""
    agg = {"n": ("example_id", "size"), "exposure_original": ("exposure_original", "mean"),
           "exposure_oracle": ("exposure_oracle", "mean"),
           "rank_exposure_original": ("exposure_rank_original", "mean"),
           "rank_exposure_oracle": ("exposure_rank_oracle", "mean"),
           "nll_original": ("nll_original", "mean"), "nll_oracle": ("nll_oracle", "mean"),
           "memorization": ("memorization", "mean"), "difficulty": ("difficulty", "mean")}
    return forget_scores.groupby(["kind", "repetitions"]).agg(**agg).reset_index()


def format_cell_table(cells: pd.DataFrame) -> str:
    """The per-(kind, repetitions) table printed by the score stage."""
    head = (f"{'kind':<7} {'reps':>4} {'n':>4} {'exp θ0':>8} {'exp θr':>8} {'rank θ0':>8} {'rank θr':>8} "
            f"{'nll θ0':>7} {'nll θr':>7} {'mem':>6} {'diff':>6}")
    lines = ["[score] exposure in bits (extrapolated and rank), nll in nats/token", head, "-" * len(head)]
    for r in cells.itertuples():
        lines.append(f"{r.kind:<7} {r.repetitions:>4} {r.n:>4} {r.exposure_original:>8.2f} {r.exposure_oracle:>8.2f} "
                     f"{r.rank_exposure_original:>8.2f} {r.rank_exposure_oracle:>8.2f} {r.nll_original:>7.3f} "
                     f"{r.nll_oracle:>7.3f} {r.memorization:>6.3f} {r.difficulty:>6.3f}")
    return "\n".join(lines)

