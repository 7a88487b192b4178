"""Does forgetting last? The attacks on an unlearned model, below the attack stage: relearning (a few fine-tuning
steps on retain data, or on part of the request's own forget examples), quantization reload, and the exposure
bookkeeping that makes them comparable. Each attack is applied the same way to the oracle θᵣ, the yardstick:
`recovered` is the share of the original exposure gap that comes back beyond what an exactly-unlearned model picks
up from the same data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from unlearnbench.batching import collate, token_logprobs
from unlearnbench.evaluation import exposures
from unlearnbench.scoring import score_pass


@dataclass
class RequestSets:
    """What the attacks score for one request: its examples, their kind's references, and which examples the
    targeted relearning may train on (the rest is held out)."""

    example_ids: list[str]
    seen: list[str]  # forget examples the targeted relearning trains on
    held_out: list[str]  # the rest: does it come back without being trained on?
    data: dict  # example_id, input_ids, score_start, score_end as plain lists (request + references)
    meta: pd.DataFrame  # example_id, kind, split of `data`'s rows
    e_0: np.ndarray  # exposure under θ₀ (score stage, every reference)
    e_r: np.ndarray  # exposure under θᵣ
    texts: list[str]  # the text of each row of `data` (the zlib attack compresses it)


def relearn_schedule(k: int) -> list[int]:
    """Steps at which a relearning run is scored: 0, 1, 2, 4, 8, ... and k."""
    out, s = {0, k}, 1
    while s < k:
        out.add(s)
        s *= 2
    return sorted(out)


def exposure_of(acc, model, sets: RequestSets, loss: str, form: str, batch_size: int, pad_id: int,
                batch_tokens: int | None = None) -> np.ndarray:
    """The request's exposure under `model` against its references (one local pass, no collective)."""
    scores, _ = score_pass(acc, model, sets.data, batch_size, pad_id, local=True, batch_tokens=batch_tokens)
    exp = exposures(sets.meta.merge(scores, on="example_id"), loss, sets.example_ids)
    return exp[f"exposure_{form}"].to_numpy()


def recovered_share(e_att: np.ndarray, e_r_att: np.ndarray, e_0: np.ndarray, e_r: np.ndarray, n_boot: int,
                    seed: int, alpha: float = 0.05) -> dict:
    """(ē_attacked − ē_oracle,attacked) / (ē_0 − ē_r) with a percentile bootstrap interval over the examples and
    `n_boot_unusable`: the resamples whose gap ē_0 − ē_r was <= 0 (no share exists), left out of the interval."""
    def share(a, b, c, d):
        gap = float(np.mean(c - d))
        return float(np.mean(a - b)) / gap if gap > 0 else float("nan")

    arrays = [np.asarray(x, dtype=float) for x in (e_att, e_r_att, e_0, e_r)]
    n = len(arrays[2])
    value = share(*arrays)
    lo = hi = float("nan")
    unusable = 0
    if n and n_boot >= 1:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        reps = np.array([share(*(a[i] for a in arrays)) for i in idx])
        unusable = int(np.sum(~np.isfinite(reps)))
        if unusable < n_boot:
            lo, hi = (float(x) for x in np.percentile(reps[np.isfinite(reps)], [100 * alpha / 2,
                                                                                100 * (1 - alpha / 2)]))
    return {"recovered": value, "lo": lo, "hi": hi, "n": int(n), "n_boot_unusable": unusable}


def finetune(model, rows: list[list[int]], spans: list[tuple[int, int]], steps: int, lr: float, batch_size: int,
             seed: int, device, pad_id: int, on_step=None) -> None:
    """k plain fine-tuning steps (mean NLL of the scored tokens, AdamW at `lr`) on batches drawn from `rows` in a
    seeded order; `on_step(step)` is called at step 0 and after every step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order = np.random.default_rng([seed, 31337]).permutation(len(rows))
    bsz = min(batch_size, len(rows))
    if on_step is not None:
        on_step(0)
    for step in range(steps):
        idx = [order[(step * bsz + i) % len(rows)] for i in range(bsz)]
        b = collate([rows[i] for i in idx], [spans[i][0] for i in idx], [spans[i][1] for i in idx], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        model.train()
        logp, mask = token_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                    b["labels"])
        loss = -(logp * mask).sum() / mask.sum().clamp_min(1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1)
    model.eval()


def curve_row(step: int, e: np.ndarray, held: np.ndarray) -> dict:
    """One row of a relearning curve: the request's exposures at this step, their mean, and its held-out part's."""
    return {"step": step, "exposure_mean": float(e.mean()),
            "exposure_held_out_mean": float(e[held].mean()) if held.any() else float("nan"), "exposures": e}


def relearning_curve(acc, start_model, sets: RequestSets, train_rows: list[list[int]],
                     train_spans: list[tuple[int, int]], cfg, pad_id: int,
                     start_exposures: np.ndarray | None = None) -> pd.DataFrame:
    """Exposure of the whole request and of its held-out part along k relearning steps from `start_model`
    (a copy: the start model is not changed). `start_exposures`: the request's exposures under `start_model`
    when already measured (step 0 is then not scored again)."""
    a, m = cfg.attack, cfg.metrics
    model = copy.deepcopy(start_model).to(acc.device)
    schedule = set(relearn_schedule(a.relearn_steps))
    held = np.isin(sets.example_ids, sets.held_out)
    rows = []

    def score(step: int) -> None:
        if step == 0 and start_exposures is not None:
            rows.append(curve_row(0, np.asarray(start_exposures, dtype=float), held))
        elif step in schedule:
            rows.append(curve_row(step, exposure_of(acc, model, sets, m.loss, m.exposure, cfg.score.batch_size,
                                                    pad_id, cfg.score.batch_tokens), held))

    finetune(model, train_rows, train_spans, a.relearn_steps, a.relearn_lr, a.relearn_batch_size, cfg.run.seed,
             acc.device, pad_id, score)
    return pd.DataFrame(rows)


def mia_scores(acc, model, sets: RequestSets, k: float, batch_size: int, pad_id: int,
               batch_tokens: int | None = None) -> pd.DataFrame:
    """The four membership-inference member scores (LOSS, zlib, Min-K%, Min-K%++; metrics.mia) of every row of
    `sets.data` under `model`, from one token-level pass; indexed by example_id."""
    from unlearnbench.metrics import mia
    from unlearnbench.scoring import token_score_pass

    text_of = dict(zip(sets.data["example_id"], sets.texts))
    tok = token_score_pass(acc, model, sets.data, batch_size, pad_id, local=True, batch_tokens=batch_tokens)
    tok = sets.meta[["example_id"]].merge(tok, on="example_id")
    return pd.DataFrame({
        "loss": mia.loss_score(tok.nll.to_numpy()),
        "zlib": mia.zlib_score(tok.nll_sum.to_numpy(), [text_of[e] for e in tok.example_id]),
        "min_k": mia.min_k(list(tok.token_logp), k),
        "min_k_pp": mia.min_k_plus_plus(list(tok.token_logp), list(tok.token_mu), list(tok.token_sigma), k)},
        index=pd.Index(tok.example_id.to_numpy(), name="example_id"))


def mia_aucs(scores: pd.DataFrame, members: list[str], nonmembers: list[str]) -> dict[str, float]:
    """AUC of each attack's member scores: the request's examples (members) against its references."""
    from unlearnbench.metrics import mia

    m, n = scores.loc[list(members)], scores.loc[list(nonmembers)]
    return {att: float(mia.auc(m[att].to_numpy(), n[att].to_numpy())) for att in scores.columns}
