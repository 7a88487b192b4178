"""Generalized exposure of an example against its reference set (docs/definitions.md).

Two variants: the rank exposure, which saturates at log2(|R|+1), and the extrapolated exposure
-log2 F(loss) under a skew-normal F fitted to the reference losses, which keeps measuring depth
past that ceiling. The extrapolated variant needs log F far into the left tail, where
``scipy.stats.skewnorm.logcdf`` underflows to -inf, so ``skewnorm_logcdf`` works in log space.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

__all__ = [
    "EXPOSURE_KINDS",
    "SkewNormFit",
    "exposure",
    "extrapolated_exposure",
    "fit_skewnorm",
    "rank_exposure",
    "skewnorm_logcdf",
]

EXPOSURE_KINDS = ("extrapolated", "rank")
MAX_SHAPE = 50.0  # cap on |a| of the skew-normal fit (see fit_skewnorm)
_LN2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Below this CDF value Phi(z) - 2 T(z, a) may lose more than ~3 digits to cancellation (a > 0)
# or underflow, so the log-space quadrature takes over.
_DIRECT_MIN = 1e-3
# Exp-sinh (double-exponential) rule on (0, inf): u = exp(pi/2 sinh(tau)). Integrands below are
# e^{-u}-like or Gaussian-like on an O(1) scale, where this rule converges to ~1e-15 with these
# nodes; tau outside [-4, 3] contributes below 1e-30.
_DE_STEP = 1.0 / 12.0
_DE_TAU = np.arange(-4.0, 3.0 + _DE_STEP / 2, _DE_STEP)
_DE_U = np.exp(0.5 * np.pi * np.sinh(_DE_TAU))
_DE_LOGW = np.log(_DE_STEP * 0.5 * np.pi * np.cosh(_DE_TAU)) + np.log(_DE_U)


def rank_exposure(losses, ref_losses) -> np.ndarray:
    """Rank exposure in bits: log2(|R|+1) - log2(rank), rank = 1 + #{r < x} + 0.5 #{r == x}.

    ``losses`` may have any shape; NaN losses give NaN. NaN references are ignored (they have no
    rank); at least one reference is required. Range is [0, log2(|R|+1)].
    """
    refs = np.asarray(ref_losses, dtype=float).ravel()
    refs = np.sort(refs[~np.isnan(refs)])
    if refs.size == 0:
        raise ValueError("rank_exposure needs at least one non-NaN reference loss")
    x = np.asarray(losses, dtype=float)
    below = np.searchsorted(refs, x, side="left")
    tied = np.searchsorted(refs, x, side="right") - below
    rank = 1.0 + below + 0.5 * tied
    out = np.log2(refs.size + 1.0) - np.log2(rank)
    return np.where(np.isnan(x), np.nan, out)


@dataclass(frozen=True)
class SkewNormFit:
    """Skew-normal parameters in scipy's convention: shape ``a``, ``loc``, ``scale``."""

    a: float
    loc: float
    scale: float


def fit_skewnorm(ref_losses) -> SkewNormFit:
    """Maximum-likelihood skew-normal fit to the finite reference losses (deterministic).

    Raises ValueError for fewer than 3 finite values or zero variance, where no fit exists.
    """
    r = np.asarray(ref_losses, dtype=float).ravel()
    r = r[np.isfinite(r)]
    if r.size < 3:
        raise ValueError(f"fit_skewnorm needs at least 3 finite reference losses, got {r.size}")
    if r.max() == r.min():
        raise ValueError(f"fit_skewnorm: all {r.size} reference losses equal {r[0]!r} (zero variance)")
    # Standardising first keeps the optimiser well conditioned whatever the loss units (nats per
    # token vs summed nats); the MLE of a location-scale family transforms back exactly.
    mu, sd = float(r.mean()), float(r.std())
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        a, loc, scale = stats.skewnorm.fit((r - mu) / sd)
        if np.isfinite(a) and abs(a) > MAX_SHAPE:
            # Half-normal-looking references let the MLE shape run off (a ~ 1e9): the fitted left tail then
            # becomes a cliff and exposure explodes (1e17 bits a scale unit below the edge). Past |a| = 50 the
            # density's shape barely changes in the bulk, so refit with the shape pinned at the cap.
            a, loc, scale = stats.skewnorm.fit((r - mu) / sd, f0=float(np.sign(a) * MAX_SHAPE))
    if not (np.isfinite(a) and np.isfinite(loc) and np.isfinite(scale) and scale > 0):
        a, loc, scale = 0.0, 0.0, 1.0  # degenerate optimiser result: fall back to the normal fit
    return SkewNormFit(a=float(a), loc=float(mu + sd * loc), scale=float(sd * scale))


def _log_mills(u: np.ndarray) -> np.ndarray:
    """log(phi(u) / Phi(u)), finite for very negative u."""
    return -0.5 * u * u - _HALF_LOG_2PI - special.log_ndtr(u)


