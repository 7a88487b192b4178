"""Unlearning losses against hand-computed values and autograd gradient signs (docs/methods.md)."""

import math

import pytest
import torch

from unlearnbench.unlearn.methods import (
    METHODS,
    LossInputs,
    MethodParams,
    get_method,
    register_method,
)

INF = float("inf")

# Forget batch, B=2, T=3. Position [0, 2] is padding (unscored) and holds -inf on purpose.
FORGET_LOGP = [[-1.0, -2.0, -INF], [-0.3, -4.0, -7.0]]
FORGET_MASK = [[1, 1, 0], [1, 1, 1]]
# Scored forget NLLs: 1, 2, 0.3, 4, 7 -> sum 14.3 over 5 tokens.
FORGET_REF_LOGP = [[-0.5, -0.5, -9.0], [-0.3, -0.7, -1.0]]
# s_θ = (-3, -11.3), s_ref = (-1, -2), d = s_θ - s_ref = (-2, -9.3).

# Retain batch, B2=2, T2=3. Scored NLLs: 0.5, 1.5, 2, 1 -> sum 5 over 4 tokens.
RETAIN_LOGP = [[-0.5, -1.5, -2.0], [-1.0, -0.1, -0.2]]
RETAIN_MASK = [[1, 1, 1], [1, 0, 0]]


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def forget_inputs(**extra):
    return LossInputs(forget_logp=leaf(FORGET_LOGP), forget_mask=torch.tensor(FORGET_MASK), **extra)


def with_retain(**extra):
    return forget_inputs(retain_logp=leaf(RETAIN_LOGP), retain_mask=torch.tensor(RETAIN_MASK), **extra)


def run(name, inputs, **params):
    return get_method(name).fn(inputs, MethodParams(**params))


# ------------------------------------------------------------------------------------------ ga


def test_default_method_and_betas_are_the_configs():
    from unlearnbench.config import UnlearnConfig

    u = UnlearnConfig()
    assert (u.method, u.beta, u.simnpo_beta) == ("ga", 0.1, 2.5)
    ref = torch.tensor(FORGET_REF_LOGP, dtype=torch.float64)
    for name, beta in (("npo", u.beta), ("npo_gd", u.beta), ("simnpo", u.simnpo_beta)):
        inputs = with_retain(forget_ref_logp=ref)
        assert run(name, inputs)[0].item() == run(name, inputs, beta=beta)[0].item()
        assert run(name, inputs)[0].item() != run(name, inputs, beta=2 * beta)[0].item()


def test_ga_hand_value():
    loss, stats = run("ga", forget_inputs())
    assert loss.item() == pytest.approx(-(1 + 2 + 0.3 + 4 + 7) / 5)  # -2.86
    assert stats["forget_nll"] == pytest.approx(14.3 / 5)


def test_ga_gradient_lowers_forget_logp_on_scored_positions_only():
    inputs = forget_inputs()
    loss, _ = run("ga", inputs)
    loss.backward()
    grad = inputs.forget_logp.grad
    # loss = Σ logp / 5, so d loss / d logp = +1/5 where scored: descending lowers log p(forget).
    assert torch.allclose(grad, torch.tensor([[0.2, 0.2, 0.0], [0.2, 0.2, 0.2]], dtype=torch.float64))
    assert not torch.isnan(grad).any()


