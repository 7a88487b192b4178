"""Tests for unlearnbench.metrics: every expected value is computed by hand or independently."""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from scipy import special, stats

from unlearnbench.metrics import (
    SkewNormFit,
    bootstrap_ci,
    counterfactual_difficulty,
    counterfactual_memorization,
    difficulty,
    exposure,
    exposure_memorization,
    extrapolated_exposure,
    first_crossing,
    fit_skewnorm,
    forget_quality_ks,
    forgotten,
    mean_nll,
    memorization,
    perplexity,
    rank_exposure,
    skewnorm_logcdf,
    spearman_with_ci,
    steps_to_forget,
    token_accuracy,
    unlearning_quality,
    uq_example,
    uq_with_ci,
    utility_drop,
)

mp = pytest.importorskip("mpmath")
INV_LN2 = 1.0 / math.log(2.0)


# ---------------------------------------------------------------- mpmath reference for log F
def _mp_logpdf(t, a):
    return mp.log(2) - t * t / 2 - mp.log(2 * mp.pi) / 2 + mp.log(mp.ncdf(a * t))


def _mp_log_left(z, a):
    """log int_{-inf}^z 2 phi(t) Phi(a t) dt at 50 digits.

    The integrand is divided by f(z) because mpmath's quad tolerance is absolute (a raw pdf of
    1e-2000 would "converge" at once), and s = z - t is scaled by the local decay length, so
    the integrand is below e^-100 well before u = 256.
    """
    az = a * z
    mills = mp.npdf(az) / mp.ncdf(az)
    h = -z + a * mills
    c = max(1 + a * a * mills * (az + mills), 1)
    scale = 1 / mp.sqrt(h * h + c)
    lf = _mp_logpdf(z, a)
    integral = mp.quad(lambda u: mp.exp(_mp_logpdf(z - scale * u, a) - lf), [0, 4, 32, 256])
    return lf + mp.log(scale * integral)


def mp_skewnorm_logcdf(x, a, loc, scale):
    """High-precision log F(x): the smaller tail by quadrature, the other through log1p."""
    with mp.workdps(50):
        z = (mp.mpf(x) - loc) / scale
        left = _mp_log_left(z, mp.mpf(a))
        if left < -1:  # F < 0.37: the left integral is the small side, no second quadrature
            return float(left)
        right = _mp_log_left(-z, -mp.mpf(a))
        return float(left if left < right else mp.log1p(-mp.exp(right)))


# (a, loc, scale, x, log F) from mp_skewnorm_logcdf (checked against Phi(z) - 2 T(z, a) with
# Owen's T integrated at 2300 digits); recomputed live by the slow test below.
MP_TABLE = [
    (3.0, 2.0, 0.5, 4.0, -0.000063344489886078091871),
    (3.0, 2.0, 0.5, 2.5, -0.38163276314317255348),
    (3.0, 2.0, 0.5, 2.0, -2.2787085952902986559),
    (3.0, 2.0, 0.5, 1.5, -9.7858034780095317771),
    (3.0, 2.0, 0.5, 0.5, -51.776419664344137708),
    (3.0, 2.0, 0.5, -2.0, -328.70964414341974722),
    (3.0, 2.0, 0.5, -13.75, -4972.696215785448176),
    (-4.0, -1.0, 2.0, 2.0, -9.5563471653448130755e-12),
    (-4.0, -1.0, 2.0, 0.0, -0.0014257719700807431281),
    (-4.0, -1.0, 2.0, -2.0, -0.48507613667425800933),
    (-4.0, -1.0, 2.0, -5.0, -3.0900371531220866816),
    (-4.0, -1.0, 2.0, -13.0, -20.043621769414760346),
    (-4.0, -1.0, 2.0, -81.0, -803.91529483319384286),
    (-4.0, -1.0, 2.0, -199.0, -4905.3210132071719596),
    (0.7, 0.0, 1.0, -5.0, -23.147159166158971149),
    (0.7, 0.0, 1.0, -20.0, -305.18665659304954442),
    (0.7, 0.0, 1.0, -80.0, -4777.9514125538306153),
    (15.0, 0.3, 1.7, -1.5, -136.08445101025046),  # scipy.stats.skewnorm.logcdf: -136.07994
]


