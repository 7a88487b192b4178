"""Evaluation shared by the score and unlearn stages (and anything after them): which examples are scored, the
exposure of a set against its references, the utility sets, and the per-request evaluator of the unlearning loop.

Scores come from `scoring.score_pass` (which knows nothing of exposure); the numbers from the pure `metrics`.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from unlearnbench import metrics
from unlearnbench.scoring import score_pass

EVAL_SPLITS = ("forget", "reference", "holdout", "retain")


def eval_subset(examples):
    """The examples that are scored: forget, reference, holdout and retain."""
    keep = [i for i, s in enumerate(examples["split"]) if s in EVAL_SPLITS]
    return examples.select(keep)


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
        out[f"{name}_accuracy"] = float(metrics.token_accuracy(part.n_correct.to_numpy(), part.n_tokens.to_numpy()))
    return out


class RequestEvaluator:
    """Scores a model on a request's examples, their references and the utility sets; turns that into metrics.

    In-loop evaluations score a fixed, seeded sample of at most `unlearn.eval_references` references per kind and
    `unlearn.eval_utility` examples per utility set (0: all), the same sample at every step, step 0 included; the
    oracle's exposure is recomputed against the same references from θᵣ's stored scores, so UQ compares like with
    like. `evaluate_full` scores every reference and utility example once, for the final state.
    `local=True`: this process scores alone (request-parallel unlearning), no collective operation.
    """

    def __init__(self, acc, cfg, example_ids: list[str], subset, meta: pd.DataFrame, forget_table: pd.DataFrame,
                 pad_id: int, local: bool = False, oracle_scores: pd.DataFrame | None = None):
        self.acc, self.cfg, self.example_ids, self.local = acc, cfg, list(example_ids), local
        kinds = set(meta.set_index("example_id").loc[self.example_ids, "kind"])
        target = meta.example_id.isin(self.example_ids).to_numpy()
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
        table = forget_table.set_index("example_id").loc[self.example_ids]
        self.e_r_full = table[f"{col}_oracle"].to_numpy()
        self.e_0_full = table[f"{col}_original"].to_numpy() if f"{col}_original" in table else None
        if self.sampled and oracle_scores is not None:
            scored = self.meta.merge(oracle_scores[["example_id", "nll", "nll_sum"]], on="example_id")
            self.e_r = exposures(scored, cfg.metrics.loss, self.example_ids)[col].to_numpy()
        else:
            self.e_r = self.e_r_full
        self.e_0: np.ndarray | None = None
        self.ppl_0: float | None = None
        self.seconds = 0.0

    def evaluate(self, model, step: int) -> tuple[dict, pd.DataFrame]:
        """Curve row and per-example trajectory rows at this step."""
        cfg = self.cfg
        t0 = time.perf_counter()
        scores, _ = score_pass(self.acc, model, self.data, cfg.score.batch_size, self.pad_id, local=self.local)
        self.seconds += time.perf_counter() - t0
        traj = exposures(self.meta.merge(scores, on="example_id"), cfg.metrics.loss, self.example_ids)
        traj["exposure"] = traj[f"exposure_{cfg.metrics.exposure}"]
        e_t = traj.exposure.to_numpy()
        e_r = self.e_r
        if self.e_0 is None:
            self.e_0 = e_t.copy()
        traj["forgotten"] = metrics.forgotten(e_t, e_r, cfg.metrics.tolerance_bits)
        traj.insert(0, "step", step)
        q = metrics.uq_with_ci(e_t, self.e_0, e_r, cfg.metrics.uq_min_gap_bits, cfg.metrics.n_boot, cfg.run.seed,
                               alpha=cfg.metrics.alpha)
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
        scores, _ = score_pass(self.acc, model, self.full_data, cfg.score.batch_size, self.pad_id, local=self.local)
        self.seconds += time.perf_counter() - t0
        traj = exposures(self.full_meta.merge(scores, on="example_id"), cfg.metrics.loss, self.example_ids)
        e_t = traj[f"exposure_{cfg.metrics.exposure}"].to_numpy()
        e_0 = self.e_0_full if self.e_0_full is not None else self.e_0
        uq = metrics.unlearning_quality(e_t, e_0, self.e_r_full, cfg.metrics.uq_min_gap_bits).uq
        util = utility_table(scores, self.full_meta)
        return {"uq_final_all": float(uq), "exposure_final_all_mean": float(e_t.mean()),
                "forgotten_fraction_final_all": float(metrics.forgotten(e_t, self.e_r_full,
                                                                        cfg.metrics.tolerance_bits).mean()),
                "id_holdout_ppl_final_all": float(util["id_holdout_ppl"])}
