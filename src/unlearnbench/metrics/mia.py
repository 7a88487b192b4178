"""Membership-inference scores per example, their ROC AUC and MUSE's PrivLeak (docs/findings.md, F4).

Every *member score* here is oriented the same way: **higher means more likely a member** (trained on). The
per-token inputs are ragged, one 1-D array per example over its scored positions, as `scoring.token_score_pass`
writes them (`token_logp`, `token_mu`, `token_sigma`).

- LOSS (Yeom et al. 2018): score = -nll.
- zlib (Carlini et al. 2021): ratio = nll_sum / zlib-compressed byte length of the text; score = -ratio.
- Min-K% (Shi et al. 2024): the mean of the k% lowest token log-probs.
- Min-K%++ (Zhang et al. 2025): each token log-prob standardized under the model's next-token distribution,
  z_t = (log p(x_t) - mu_t) / sigma_t with mu_t = sum_v p(v) log p(v) and
  sigma_t^2 = sum_v p(v) (log p(v) - mu_t)^2, then Min-K% of the z_t. A position whose distribution is flat
  (sigma_t = 0 up to float32 rounding: uniform, e.g. after a zero BOS embedding, or all mass on one token) would
  make z_t = 0/0 rounding noise; there z_t = 0 when the token has the mean log-prob, else -inf or +inf.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

__all__ = ["auc", "loss_score", "min_k", "min_k_count", "min_k_plus_plus", "priv_leak", "standardized_logprobs",
           "zlib_bytes", "zlib_ratio", "zlib_score"]


def loss_score(nll) -> np.ndarray:
    """LOSS attack member score, -nll per example (higher = more likely member)."""
    return -np.asarray(nll, dtype=np.float64)


def zlib_bytes(texts: Iterable[str]) -> np.ndarray:
    """Length in bytes of each text's UTF-8 encoding after `zlib.compress` at the default level."""
    return np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)


def zlib_ratio(nll_sum, texts: Sequence[str]) -> np.ndarray:
    """nll_sum (nats) / zlib-compressed byte length of the text per example; the member score is -ratio."""
    nll_sum = np.asarray(nll_sum, dtype=np.float64)
    z = zlib_bytes(texts)
    if z.shape != nll_sum.shape:
        raise ValueError(f"zlib_ratio: {nll_sum.shape[0] if nll_sum.ndim else 1} losses for {len(z)} texts")
    return nll_sum / z


def zlib_score(nll_sum, texts: Sequence[str]) -> np.ndarray:
    """zlib attack member score, -zlib_ratio (higher = more likely member)."""
    return -zlib_ratio(nll_sum, texts)


def min_k_count(n: int, k: float) -> int:
    """How many of n tokens Min-K% averages: floor(n * k), at least 1 (0 when n = 0)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k is a fraction in (0, 1] (0.2 for Min-20%), got {k}")
    return 0 if n == 0 else max(1, int(n * k + 1e-9))


def _min_k_one(values: np.ndarray, k: float) -> float:
    m = min_k_count(len(values), k)
    if m == 0:
        return float("nan")
    return float(np.mean(np.partition(values, m - 1)[:m]))


def min_k(token_logprobs, k: float = 0.2) -> np.ndarray:
    """Min-K% member score per example: mean of its floor(k n) (at least 1) lowest token log-probs; NaN if n = 0."""
    return np.array([_min_k_one(np.asarray(lp, dtype=np.float64).ravel(), k) for lp in token_logprobs],
                    dtype=np.float64)


def standardized_logprobs(lp, mu, sigma, flat_tol: float = 1e-4) -> np.ndarray:
    """Min-K%++'s z = (log p - mu) / sigma per token; where the distribution is flat to float32 precision
    (sigma <= flat_tol * max(1, |mu|): uniform, or all mass on one token) z = 0 if log p = mu there, else +-inf."""
    lp, mu, sigma = (np.asarray(a, dtype=np.float64) for a in (lp, mu, sigma))
    tol = flat_tol * np.maximum(1.0, np.abs(mu))
    dev = lp - mu
    flat = sigma <= tol
    with np.errstate(divide="ignore", invalid="ignore"):
        z = dev / np.where(flat, 1.0, sigma)
        return np.where(flat, np.where(np.abs(dev) <= tol, 0.0, np.sign(dev) * np.inf), z)


def min_k_plus_plus(token_logprobs, token_mu, token_sigma, k: float = 0.2, flat_tol: float = 1e-4) -> np.ndarray:
    """Min-K%++ member score per example: Min-K% of `standardized_logprobs` over its scored tokens."""
    if not len(token_logprobs) == len(token_mu) == len(token_sigma):
        raise ValueError(f"min_k_plus_plus: {len(token_logprobs)} log-prob, {len(token_mu)} mu and "
                         f"{len(token_sigma)} sigma arrays: one of each per example")
    out = np.empty(len(token_logprobs), dtype=np.float64)
    for i, (lp, mu, sd) in enumerate(zip(token_logprobs, token_mu, token_sigma)):
        lp, mu, sd = (np.asarray(a, dtype=np.float64).ravel() for a in (lp, mu, sd))
        if not lp.shape == mu.shape == sd.shape:
            raise ValueError(f"min_k_plus_plus: example {i} has {lp.size} log-probs, {mu.size} mu and "
                             f"{sd.size} sigma values")
        out[i] = _min_k_one(standardized_logprobs(lp, mu, sd, flat_tol), k)
    return out


def auc(member_scores, nonmember_scores) -> float:
    """ROC AUC of member vs non-member scores: P(member > non-member) + P(tie) / 2 (Mann-Whitney U / n1 n0)."""
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if m.size == 0 or n.size == 0:
        raise ValueError(f"auc needs members and non-members (got {m.size} and {n.size})")
    if np.isnan(m).any() or np.isnan(n).any():
        raise ValueError("auc: NaN member scores (an example without scored tokens?); drop them first")
    ranks = stats.rankdata(np.concatenate([m, n]))  # average ranks: a tie counts one half
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def priv_leak(auc_t, auc_r):
    """MUSE's PrivLeak, (AUC_t - AUC_r) / AUC_r: 0 = as private as the oracle, > 0 leaks, < 0 over-unlearned."""
    auc_t = np.asarray(auc_t, dtype=np.float64)
    auc_r = np.asarray(auc_r, dtype=np.float64)
    out = (auc_t - auc_r) / auc_r
    return float(out) if out.ndim == 0 else out