# ---------------------------------------------------------------- rank exposure
def test_rank_exposure_hand_cases():
    refs = [1.0, 2.0, 3.0]
    # 0.5 beats every ref: rank 1 -> log2(4) - log2(1) = 2 = the ceiling log2(|R|+1)
    # 2.0 ties one ref and is above one: rank 1 + 1 + 0.5 = 2.5
    # 10 is above all: rank 4 -> 0 bits
    got = rank_exposure([0.5, 2.0, 10.0, np.nan], refs)
    np.testing.assert_allclose(got[:3], [2.0, 2.0 - math.log2(2.5), 0.0], rtol=0, atol=1e-15)
    assert np.isnan(got[3])
    # all three refs tied with x: rank 1 + 1.5 = 2.5 as well
    assert rank_exposure([1.0], [1.0, 1.0, 1.0])[0] == pytest.approx(2.0 - math.log2(2.5), abs=1e-15)


def test_rank_exposure_ceiling_shape_and_nan_refs():
    refs = np.random.default_rng(1).normal(size=999)
    losses = np.array([[refs.min() - 1.0, refs.max() + 1.0]])
    got = rank_exposure(losses, np.append(refs, np.nan))  # the NaN ref is ignored
    assert got.shape == (1, 2)
    assert got[0, 0] == math.log2(1000.0) and got[0, 1] == 0.0
    with pytest.raises(ValueError):
        rank_exposure([1.0], [np.nan])


def test_rank_exposure_of_unseen_examples_averages_one_over_ln2():
    # Fresh references per draw: a single fixed reference set biases the mean by ~0.04 bits
    # through its own sampling noise in the low-rank region.
    rng = np.random.default_rng(0)
    n_ref = 1000
    mean = np.mean([rank_exposure(rng.normal(size=100), rng.normal(size=n_ref)).mean()
                    for _ in range(500)])
    # exact for a uniform rank on 1..n+1: log2(n+1) - log2((n+1)!)/(n+1) -> 1/ln 2 as n grows
    exact = math.log2(n_ref + 1) - math.lgamma(n_ref + 2) / math.log(2) / (n_ref + 1)
    assert abs(exact - INV_LN2) < 0.01
    assert abs(mean - INV_LN2) < 0.05
    assert abs(mean - exact) < 0.02


def test_rank_exposure_is_fast_at_10k_by_10k():
    rng = np.random.default_rng(0)
    refs, xs = rng.normal(size=10_000), rng.normal(size=10_000)
    t0 = time.perf_counter()
    got = rank_exposure(xs, refs)
    assert time.perf_counter() - t0 < 1.0
    # spot-check against the brute-force definition
    for i in range(5):
        rank = 1 + np.sum(refs < xs[i]) + 0.5 * np.sum(refs == xs[i])
        assert got[i] == pytest.approx(math.log2(10_001) - math.log2(rank), abs=1e-12)


# ---------------------------------------------------------------- skew-normal fit and log F
def test_fit_skewnorm_recovers_parameters_deterministically():
    sample = stats.skewnorm.rvs(4.0, loc=3.0, scale=0.5, size=5000, random_state=0)
    fit = fit_skewnorm(sample)
    assert fit == fit_skewnorm(sample)
    assert fit.a == pytest.approx(4.0, abs=1.0)
    assert fit.loc == pytest.approx(3.0, abs=0.05)
    assert fit.scale == pytest.approx(0.5, abs=0.05)
    # a location-scale change of the data moves the fit exactly (standardised optimisation)
    fit2 = fit_skewnorm(100.0 + 20.0 * sample)
    assert fit2.a == pytest.approx(fit.a, rel=1e-3)
    assert fit2.loc == pytest.approx(100.0 + 20.0 * fit.loc, rel=1e-4)


def test_fit_skewnorm_rejects_degenerate_refs():
    with pytest.raises(ValueError, match="at least 3"):
        fit_skewnorm([1.0, 2.0, np.nan])
    with pytest.raises(ValueError, match="zero variance"):
        fit_skewnorm([0.1] * 10)


def test_skewnorm_logcdf_matches_mpmath_table():
    for a, loc, scale, x, ref in MP_TABLE:
        got = skewnorm_logcdf(x, SkewNormFit(a, loc, scale))
        assert abs(got - ref) <= 1e-8 * abs(ref), (a, x, got, ref)