def test_ga_clamp_caps_nll_and_stops_gradient_past_the_cap():
    inputs = forget_inputs()
    loss, stats = run("ga", inputs, nll_clamp=3.0)
    # NLLs 1, 2, 0.3, min(4, 3), min(7, 3) -> 9.3 over 5 tokens.
    assert loss.item() == pytest.approx(-9.3 / 5)
    assert stats["forget_nll"] == pytest.approx(14.3 / 5)  # logged uncapped
    loss.backward()
    expected = torch.tensor([[0.2, 0.2, 0.0], [0.2, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(inputs.forget_logp.grad, expected)


def test_float_and_bool_masks_agree():
    as_bool = LossInputs(forget_logp=leaf(FORGET_LOGP), forget_mask=torch.tensor(FORGET_MASK).bool())
    as_float = LossInputs(forget_logp=leaf(FORGET_LOGP), forget_mask=torch.tensor(FORGET_MASK).float())
    assert run("ga", as_bool)[0].item() == run("ga", as_float)[0].item()


def test_token_weight_scales_loss_not_stats():
    loss, stats = run("ga", forget_inputs(token_weight=4.0))
    assert loss.item() == pytest.approx(4 * -14.3 / 5)
    assert stats["forget_nll"] == pytest.approx(14.3 / 5)


# --------------------------------------------------------------------------------------- ga_gd


def test_ga_gd_hand_value_and_retain_gradient_sign():
    inputs = with_retain()
    loss, stats = run("ga_gd", inputs, retain_weight=0.5)
    # -14.3/5 + 0.5 * (0.5 + 1.5 + 2 + 1)/4 = -2.86 + 0.625
    assert loss.item() == pytest.approx(-2.86 + 0.5 * 5 / 4)
    assert stats["retain_nll"] == pytest.approx(1.25)
    loss.backward()
    grad = inputs.retain_logp.grad
    # d/d logp of 0.5 * Σ(-logp)/4 = -0.125: descending raises log p(retain).
    expected = torch.tensor([[-0.125, -0.125, -0.125], [-0.125, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(grad, expected)
    assert (inputs.forget_logp.grad[torch.tensor(FORGET_MASK).bool()] > 0).all()


# --------------------------------------------------------------------------------------- ga_kl

UNIFORM = [0.25, 0.25, 0.25, 0.25]
SKEWED = [0.5, 0.25, 0.125, 0.125]
PEAKED = [0.97, 0.01, 0.01, 0.01]


def kl_inputs(current, reference, mask):
    return forget_inputs(
        retain_mask=torch.tensor(mask),
        retain_logprobs=torch.tensor(current, dtype=torch.float64).log().requires_grad_(),
        retain_ref_logprobs=torch.tensor(reference, dtype=torch.float64).log(),
    )


def test_ga_kl_zero_when_distributions_equal():
    dists = [[SKEWED, UNIFORM, PEAKED], [UNIFORM, SKEWED, SKEWED]]
    loss, stats = run("ga_kl", kl_inputs(dists, dists, [[1, 1, 1], [1, 1, 1]]))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-12)
    assert loss.item() == pytest.approx(-2.86)


def test_ga_kl_hand_value():
    current = [[UNIFORM, UNIFORM, PEAKED], [SKEWED, UNIFORM, PEAKED]]
    reference = [[SKEWED, UNIFORM, UNIFORM], [UNIFORM, UNIFORM, UNIFORM]]
    mask = [[1, 1, 0], [1, 1, 0]]  # the PEAKED positions differ wildly but are not scored
    # [0,0]: KL(skewed ‖ uniform) = .5 ln(.5/.25) + .25 ln 1 + 2 × .125 ln(.125/.25) = .5ln2 − .25ln2 = .25 ln2
    # [1,0]: KL(uniform ‖ skewed) = .25 (ln(.25/.5) + ln 1 + 2 ln(.25/.125)) = .25 (−ln2 + 2 ln2) = .25 ln2
    # other scored positions: 0. Token mean over 4 scored positions: .5 ln2 / 4 = ln2 / 8.
    inputs = kl_inputs(current, reference, mask)
    loss, stats = run("ga_kl", inputs, retain_weight=2.0)
    assert stats["kl"] == pytest.approx(math.log(2) / 8)
    assert loss.item() == pytest.approx(-2.86 + 2.0 * math.log(2) / 8)
    loss.backward()
    # d KL / d log p_θ = −p_ref: descending pulls θ toward θ₀; unscored positions get nothing.
    grad = inputs.retain_logprobs.grad
    assert torch.allclose(grad[0, 0], -2.0 * torch.tensor(SKEWED, dtype=torch.float64) / 4)
    assert (grad[:, 2] == 0).all()


def test_ga_kl_reference_with_zero_mass_is_not_nan():
    reference = [[[1.0, 0.0, 0.0, 0.0]] * 3] * 2
    loss, stats = run("ga_kl", kl_inputs([[UNIFORM] * 3] * 2, reference, [[1, 1, 1], [1, 1, 1]]))
    # KL(δ_0 ‖ uniform) = 1 · ln(1/0.25) = ln 4 at every position.
    assert stats["kl"] == pytest.approx(math.log(4))
    assert not torch.isnan(loss)


# ----------------------------------------------------------------------------------------- npo


def test_npo_hand_value():
    beta = 0.1
    loss, stats = run("npo", forget_inputs(forget_ref_logp=torch.tensor(FORGET_REF_LOGP, dtype=torch.float64)))
    # per sequence: −(2/β) log σ(−βd) = −(2/β) log(1/(1 + e^{βd})) = (2/β) log(1 + e^{βd}), d = (−2, −9.3)
    expected = (2 / beta) * (math.log(1 + math.exp(beta * -2.0)) + math.log(1 + math.exp(beta * -9.3))) / 2
    assert loss.item() == pytest.approx(expected)
    assert stats["log_ratio"] == pytest.approx((-2.0 - 9.3) / 2)
    assert stats["forget_nll"] == pytest.approx(14.3 / 5)


def test_npo_at_reference_is_two_over_beta_log_two_and_gradient_lowers_forget():
    inputs = forget_inputs(forget_ref_logp=torch.tensor(FORGET_LOGP, dtype=torch.float64))
    loss, _ = run("npo", inputs)  # default β = 0.1
    assert loss.item() == pytest.approx((2 / 0.1) * math.log(2))  # −(2/β) log σ(0)
    loss.backward()
    # d/d s_θ of −(2/β) log σ(−β d) = 2 σ(β d) = 1 at d = 0, over 2 sequences: 0.5 per scored token.
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(inputs.forget_logp.grad, expected)


def test_npo_is_bounded_as_forget_logp_goes_to_minus_infinity():
    far = [[-1e6, -1e6, -1e6], [-1e6, -1e6, -1e6]]
    inputs = LossInputs(
        forget_logp=leaf(far),
        forget_mask=torch.tensor(FORGET_MASK),
        forget_ref_logp=torch.tensor(FORGET_REF_LOGP, dtype=torch.float64),
    )
    loss, _ = run("npo", inputs)
    assert 0.0 <= loss.item() < 1e-9  # (2/β) log(1 + e^{βd}) → 0 as d → −∞
    loss.backward()
    assert torch.isfinite(inputs.forget_logp.grad).all()
    assert inputs.forget_logp.grad.abs().max().item() < 1e-9  # gradient vanishes too
    ga_loss, _ = run("ga", LossInputs(forget_logp=leaf(far), forget_mask=torch.tensor(FORGET_MASK)))
    assert ga_loss.item() == pytest.approx(-1e6)  # GA keeps going


def test_npo_ignores_sequences_with_no_scored_tokens():
    ref = torch.tensor(FORGET_REF_LOGP, dtype=torch.float64)
    base, _ = run("npo", forget_inputs(forget_ref_logp=ref))
    padded = LossInputs(
        forget_logp=torch.cat([leaf(FORGET_LOGP), torch.zeros(1, 3, dtype=torch.float64)]),
        forget_mask=torch.tensor(FORGET_MASK + [[0, 0, 0]]),
        forget_ref_logp=torch.cat([ref, torch.zeros(1, 3, dtype=torch.float64)]),
    )
    assert run("npo", padded)[0].item() == pytest.approx(base.item())
    assert run("simnpo", padded)[0].item() == pytest.approx(run("simnpo", forget_inputs())[0].item())


def test_npo_gd_adds_retain_nll():
    ref = torch.tensor(FORGET_REF_LOGP, dtype=torch.float64)
    npo_loss, _ = run("npo", forget_inputs(forget_ref_logp=ref), beta=0.5)
    loss, stats = run("npo_gd", with_retain(forget_ref_logp=ref), beta=0.5, retain_weight=3.0)
    assert loss.item() == pytest.approx(npo_loss.item() + 3.0 * 1.25)
    assert stats["retain_nll"] == pytest.approx(1.25)


# -------------------------------------------------------------------------------------- simnpo


def test_simnpo_hand_value():
    beta = 2.5
    # |y| = (2, 3), s_θ = (−3, −11.3); argument −(β/|y|) s_θ − γ = (3.75, 9.41666…) at γ = 0.
    # −(2/β) log σ(x) = (2/β) log(1 + e^{−x}), averaged over the two sequences.
    expected = (2 / beta) * (math.log(1 + math.exp(-3.75)) + math.log(1 + math.exp(-2.5 * 11.3 / 3))) / 2
    loss, stats = run("simnpo", forget_inputs())
    assert loss.item() == pytest.approx(expected)
    assert stats["forget_nll"] == pytest.approx(14.3 / 5)
    # γ = 1, β = 1: arguments (1.5 − 1, 11.3/3 − 1).
    expected = 2 * (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(-(11.3 / 3 - 1)))) / 2
    inputs = forget_inputs()
    loss, _ = run("simnpo", inputs, beta=1.0, gamma=1.0)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert (inputs.forget_logp.grad[torch.tensor(FORGET_MASK).bool()] > 0).all()


# --------------------------------------------------------------------- data-parallel normalisers


@pytest.mark.parametrize("name", ["ga", "ga_gd", "ga_kl", "npo", "npo_gd", "simnpo"])
def test_halves_with_global_counts_sum_to_full_batch(name):
    gen = torch.Generator().manual_seed(0)
    b, t, v = 4, 5, 4
    mask_f = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0], [1, 0, 1, 0, 1]])
    mask_r = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    full = dict(
        forget_logp=-torch.rand(b, t, generator=gen, dtype=torch.float64) * 5,
        forget_mask=mask_f,
        forget_ref_logp=-torch.rand(b, t, generator=gen, dtype=torch.float64) * 5,
        retain_logp=-torch.rand(b, t, generator=gen, dtype=torch.float64) * 5,
        retain_mask=mask_r,
        retain_logprobs=torch.randn(b, t, v, generator=gen, dtype=torch.float64).log_softmax(-1),
        retain_ref_logprobs=torch.randn(b, t, v, generator=gen, dtype=torch.float64).log_softmax(-1),
    )
    params = dict(nll_clamp=3.0, retain_weight=0.7)
    whole, whole_stats = run(name, LossInputs(**full), **params)
    counts = dict(
        forget_tokens=int(mask_f.sum()), forget_seqs=b, retain_tokens=int(mask_r.sum()), retain_seqs=b
    )
    halves = [
        run(name, LossInputs(**{k: x[rows] for k, x in full.items()}, **counts), **params)
        for rows in (slice(0, 1), slice(1, 4))  # uneven split on purpose
    ]
    assert sum(h[0] for h in halves).item() == pytest.approx(whole.item())
    for key, value in whole_stats.items():
        assert sum(h[1][key] for h in halves) == pytest.approx(value)


# ------------------------------------------------------------------------------------ registry


def test_registry_lists_exactly_the_six_methods():
    assert set(METHODS) == {"ga", "ga_gd", "ga_kl", "npo", "npo_gd", "simnpo"}
    assert get_method("npo").needs_reference and not get_method("simnpo").needs_reference
    assert get_method("ga_kl").needs_full_retain_dist and get_method("ga_kl").needs_retain
    assert not get_method("ga").needs_retain and get_method("npo_gd").needs_retain
    assert all(spec.description for spec in METHODS.values())


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown unlearning method 'gd'.*ga, ga_gd, ga_kl, npo, npo_gd, simnpo"):
        get_method("gd")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_method("ga")(lambda inputs, params: (torch.zeros(()), {}))


@pytest.mark.parametrize(
    "name, missing",
    [("npo", "forget_ref_logp"), ("npo_gd", "retain_logp"), ("ga_gd", "retain_mask"), ("ga_kl", "retain_logprobs")],
)
def test_missing_inputs_name_method_and_field(name, missing):
    with pytest.raises(ValueError, match=rf"'{name}'.*{missing}"):
        run(name, forget_inputs())


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="beta"):
        MethodParams(beta=0.0)
    with pytest.raises(ValueError, match="nll_clamp"):
        MethodParams(nll_clamp=-1.0)
    with pytest.raises(ValueError, match="forget_tokens"):
        forget_inputs(forget_tokens=0)
    with pytest.raises(ValueError, match="forget_mask"):
        LossInputs(forget_logp=leaf(FORGET_LOGP), forget_mask=torch.ones(2, 4))