def _tail_logcdf(z: np.ndarray, a: float) -> np.ndarray:
    """log F(z) for the standard skew-normal, for z left of the mode, by log-space quadrature.

    F(z) = f(z) * I with I = int_0^inf exp(g(s)) ds, g(s) = log f(z - s) - log f(z), f the pdf
    2 phi(t) Phi(a t). log f is concave, so g decays from g(0) = 0 with initial slope -h
    (h = (log f)'(z) >= 0 left of the mode) and curvature c = -(log f)''(z). Rescaling s = L u with
    L = 1 / sqrt(h^2 + c) makes the integrand decay on an O(1) scale in u whether the tail is
    exponential-like (deep tail, h large) or Gaussian-like, so one fixed exp-sinh rule is accurate
    everywhere; summing in log space keeps everything finite even when F ~ exp(-1e4).
    """
    z = z[:, None]
    az = a * z
    mills = np.exp(_log_mills(az))
    h = -z + a * mills
    c = np.maximum(1.0 + a * a * mills * (az + mills), 1.0)
    L = 1.0 / np.sqrt(h * h + c)
    s = L * _DE_U[None, :]
    g = z * s - 0.5 * s * s + special.log_ndtr(a * (z - s)) - special.log_ndtr(az)
    log_i = special.logsumexp(g + _DE_LOGW[None, :], axis=1) + np.log(L[:, 0])
    log_f = _LN2 - 0.5 * z[:, 0] ** 2 - _HALF_LOG_2PI + special.log_ndtr(az[:, 0])
    return log_f + log_i


def _chunked(fn, z: np.ndarray, a: float, chunk: int = 8192) -> np.ndarray:
    """Apply fn in chunks so the [n, nodes] quadrature matrix stays a few MB for any n."""
    return np.concatenate([fn(z[i:i + chunk], a) for i in range(0, z.size, chunk)])


def _std_logcdf(z: np.ndarray, a: float) -> np.ndarray:
    """log F(z) of the standard skew-normal with shape a, accurate in both tails."""
    out = np.full(z.shape, np.nan)
    out[z == -np.inf] = -np.inf
    out[z == np.inf] = 0.0
    fin = np.isfinite(z)
    zf = z[fin]
    res = np.empty_like(zf)
    # F = Phi(z) - 2 T(z, a); its complement is 1 - F = Phi(-z) + 2 T(z, a) = F(-z; -a).
    t2 = 2.0 * special.owens_t(zf, a)
    cdf = special.ndtr(zf) - t2
    sf = special.ndtr(-zf) + t2
    left = cdf <= 0.5
    # The quadrature needs h >= 0 (z left of the mode); for extreme |a| the mode can sit below
    # the _DIRECT_MIN quantile, where the direct formula is still accurate to ~eps / F.
    az = a * zf
    h = -zf + a * np.exp(_log_mills(az))
    quad_l = left & ((cdf < _DIRECT_MIN) | ~(cdf > 0)) & (h > 0)
    quad_r = ~left & ((sf < _DIRECT_MIN) | ~(sf > 0)) & (h < 0)  # mirror image: h(-z; -a) = -h
    with np.errstate(divide="ignore", invalid="ignore"):
        direct_l = left & ~quad_l
        res[direct_l] = np.log(cdf[direct_l])
        direct_r = ~left & ~quad_r
        res[direct_r] = np.log1p(-sf[direct_r])
    if quad_l.any():
        res[quad_l] = _chunked(_tail_logcdf, zf[quad_l], a)
    if quad_r.any():
        # log F = log(1 - S) with S = F(-z; -a) tiny: computing S in log space then log1p is exact.
        res[quad_r] = np.log1p(-np.exp(_chunked(_tail_logcdf, -zf[quad_r], -a)))
    out[fin] = res
    return out


def skewnorm_logcdf(x, fit: SkewNormFit) -> np.ndarray:
    """log F(x) of the skew-normal ``fit``, finite and accurate far into the left tail.

    Unlike ``scipy.stats.skewnorm.logcdf`` (log of an underflowing CDF), this stays accurate down
    to log F ~ -1e4 and beyond: the bulk uses Phi(z) - 2 T(z, a) (Owen's T), the tails a log-space
    quadrature of the pdf (see ``_tail_logcdf``). NaN in, NaN out; shape is preserved.
    """
    x = np.asarray(x, dtype=float)
    z = (x - fit.loc) / fit.scale
    return _std_logcdf(z.ravel(), float(fit.a)).reshape(x.shape)


def extrapolated_exposure(losses, ref_losses, fit: SkewNormFit | None = None) -> np.ndarray:
    """Extrapolated exposure in bits: -log2 F(loss), F a skew-normal fitted to ``ref_losses``.

    The fit is redone on every call (references are rescored under each model) unless ``fit`` is
    given. Unlike the rank exposure it does not saturate and can exceed log2(|R|+1).
    """
    if fit is None:
        fit = fit_skewnorm(ref_losses)
    return -skewnorm_logcdf(losses, fit) / _LN2


def exposure(losses, ref_losses, kind: str = "extrapolated", fit: SkewNormFit | None = None) -> np.ndarray:
    """Exposure of ``losses`` against ``ref_losses``; ``kind`` is "extrapolated" or "rank".

    ``fit`` (extrapolated only) reuses a skew-normal already fitted to the same references.
    """
    if kind == "extrapolated":
        return extrapolated_exposure(losses, ref_losses, fit=fit)
    if kind == "rank":
        return rank_exposure(losses, ref_losses)
    raise ValueError(f"unknown exposure kind {kind!r}; allowed: {', '.join(EXPOSURE_KINDS)}")


def leave_one_out_exposure(ref_losses, kind: str = "extrapolated") -> np.ndarray:
    """Exposure of each reference against the *other* references, e(r; R \\ {r}), in bits ("extrapolated" refits
    the skew-normal without r, once per reference; "rank" has |R| − 1 references, ceiling log2 |R|).

    Their mean is the no-oracle e_r (docs/definitions.md section 11): what a model gives an example of this
    distribution it never saw. NaN references are left out of every comparison and get NaN.
    """
    refs = np.asarray(ref_losses, dtype=float).ravel()
    out = np.full(refs.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(refs))
    for i in ok:
        others = refs[ok[ok != i]]
        out[i] = exposure(refs[i:i + 1], others, kind)[0]
    return out