def test_skewnorm_logcdf_matches_live_mpmath_in_deep_tail():
    for a, loc, scale, x in [(3.0, 2.0, 0.5, -13.6), (-4.0, -1.0, 2.0, -198.0)]:
        ref = mp_skewnorm_logcdf(x, a, loc, scale)
        assert ref < -4000
        got = float(skewnorm_logcdf(x, SkewNormFit(a, loc, scale)))
        assert abs(got - ref) <= 1e-8 * abs(ref)


@pytest.mark.slow
def test_mpmath_table_is_reproducible():
    for a, loc, scale, x, ref in MP_TABLE:
        assert mp_skewnorm_logcdf(x, a, loc, scale) == pytest.approx(ref, rel=1e-14)


def test_skewnorm_logcdf_agrees_with_independent_formulas():
    # a = 0 is the normal: log F = log_ndtr, which scipy computes asymptotically in the tail
    z = np.linspace(-120.0, 8.0, 300)
    np.testing.assert_allclose(skewnorm_logcdf(z, SkewNormFit(0.0, 0.0, 1.0)), special.log_ndtr(z),
                               rtol=1e-11, atol=1e-300)
    # in the bulk scipy's own logcdf is accurate (away from both tails, where it is not)
    for a in (-6.0, -0.5, 2.0, 15.0):
        x = np.linspace(-1.5, 2.5, 41)
        ref = stats.skewnorm.logcdf(x, a, 0.3, 1.7)
        keep = (ref > math.log(1e-3)) & (ref < math.log1p(-1e-3))
        assert keep.sum() >= 8
        fit = SkewNormFit(a, 0.3, 1.7)
        np.testing.assert_allclose(skewnorm_logcdf(x[keep], fit), ref[keep], rtol=1e-11)


def test_skewnorm_logcdf_special_values_and_monotonicity():
    fit = SkewNormFit(5.0, 0.0, 1.0)
    got = skewnorm_logcdf(np.array([-np.inf, np.nan, np.inf]), fit)
    assert got[0] == -np.inf and np.isnan(got[1]) and got[2] == 0.0
    x = np.linspace(-40.0, 6.0, 5000)
    lf = skewnorm_logcdf(x, fit)
    assert np.all(np.isfinite(lf)) and np.all(np.diff(lf) > 0)
    assert stats.skewnorm.logcdf(-40.0, 5.0) == -np.inf  # what the log-space code exists to fix


# ---------------------------------------------------------------- extrapolated exposure
def test_extrapolated_exposure_beyond_the_rank_ceiling():
    refs = stats.skewnorm.rvs(2.0, loc=3.0, scale=0.4, size=1000, random_state=3)
    fit = fit_skewnorm(refs)
    x = np.array([refs.min() - 5.0, np.median(refs)])
    got = extrapolated_exposure(x, refs)
    ref0 = mp_skewnorm_logcdf(x[0], fit.a, fit.loc, fit.scale)
    assert got[0] == pytest.approx(-ref0 * INV_LN2, rel=1e-8)
    assert got[0] > math.log2(len(refs) + 1) + 10  # the rank variant would stop at ~9.97 bits
    assert rank_exposure(x[:1], refs)[0] == pytest.approx(math.log2(1001))
    assert got[1] == pytest.approx(1.0, abs=0.1)  # the median is -log2(1/2) = 1 bit
    np.testing.assert_array_equal(extrapolated_exposure(x, refs, fit=fit), got)


def test_exposure_dispatcher():
    refs = np.linspace(0.0, 1.0, 11)
    x = np.array([-1.0, 0.5])
    np.testing.assert_array_equal(exposure(x, refs, kind="rank"), rank_exposure(x, refs))
    np.testing.assert_array_equal(exposure(x, refs), extrapolated_exposure(x, refs))
    with pytest.raises(ValueError, match="extrapolated, rank"):
        exposure(x, refs, kind="bogus")


# ---------------------------------------------------------------- unlearning quality
E0, ER = np.array([10.0, 12.0]), np.array([2.0, 4.0])  # means 11 and 3: gap 8 bits


