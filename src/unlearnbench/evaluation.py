"""Evaluation shared by the score and unlearn stages (and anything after them): which examples are scored, the
exposure of a set against its references, the utility sets, and the per-request evaluator of the unlearning loop.

Scores come from `scoring.score_pass` (which knows nothing of exposure); the numbers from the pure `metrics`.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from unlearnbench import metrics
from unlearnbench.scoring import score_pass

EVAL_SPLITS = ("forget", "reference", "holdout", "retain")
UTILITY_SPLITS = ("holdout", "retain")
_SCORES = ["example_id", "nll_sum", "n_tokens", "n_correct", "nll"]
_COLUMNS = ["example_id", "input_ids", "score_start", "score_end"]


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


def e_r_source(cfg) -> str:
    """Where e_r comes from: the oracle θᵣ (`train.oracle=true`) or held-out references (the no-oracle mode)."""
    return "oracle" if cfg.train.oracle else "held_out_references"


def held_out_e_r(scored: pd.DataFrame, loss: str) -> pd.DataFrame:
    """The no-oracle e_r of each kind, both exposure variants (docs/definitions.md section 11): the mean over the
    kind's references r of r's exposure against the *other* references, e(r; R minus r), under the model that
    `scored` holds (θ₀). One row per kind: `kind`, `exposure_rank`, `exposure_extrapolated`, `n_references`."""
    rows = []
    for kind, group in scored[scored.split == "reference"].groupby("kind"):
        refs = group[loss].to_numpy(dtype=float)
        rows.append({"kind": kind, "n_references": int(len(refs)),
                     **{f"exposure_{v}": float(np.nanmean(metrics.leave_one_out_exposure(refs, v)))
                        for v in metrics.EXPOSURE_KINDS}})
    return pd.DataFrame(rows, columns=["kind", "exposure_rank", "exposure_extrapolated", "n_references"])


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


def sample_rows(meta: pd.DataFrame, mask: np.ndarray, cap: int, seed: int,
                strata: pd.Series | None = None) -> np.ndarray:
    """Positions of the rows of `meta[mask]` an in-loop evaluation scores: per (split, kind) group every row, or a
    seeded sample of `cap` rows when the group is larger (cap 0: all).

    Each group draws from its own stream, keyed by `run.seed` and the group's name, so a group's sample is the
    same in every evaluator whatever else it samples (a canary request and an ID request share the utility sample).
    With `strata` (a value per example_id, e.g. θ₀'s loss) the sample is stratified: the group, sorted by that
    value, is cut into `cap` equal strata and one row is drawn from each, so the sample spans the group's whole
    range, tails included.
    """
    out = [np.zeros(0, dtype=np.int64)]
    for (split, kind), group in meta[mask].groupby(["split", "kind"], sort=True):
        rows = group.index.to_numpy()
        if 0 < cap < len(rows):
            rng = np.random.default_rng([seed, 7919, zlib.crc32(f"{split}/{kind}".encode())])
            if strata is not None and group.example_id.isin(strata.index).all():
                value = strata.loc[group.example_id].to_numpy()
                ordered = rows[np.lexsort((group.example_id.to_numpy(), value))]
                edges = np.linspace(0, len(rows), cap + 1).round().astype(np.int64)
                rows = np.sort(ordered[rng.integers(edges[:-1], edges[1:])])
            else:
                rows = np.sort(rng.choice(rows, size=cap, replace=False))
        out.append(rows)
    return np.concatenate(out)


def _stored_scores(cfg, model: str) -> pd.DataFrame | None:
    """The score stage's per-example scores of `model` (`scores/<model>.parquet` in `run.dir`), if there."""
    path = Path(cfg.run.dir) / "scores" / f"{model}.parquet" if cfg.run.dir else None
    return pd.read_parquet(path, columns=_SCORES) if path is not None and path.exists() else None


class RequestEvaluator:
    """Scores a model on a request's examples, their references and the utility sets; turns that into metrics.

    What an evaluation measures (README, "In-loop evaluation"; docs/definitions.md, sections 4 and 7):

    - **e₀ and e_r** are the score stage's exposures of the request's examples under θ₀ and θᵣ against *every*
      reference of their kind (`forget_scores` columns `exposure_<variant>_original` / `_oracle`): the numbers the
      score stage and the final check use. The loop never re-estimates them, so UQ's denominator ē₀ − ē_r, which
      for a strongly memorized request lies far out in the fitted tail, carries no sampling error. In the no-oracle
      mode (`train.oracle=false`) the `_oracle` columns hold the held-out-reference e_r (`held_out_e_r`), and
      everything below is unchanged.
    - **Step 0 is θ₀**, the model the score stage scored. The evaluator checks that by rescoring the request's own
      examples (one small pass) against their stored θ₀ losses; when they agree, every step-0 number is the score
      stage's: exposures against every reference, so e_t = e₀ and UQ₀ = 0 exactly; utility from θ₀'s stored scores
      on the utility sample, so the utility drop is 0. This choice (rather than measuring step 0 on the sample)
      keeps UQ₀ = 0 by definition and saves the step-0 pass. A model that is not θ₀ (or a run without stored θ₀
      scores) is measured at step 0 instead, against every reference and the utility sample.
    - **Steps > 0** rescore a fixed, seeded sample (`sample_rows`): at most `unlearn.eval_references` references
      per kind (stratified by θ₀'s loss) and `unlearn.eval_utility` examples per utility set (0: all), the same
      sample at every step and in every evaluator. e_t is the exposure against the sampled references, refitted
      at each evaluation; the utility drop is ppl_t / ppl₀ − 1 with ppl₀ θ₀'s perplexity on the same utility
      sample, from `scores/original.parquet`. With `metrics.exposure=rank` references are not sampled: rank
      exposure saturates at log2(|R| + 1), so a sample's ceiling would differ from e₀'s.
    - **`evaluate_full`** scores the final state against every reference and the whole ID holdout (what its
      numbers use): `uq_final_all` and companions, the check on the sample. Examples the last evaluation scored
      are not scored again when the model is still in that state (its request's losses unchanged).

    `seconds` is the evaluator's own wall time (scoring and metrics), `tokens_scored` the tokens its passes read.
    `job_parallel=True`: this process scores alone (job-parallel unlearning), no collective operation.
    θᵣ's exposures come from `forget_scores` (`scores/forget.parquet`; no-oracle mode: the held-out-reference e_r);
    θ₀'s stored scores are read from `run.dir`/scores/original.parquet.
    """

    def __init__(self, acc, cfg, example_ids: list[str], subset, meta: pd.DataFrame,
                 forget_scores: pd.DataFrame, pad_id: int, job_parallel: bool = False):
        self.acc, self.cfg, self.example_ids, self.pad_id = acc, cfg, list(example_ids), pad_id
        self.job_parallel = job_parallel
        self.subset, self.seconds, self.tokens_scored = subset, 0.0, 0
        variant = cfg.metrics.exposure
        forget_scores = forget_scores.set_index("example_id").loc[self.example_ids]  # the request's rows
        self.e_r = forget_scores[f"exposure_{variant}_oracle"].to_numpy(dtype=float)
        has_e0 = f"exposure_{variant}_original" in forget_scores
        self.e_0: np.ndarray | None = (forget_scores[f"exposure_{variant}_original"].to_numpy(dtype=float)
                                       if has_e0 else None)
        stored = _stored_scores(cfg, "original") if has_e0 and "nll_original" in forget_scores else None

        meta = meta.reset_index(drop=True)
        kinds = set(meta.set_index("example_id").loc[self.example_ids, "kind"])
        target = meta.example_id.isin(self.example_ids).to_numpy()
        refs = ((meta.split == "reference") & meta.kind.isin(kinds)).to_numpy()
        util = meta.split.isin(UTILITY_SPLITS).to_numpy()
        full = np.nonzero(target | refs | util)[0]
        if stored is not None and not meta.example_id.iloc[full].isin(stored.example_id).all():
            stored = None  # scores of another data set: measure step 0 instead
        ref_cap = 0 if variant == "rank" else cfg.unlearn.eval_references
        strata = stored.set_index("example_id")[cfg.metrics.loss] if stored is not None else None
        util_rows = sample_rows(meta, util, cfg.unlearn.eval_utility, cfg.run.seed)
        idx = np.union1d(np.nonzero(target)[0],
                         np.union1d(sample_rows(meta, refs, ref_cap, cfg.run.seed, strata), util_rows))
        self.sampled = len(idx) < len(full)
        # plain lists once: a lazy `datasets` column costs ~0.2 ms per row lookup, at every evaluation
        self.data = _columns(subset, idx)
        self.meta = meta.iloc[idx].reset_index(drop=True)
        self.full_meta = meta.iloc[full].reset_index(drop=True)  # what an unsampled evaluation scores
        id_holdout = ((meta.split == "holdout") & (meta.kind == "id")).to_numpy()
        self._rows = {"target": np.nonzero(target)[0], "check": np.nonzero(target | refs | id_holdout)[0],
                      "step0": np.union1d(np.nonzero(target | refs)[0], util_rows)}
        self._meta_all, self._parts = meta, {}

        self.ppl_0: float | None = None  # θ₀'s ID-holdout perplexity on the utility sample
        self.ppl_0_all: float | None = None  # ... and on the whole ID holdout
        self._theta0 = None  # the score stage's step-0 numbers
        self._last: pd.DataFrame | None = None  # the scores behind the last evaluation
        if stored is not None:
            traj = pd.DataFrame({"example_id": self.example_ids,
                                 "nll": forget_scores.nll_original.to_numpy(dtype=float)})
            for v in metrics.EXPOSURE_KINDS:
                traj[f"exposure_{v}"] = forget_scores[f"exposure_{v}_original"].to_numpy(dtype=float)
            util_0 = utility_table(stored, self.meta)
            self._theta0 = {"traj": traj, "utility": util_0, "scores": stored}
            self.ppl_0 = util_0["id_holdout_ppl"]
            self.ppl_0_all = utility_table(stored, self.full_meta)["id_holdout_ppl"]

    def state_dict(self) -> dict:
        """What an interrupted request must carry to its resume, as plain data (JSON-ready, floats exact through
        `json`): the evaluator's time and tokens, θ₀'s exposures and perplexity as measured (when not stored), and
        the scores behind the last evaluation: `"theta0"` when they are θ₀'s stored scores, else their columns."""
        last = self._last
        if last is not None and self._theta0 is not None and last is self._theta0["scores"]:
            last = "theta0"
        elif last is not None:
            last = {c: last[c].tolist() for c in _SCORES}
        return {"seconds": self.seconds, "tokens_scored": self.tokens_scored,
                "e_0": None if self.e_0 is None else [float(x) for x in self.e_0],
                "ppl_0": None if self.ppl_0 is None else float(self.ppl_0), "last": last}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` gave, into an evaluator built for the same request and run."""
        self.seconds, self.tokens_scored = float(state["seconds"]), int(state["tokens_scored"])
        self.e_0 = None if state["e_0"] is None else np.asarray(state["e_0"], dtype=float)
        self.ppl_0 = state["ppl_0"]
        last = state["last"]
        if last == "theta0":
            if self._theta0 is None:
                raise ValueError("the evaluator state refers to θ₀'s stored scores, which this evaluator has not")
            self._last = self._theta0["scores"]
        else:
            self._last = None if last is None else pd.DataFrame(last, columns=_SCORES)

    def _part(self, name: str) -> tuple[dict, pd.DataFrame]:
        """Column lists and metadata of a named row set, converted once when first needed."""
        if name not in self._parts:
            rows = self._rows[name]
            self._parts[name] = (_columns(self.subset, rows), self._meta_all.iloc[rows].reset_index(drop=True))
        return self._parts[name]

    @property
    def full_data(self) -> dict:
        """Column lists of what `evaluate_full` scores: the request, every reference of its kind, the ID holdout."""
        return self._part("check")[0]

    def _score(self, model, data: dict) -> pd.DataFrame:
        scores, _ = score_pass(self.acc, model, data, self.cfg.score.batch_size, self.pad_id, local=self.job_parallel,
                               batch_tokens=self.cfg.score.batch_tokens)
        self.tokens_scored += sum(len(x) for x in data["input_ids"])
        return scores

    def _gives(self, model, nll: np.ndarray) -> bool:
        """Whether `model` gives the request's examples these losses (nats/token), float rounding aside: one small
        pass, which tells θ₀ (or the last evaluated state) from a model that took even one unlearning step."""
        scores = self._score(model, self._part("target")[0]).set_index("example_id").loc[self.example_ids]
        tol = 1e-4 if self.cfg.model.dtype == "float32" else 2e-2
        return bool(np.allclose(scores.nll.to_numpy(), nll, rtol=tol, atol=tol))

    def is_theta0(self, model) -> bool:
        """Whether `model` is θ₀ as the score stage scored it (its request's losses are the stored ones)."""
        return self._theta0 is not None and self._gives(model, self._theta0["traj"].nll.to_numpy())

    def evaluate(self, model, step: int) -> tuple[dict, pd.DataFrame]:
        """Curve row and per-example trajectory rows at this step."""
        t0 = time.perf_counter()
        if step == 0 and self.is_theta0(model):
            traj, util = self._theta0["traj"].copy(), dict(self._theta0["utility"])
            self._last = self._theta0["scores"]
        else:
            data, meta = self._part("step0") if step == 0 else (self.data, self.meta)
            scores = self._score(model, data)
            traj = exposures(meta.merge(scores, on="example_id"), self.cfg.metrics.loss, self.example_ids)
            util = utility_table(scores, meta)
            self._last = scores[_SCORES]
        row, traj = self._summarize(step, traj, util)
        self.seconds += time.perf_counter() - t0
        return row, traj

    def _summarize(self, step: int, traj: pd.DataFrame, util: dict) -> tuple[dict, pd.DataFrame]:
        cfg = self.cfg
        traj["exposure"] = traj[f"exposure_{cfg.metrics.exposure}"]
        e_t, e_r = traj.exposure.to_numpy(), self.e_r
        if self.e_0 is None:  # forget scores without θ₀'s exposure: step 0's own, against every reference
            self.e_0 = e_t.copy()
        if self.ppl_0 is None:  # no stored θ₀ scores: step 0's own
            self.ppl_0 = util["id_holdout_ppl"]
        traj["forgotten"] = metrics.forgotten(e_t, e_r, cfg.metrics.tolerance_bits)
        traj.insert(0, "step", step)
        q = metrics.uq_with_ci(e_t, self.e_0, e_r, cfg.metrics.uq_min_gap_bits, cfg.metrics.n_boot, cfg.run.seed,
                               alpha=cfg.metrics.alpha)
        row = {"step": step, **q, "exposure_mean": float(e_t.mean()),
               "exposure_rank_mean": float(traj.exposure_rank.mean()),
               "exposure_oracle_mean": float(e_r.mean()), "forgotten_fraction": float(traj.forgotten.mean()),
               "forget_nll": float(traj.nll.mean()), **util,
               "utility_drop": float(metrics.utility_drop(util["id_holdout_ppl"], self.ppl_0))}
        return row, traj

    def evaluate_full(self, model) -> dict:
        """The final state against every reference and the whole ID holdout, relative to the score stage's θ₀ and
        θᵣ exposures (which used every reference too): the check on the in-loop sample."""
        cfg = self.cfg
        t0 = time.perf_counter()
        data, meta = self._part("check")
        scores = None
        if self._last is not None:
            last = self._last.set_index("example_id")
            if self._gives(model, last.loc[self.example_ids, "nll"].to_numpy()):  # still the last evaluated state
                known = last[last.index.isin(meta.example_id)].reset_index()
                rest = np.flatnonzero(~meta.example_id.isin(known.example_id).to_numpy())
                scores = known
                if len(rest):
                    scores = pd.concat([known, self._score(model, {c: [v[i] for i in rest] for c, v in data.items()})
                                        [_SCORES]], ignore_index=True)
        if scores is None:
            scores = self._score(model, data)
        traj = exposures(meta.merge(scores, on="example_id"), cfg.metrics.loss, self.example_ids)
        e_t = traj[f"exposure_{cfg.metrics.exposure}"].to_numpy()
        uq = metrics.unlearning_quality(e_t, self.e_0, self.e_r, cfg.metrics.uq_min_gap_bits).uq
        ppl = utility_table(scores, meta)["id_holdout_ppl"]
        out = {"uq_final_all": float(uq), "exposure_final_all_mean": float(e_t.mean()),
               "forgotten_fraction_final_all": float(metrics.forgotten(e_t, self.e_r,
                                                                       cfg.metrics.tolerance_bits).mean()),
               "id_holdout_ppl_final_all": float(ppl)}
        if self.ppl_0_all is not None:
            out["utility_drop_final_all"] = float(metrics.utility_drop(ppl, self.ppl_0_all))
        self.seconds += time.perf_counter() - t0
        return out


def _columns(subset, rows) -> dict:
    """The scoring columns of these rows of `subset` as plain lists."""
    return subset.select(np.asarray(rows, dtype=np.int64)).select_columns(_COLUMNS).to_dict()
