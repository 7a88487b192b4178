"""The stages of one run: prepare -> train -> score -> unlearn -> report, each skippable and resumable."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from unlearnbench import metrics
from unlearnbench.data.prepare import load_examples, load_tokenizer, prepare
from unlearnbench.distributed import inference_model, peak_memory_mib
from unlearnbench.io import read_json, write_json, write_parquet
from unlearnbench.models import load_trained
from unlearnbench.runner import Context, clear_outputs, finish_stage, on_main_or_fail, require, should_run
from unlearnbench.scoring import score_pass
from unlearnbench.tracking import Tracker
from unlearnbench.train import train_model

EVAL_SPLITS = ("forget", "reference", "holdout", "retain")


def tracker(ctx: Context, job_type: str) -> Tracker:
    """A tracking session for one stage invocation."""
    return Tracker(ctx.cfg, ctx.run_dir, job_type, ctx.is_main)


def run_prepare(ctx: Context) -> None:
    """Build and write every data set (main process), all processes wait."""
    if not should_run(ctx, "prepare"):
        return
    clear_outputs(ctx, "prepare")
    t0 = time.perf_counter()
    man = on_main_or_fail(ctx.acc, lambda: prepare(ctx.cfg, ctx.run_dir / "data"))
    ctx.acc.print(f"[prepare] {man['total_examples']} examples, vocabulary {man['vocab_size']}; "
                  f"original trains on {man['training_mixture']['original']['sequences']} sequences, "
                  f"oracle on {man['training_mixture']['oracle']['sequences']}")
    finish_stage(ctx, "prepare", {"seconds": time.perf_counter() - t0, **peak_memory_mib()})


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


def run_train(ctx: Context) -> None:
    """Train original and oracle (and K shadow models), resuming from checkpoints."""
    require(ctx, "prepare")
    if not should_run(ctx, "train"):
        return
    if ctx.force:
        clear_outputs(ctx, "train")
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    trk = tracker(ctx, "train")
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
    finish_stage(ctx, "train", {"models": infos, **peak_memory_mib()})


def eval_subset(examples):
    """The examples that are scored: forget, reference, holdout and retain."""
    keep = [i for i, s in enumerate(examples["split"]) if s in EVAL_SPLITS]
    return examples.select(keep)


def loss_column(cfg) -> str:
    """The per-example loss behind exposure: nll (per token) or nll_sum."""
    return cfg.metrics.loss


def exposures(scored: pd.DataFrame, loss: str, example_ids) -> pd.DataFrame:
    """Rank and extrapolated exposure of `example_ids` against the references of their kind (one fit per kind).

    `scored` is the example metadata merged with one model's scores; rows come back in `example_ids` order.
    """
    wanted = scored.example_id.isin(example_ids)
    out = []
    for _, group in scored.groupby("kind"):
        targets = group[wanted.loc[group.index]]
        if targets.empty:
            continue
        refs = group[group.split == "reference"][loss].to_numpy()
        fit = metrics.fit_skewnorm(refs)
        out.append(pd.DataFrame({
            "example_id": targets.example_id.to_numpy(), "nll": targets.nll.to_numpy(),
            "exposure_rank": metrics.rank_exposure(targets[loss].to_numpy(), refs),
            "exposure_extrapolated": metrics.extrapolated_exposure(targets[loss].to_numpy(), refs, fit=fit)}))
    return pd.concat(out).set_index("example_id").loc[list(example_ids)].reset_index()


def utility_table(scores: pd.DataFrame, meta: pd.DataFrame) -> dict:
    """Perplexity and token accuracy on the ID holdout, the domain holdout and the retain sample."""
    df = meta.merge(scores, on="example_id")
    sets = {"id_holdout": (df.split == "holdout") & (df.kind == "id"),
            "domain_holdout": (df.split == "holdout") & (df.kind == "domain"),
            "retain": df.split == "retain"}
    out = {}
    for name, sel in sets.items():
        part = df[sel]
        if part.empty:
            continue
        out[f"{name}_nll"] = float(metrics.mean_nll(part.nll_sum.to_numpy(), part.n_tokens.to_numpy()))
        out[f"{name}_ppl"] = float(metrics.perplexity(part.nll_sum.to_numpy(), part.n_tokens.to_numpy()))
        out[f"{name}_acc"] = float(metrics.token_accuracy(part.n_correct.to_numpy(), part.n_tokens.to_numpy()))
    return out


def score_model(ctx: Context, name: str, subset, tok) -> tuple[pd.DataFrame, dict]:
    """One sharded pass of a trained model over the evaluation examples."""
    raw = load_trained(ctx.run_dir, name, ctx.cfg.model.dtype)
    vocab = raw.config.vocab_size
    model = inference_model(ctx.acc, raw)
    df, stats = score_pass(ctx.acc, model, subset, ctx.cfg.score.batch_size, tok.pad_token_id or 0, vocab)
    del model
    return df, {"examples": stats.examples, "seconds": stats.seconds, "padding_fraction": stats.padding_fraction,
                "examples_per_s": stats.examples / max(stats.seconds, 1e-9)}


def run_score(ctx: Context) -> None:
    """Score original and oracle (and shadows); per-example exposure, memorization and difficulty."""
    require(ctx, "train")
    if not should_run(ctx, "score"):
        return
    clear_outputs(ctx, "score")
    cfg = ctx.cfg
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    subset = eval_subset(examples)
    meta = subset.select_columns(["example_id", "kind", "repetitions", "split"]).to_pandas()
    trk = tracker(ctx, "score")
    names = ["original", "oracle"] + [f"shadow_{j}" for j in range(cfg.score.shadow_models)]
    scores, info = {}, {}
    for name in names:
        scores[name], info[name] = score_model(ctx, name, subset, tok)
        if ctx.is_main:
            write_parquet(ctx.run_dir / "scores" / f"{name}.parquet", meta.merge(scores[name], on="example_id"))
        ctx.acc.print(f"[score] {name}: {info[name]['examples']} examples in {info[name]['seconds']:.1f}s "
                      f"(padding {info[name]['padding_fraction']:.1%})")
    table = forget_table(cfg, meta, scores, ctx.run_dir)
    utility = {name: utility_table(scores[name], meta) for name in ("original", "oracle")}
    groups = group_summary(table)
    if ctx.is_main:
        write_parquet(ctx.run_dir / "scores" / "examples.parquet", table)
        write_json(ctx.run_dir / "scores" / "utility.json", utility)
        write_json(ctx.run_dir / "scores" / "groups.json", groups.to_dict(orient="records"))
        trk.log_table("score/examples", table)
        for rec in groups.to_dict(orient="records"):
            trk.log({f"score/{rec['kind']}_r{rec['repetitions']}/{k}": v for k, v in rec.items()
                     if k not in ("kind", "repetitions")})
        trk.summary({f"utility/{m}/{k}": v for m, u in utility.items() for k, v in u.items()})
    ctx.acc.print(format_group_table(groups))
    ctx.acc.print("[score] utility: " + ", ".join(f"{m} ID-holdout ppl {u.get('id_holdout_ppl', float('nan')):.1f}"
                                                  for m, u in utility.items()))
    trk.finish()
    finish_stage(ctx, "score", {"passes": info, **peak_memory_mib()})


def forget_table(cfg, meta: pd.DataFrame, scores: dict, run_dir: Path) -> pd.DataFrame:
    """One row per forget example: losses and exposures under original and oracle, memorization, difficulty."""
    loss = loss_column(cfg)
    forget = meta[meta.split == "forget"][["example_id", "kind", "repetitions"]].reset_index(drop=True)
    table = forget.copy()
    for name in ("original", "oracle"):
        s = scores[name].set_index("example_id")
        table[f"nll_{name}"] = s.loc[table.example_id, "nll"].to_numpy()
        table[f"loss_{name}"] = s.loc[table.example_id, loss].to_numpy()
        table[f"acc_{name}"] = s.loc[table.example_id, "acc"].to_numpy()
        exp = exposures(meta.merge(scores[name], on="example_id"), loss, table.example_id).set_index("example_id")
        for form in ("rank", "extrapolated"):
            table[f"exposure_{form}_{name}"] = exp.loc[table.example_id, f"exposure_{form}"].to_numpy()
        table[f"exposure_{name}"] = table[f"exposure_{cfg.metrics.exposure}_{name}"]
    table["memorization"] = metrics.memorization(table.nll_original.to_numpy(), table.nll_oracle.to_numpy())
    table["exposure_memorization"] = metrics.exposure_memorization(table.exposure_original.to_numpy(),
                                                                   table.exposure_oracle.to_numpy())
    table["difficulty"] = metrics.difficulty(table.nll_oracle.to_numpy())
    k = cfg.score.shadow_models
    if k:
        masks = read_json(run_dir / "models" / "shadow_masks.json")
        losses = np.stack([scores[f"shadow_{j}"].set_index("example_id").loc[table.example_id, "nll"].to_numpy()
                           for j in range(k)])
        trained = np.array([[masks[j][e] for e in table.example_id] for j in range(k)], dtype=bool)
        table["cf_memorization"] = metrics.counterfactual_memorization(losses, trained)
        table["cf_difficulty"] = metrics.counterfactual_difficulty(losses, trained)
    return table


def group_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Means per (kind, repetitions): exposure under original and oracle, memorization, difficulty, counts."""
    agg = {"n": ("example_id", "size"), "exposure_original": ("exposure_original", "mean"),
           "exposure_oracle": ("exposure_oracle", "mean"),
           "rank_exposure_original": ("exposure_rank_original", "mean"),
           "rank_exposure_oracle": ("exposure_rank_oracle", "mean"),
           "nll_original": ("nll_original", "mean"), "nll_oracle": ("nll_oracle", "mean"),
           "memorization": ("memorization", "mean"), "difficulty": ("difficulty", "mean")}
    return table.groupby(["kind", "repetitions"]).agg(**agg).reset_index()


def format_group_table(groups: pd.DataFrame) -> str:
    """The per-(kind, repetitions) table printed by the score stage."""
    head = (f"{'kind':<7} {'reps':>4} {'n':>4} {'exp θ0':>8} {'exp θr':>8} {'rank θ0':>8} {'rank θr':>8} "
            f"{'nll θ0':>7} {'nll θr':>7} {'mem':>6} {'diff':>6}")
    lines = ["[score] exposure in bits (extrapolated and rank), nll in nats/token", head, "-" * len(head)]
    for r in groups.itertuples():
        lines.append(f"{r.kind:<7} {r.repetitions:>4} {r.n:>4} {r.exposure_original:>8.2f} {r.exposure_oracle:>8.2f} "
                     f"{r.rank_exposure_original:>8.2f} {r.rank_exposure_oracle:>8.2f} {r.nll_original:>7.3f} "
                     f"{r.nll_oracle:>7.3f} {r.memorization:>6.3f} {r.difficulty:>6.3f}")
    return "\n".join(lines)