def test_uq_hand_cases():
    assert unlearning_quality(E0, E0, ER).uq == 0.0           # nothing unlearned yet
    assert unlearning_quality(ER, E0, ER).uq == 1.0           # as exposed as the oracle
    assert unlearning_quality([8.0, 6.0], E0, ER).uq == 0.5   # mean 7: 1 - 4/8
    res = unlearning_quality([0.0, 2.0], E0, ER)              # overshoot to mean 1: 1 - 2/8
    assert (res.uq, res.nothing_to_forget, res.gap) == (0.75, False, 8.0)


def test_uq_floor_flags_nothing_to_forget():
    res = unlearning_quality([3.2, 3.2], [3.5, 3.3], [3.0, 3.0], min_gap_bits=1.0)
    assert res.nothing_to_forget
    assert res.gap == pytest.approx(0.4)
    assert res.uq == pytest.approx(1.0 - 0.2 / 1.0)  # denominator floored at 1 bit, not 0.4


def test_uq_drops_nan_pairs_and_handles_empty():
    assert unlearning_quality([8.0, np.nan, 6.0], [10.0, 1.0, 12.0], [2.0, 0.0, 4.0]).uq == 0.5
    assert math.isnan(unlearning_quality([np.nan], [1.0], [0.0]).uq)


def test_uq_example_hand_case():
    # mean|e_t - e_r| = (1 + 3)/2 = 2, mean|e_0 - e_r| = (2 + 4)/2 = 3
    assert uq_example([1.0, 5.0], [4.0, 6.0], [2.0, 2.0]) == pytest.approx(1.0 / 3.0)
    assert math.isnan(uq_example([1.0, 5.0], [2.0, 2.0], [2.0, 2.0]))


def test_forget_quality_ks():
    x = np.random.default_rng(0).normal(size=50)
    assert forget_quality_ks(x, x.copy()) == 1.0
    assert forget_quality_ks(x + 10.0, x) < 1e-10


def test_bootstrap_ci_properties():
    rng = np.random.default_rng(0)
    e_r = rng.normal(2.0, 1.0, 200)
    e_0 = e_r + rng.normal(6.0, 1.0, 200)
    e_t = e_r + rng.normal(2.0, 1.0, 200)
    out = uq_with_ci(e_t, e_0, e_r, min_gap_bits=1.0, n_boot=300, seed=1)
    assert out["uq_lo"] < out["uq"] < out["uq_hi"]
    assert out["uq_example_lo"] < out["uq_example"] < out["uq_example_hi"]
    assert out["uq"] == pytest.approx(1 - abs(e_t.mean() - e_r.mean()) / (e_0.mean() - e_r.mean()))
    assert out["forget_quality"] == forget_quality_ks(e_t, e_r)
    assert out["nothing_to_forget"] is False and out["gap"] == pytest.approx(e_0.mean() - e_r.mean())
    assert out == uq_with_ci(e_t, e_0, e_r, min_gap_bits=1.0, n_boot=300, seed=1)
    assert out["uq_lo"] != uq_with_ci(e_t, e_0, e_r, 1.0, n_boot=300, seed=2)["uq_lo"]


def test_bootstrap_ci_hand_cases_and_nan_safety():
    assert bootstrap_ci(np.mean, np.full(10, 4.0), n_boot=50) == (4.0, 4.0)
    x = np.arange(10.0)
    lo, hi = bootstrap_ci(lambda v: np.nan if v[0] == 0 else v.mean(), x, n_boot=200, seed=0)
    assert 0.0 < lo < 4.5 < hi < 9.0
    assert all(map(math.isnan, bootstrap_ci(lambda v: np.nan, x, n_boot=20)))
    with pytest.raises(ValueError):
        bootstrap_ci(np.mean, x, x[:5])


def test_forgotten_and_steps_to_forget():
    got = forgotten([1.0, 2.5, 3.0, np.nan], [1.0, 2.0, 2.0, 1.0], tolerance_bits=0.5)
    np.testing.assert_array_equal(got, [True, True, False, False])
    steps = np.array([0, 1, 2, 4])
    matrix = np.array([[False, True, False],
                       [False, False, False],
                       [True, True, False],
                       [True, False, False]])
    s, censored = steps_to_forget(steps, matrix, max_steps=100)
    np.testing.assert_array_equal(s, [2, 0, 100])
    np.testing.assert_array_equal(censored, [False, False, True])
    with pytest.raises(ValueError):
        steps_to_forget([0, 2, 1, 4], matrix, 100)


