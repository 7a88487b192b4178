"""Utility metrics on a set of sequences: token-weighted NLL, perplexity, accuracy, drop."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["mean_nll", "perplexity", "token_accuracy", "utility_drop"]


def _ratio(num, den) -> float:
    """sum(num) / sum(den); NaN for an empty set so a missing split never reads as perfect."""
    total = float(np.sum(np.asarray(den, dtype=float)))
    if total <= 0:
        return float("nan")
    return float(np.sum(np.asarray(num, dtype=float))) / total


def mean_nll(nll_sum, n_tokens) -> float:
    """Token-weighted mean NLL (nats/token): sum of per-sequence NLL sums / total tokens."""
    return _ratio(nll_sum, n_tokens)


def perplexity(nll_sum, n_tokens) -> float:
    """exp(sum nll_sum / sum n_tokens): token-weighted, so long sequences count proportionally."""
    m = mean_nll(nll_sum, n_tokens)
    if math.isnan(m):
        return m
    # exp overflow means a collapsed model; report inf rather than raising OverflowError.
    return math.exp(m) if m < 709.0 else float("inf")


def token_accuracy(n_correct, n_tokens) -> float:
    """Token-weighted accuracy: total correct arg-max predictions / total scored tokens."""
    return _ratio(n_correct, n_tokens)


def utility_drop(ppl_t, ppl_0):
    """Relative perplexity increase ppl_t / ppl_0 - 1 (elementwise for arrays)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(ppl_t, dtype=float) / np.asarray(ppl_0, dtype=float) - 1.0
    return float(out) if out.ndim == 0 else out
