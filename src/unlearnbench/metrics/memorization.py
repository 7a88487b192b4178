"""Per-example memorization and difficulty (docs/definitions.md)."""
from __future__ import annotations

import numpy as np

__all__ = [
    "counterfactual_difficulty",
    "counterfactual_memorization",
    "difficulty",
    "exposure_memorization",
    "memorization",
]


def memorization(loss_original, loss_oracle) -> np.ndarray:
    """mem(x) = loss under the oracle - loss under the original model (nats/token)."""
    return np.asarray(loss_oracle, dtype=float) - np.asarray(loss_original, dtype=float)


def exposure_memorization(e_0, e_r) -> np.ndarray:
    """Exposure memorization e_0(x) - e_r(x), in bits."""
    return np.asarray(e_0, dtype=float) - np.asarray(e_r, dtype=float)


def _masked_mean(losses: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Column means over rows where mask holds; NaN (without a warning) where none does."""
    count = mask.sum(axis=0)
    total = np.where(mask, losses, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _check(losses, trained_mask) -> tuple[np.ndarray, np.ndarray]:
    losses = np.asarray(losses, dtype=float)
    mask = np.asarray(trained_mask, dtype=bool)
    if losses.ndim != 2 or losses.shape != mask.shape:
        raise ValueError(f"need losses and trained_mask of equal shape [K, N]; got "
                         f"{losses.shape} and {mask.shape}")
    return losses, mask


def counterfactual_memorization(losses, trained_mask) -> np.ndarray:
    """Mean loss over shadow models that did not train on x minus over those that did.

    ``losses`` and ``trained_mask`` are [K models, N examples]; NaN where either side is empty.
    """
    losses, mask = _check(losses, trained_mask)
    return _masked_mean(losses, ~mask) - _masked_mean(losses, mask)


def difficulty(loss_oracle) -> np.ndarray:
    """diff(x) = loss of x under the oracle, a model that never saw it."""
    return np.array(loss_oracle, dtype=float)


def counterfactual_difficulty(losses, trained_mask) -> np.ndarray:
    """Mean loss of x over the shadow models that did not train on it (NaN if none)."""
    losses, mask = _check(losses, trained_mask)
    return _masked_mean(losses, ~mask)