def test_first_crossing():
    steps, values = [0, 1, 2, 3], [0.1, np.nan, 0.6, 0.95]
    assert first_crossing(steps, values, 0.5) == 2
    assert first_crossing(steps, values, 0.9) == 3
    assert first_crossing(steps, values, 0.1) == 0
    assert first_crossing(steps, values, 0.99) is None
    assert first_crossing(steps, [np.nan] * 4, -1.0) is None


# ---------------------------------------------------------------- utility
def test_utility_hand_cases():
    # token-weighted: (2 + 6) / (1 + 3) = 2 nats/token, not the mean of per-sequence values
    assert mean_nll([2.0, 6.0], [1, 3]) == 2.0
    assert perplexity([2.0, 6.0], [1, 3]) == pytest.approx(math.exp(2.0))
    assert token_accuracy([1, 2], [2, 8]) == pytest.approx(0.3)
    assert utility_drop(15.0, 10.0) == pytest.approx(0.5)
    np.testing.assert_allclose(utility_drop(np.array([10.0, 30.0]), 10.0), [0.0, 2.0])
    assert math.isnan(perplexity([], []))
    assert perplexity([1e6], [1]) == math.inf


# ---------------------------------------------------------------- memorization
def test_memorization_hand_cases():
    np.testing.assert_allclose(memorization([1.0, 2.0], [3.0, 2.5]), [2.0, 0.5])
    np.testing.assert_allclose(exposure_memorization([9.0, 1.0], [2.0, 1.5]), [7.0, -0.5])
    np.testing.assert_array_equal(difficulty([3.0, 2.5]), [3.0, 2.5])
    losses = np.array([[1.0, 5.0, 1.0],
                       [3.0, 4.0, 2.0],
                       [2.0, 6.0, 3.0]])
    mask = np.array([[True, False, True],
                     [False, False, True],
                     [True, True, True]])
    # ex0: out {3} - in {1, 2} = 1.5; ex1: out {5, 4} - in {6} = -1.5; ex2: no "out" model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = counterfactual_memorization(losses, mask)
        cd = counterfactual_difficulty(losses, mask)
    np.testing.assert_allclose(cm[:2], [1.5, -1.5])
    np.testing.assert_allclose(cd[:2], [3.0, 4.5])
    assert np.isnan(cm[2]) and np.isnan(cd[2])


# ---------------------------------------------------------------- spearman
def test_spearman_with_ci():
    x = np.arange(20.0)
    out = spearman_with_ci(x, x ** 3, n_boot=200, seed=0)
    assert (out["rho"], out["lo"], out["hi"], out["n"]) == (1.0, 1.0, 1.0, 20)
    assert out["p"] < 1e-10
    neg = spearman_with_ci(np.append(x, np.nan), np.append(-x, 1.0), n_boot=200)
    assert neg["rho"] == -1.0 and neg["n"] == 20
    rng = np.random.default_rng(0)
    a = rng.normal(size=300)
    noisy = spearman_with_ci(a, a + rng.normal(size=300), n_boot=500, seed=3)
    assert noisy["lo"] < noisy["rho"] < noisy["hi"]


def test_spearman_degenerate_inputs_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in [([1.0, 2.0], [3.0, 4.0]), ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]),
                     ([1.0, np.nan, 3.0], [1.0, 2.0, np.nan])]:
            out = spearman_with_ci(x, y, n_boot=50)
            assert all(math.isnan(out[k]) for k in ("rho", "lo", "hi", "p"))


def test_fit_shape_is_capped_for_half_normal_references():
    from unlearnbench.metrics import extrapolated_exposure, fit_skewnorm
    from unlearnbench.metrics.exposure import MAX_SHAPE

    rng = np.random.default_rng(0)
    refs = 3.0 + np.abs(rng.normal(size=2000))  # a hard left edge at 3.0
    fit = fit_skewnorm(refs)
    assert abs(fit.a) <= MAX_SHAPE + 1e-9
    # one scale unit below the edge: large, but finite and of a sane size
    e = extrapolated_exposure(np.array([2.0]), refs, fit=fit)[0]
    assert np.isfinite(e) and 10 < e < 1e5
