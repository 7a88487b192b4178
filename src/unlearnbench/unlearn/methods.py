"""Unlearning losses as pure functions of per-token log-probabilities and masks (docs/methods.md).

Each method maps ``(LossInputs, MethodParams)`` to ``(loss, stats)``: a scalar tensor to
*minimise* and a dict of detached floats for logging. Nothing here calls a model or talks to other
processes; the training loop gathers the log-probs at the label ids and, under data parallelism,
passes the global counts described below.

Normalisation under data parallelism
------------------------------------
Every mean here is ``(sum over this shard) / count``. Pass the counts of the whole global batch in
``LossInputs.forget_tokens``, ``forget_seqs``, ``retain_tokens`` and ``retain_seqs`` and each shard
returns its *contribution*: the losses (and the stats) of all shards add up to what one process
computes on the whole batch, whatever the number of processes or how the batch was split. Left as
None, a count is taken from this shard's mask (the single-process case). A token count is the
number of scored positions (mask != 0); a sequence count is the number of sequences with at least
one scored position, because a sequence with none contributes nothing to any sequence mean.

DDP, FSDP and DeepSpeed *average* gradients over processes, which divides the summed shard
contributions by the world size once more; set ``LossInputs.token_weight`` to the world size to
undo that. It multiplies the returned loss only, never the stats, so stats stay additive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from unlearnbench.config import UnlearnConfig

# A global count may come straight from an all-reduce, so a 0-d tensor is accepted as well as an int.
Count = int | torch.Tensor


@dataclass(frozen=True, eq=False)
class LossInputs:
    """Per-token log-probs and masks of one (shard of a) step; see the module docstring for counts.

    Shapes: forget tensors [B, T], retain tensors [B2, T2], full retain distributions [B2, T2, V].
    Masks may be bool or float; a position is scored where the mask is non-zero. Reference
    tensors (θ₀) are detached here, whatever the caller passes.
    """

    forget_logp: torch.Tensor
    forget_mask: torch.Tensor
    forget_ref_logp: torch.Tensor | None = None
    retain_logp: torch.Tensor | None = None
    retain_mask: torch.Tensor | None = None
    retain_logprobs: torch.Tensor | None = None
    retain_ref_logprobs: torch.Tensor | None = None
    forget_tokens: Count | None = None
    forget_seqs: Count | None = None
    retain_tokens: Count | None = None
    retain_seqs: Count | None = None
    token_weight: float | None = None

    def __post_init__(self) -> None:
        for name in ("forget_tokens", "forget_seqs", "retain_tokens", "retain_seqs", "token_weight"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"LossInputs.{name} must be positive, got {value}")
        _check_shape("forget_logp", self.forget_logp, None, dims=2)
        _check_shape("forget_mask", self.forget_mask, self.forget_logp.shape)
        _check_shape("forget_ref_logp", self.forget_ref_logp, self.forget_logp.shape)
        retain_shape = None if self.retain_mask is None else self.retain_mask.shape
        _check_shape("retain_mask", self.retain_mask, None, dims=2)
        _check_shape("retain_logp", self.retain_logp, retain_shape)
        for name in ("retain_logprobs", "retain_ref_logprobs"):
            value = getattr(self, name)
            _check_shape(name, value, None, dims=3)
            if value is not None and retain_shape is not None and value.shape[:2] != retain_shape:
                raise ValueError(
                    f"LossInputs.{name} has shape {tuple(value.shape)}, expected "
                    f"[{', '.join(map(str, retain_shape))}, V] to match retain_mask"
                )
        if (
            self.retain_logprobs is not None
            and self.retain_ref_logprobs is not None
            and self.retain_logprobs.shape != self.retain_ref_logprobs.shape
        ):
            raise ValueError(
                f"LossInputs.retain_ref_logprobs has shape {tuple(self.retain_ref_logprobs.shape)}, "
                f"expected {tuple(self.retain_logprobs.shape)} like retain_logprobs"
            )


@dataclass(frozen=True)
class MethodParams:
    """Hyper-parameters shared by all methods; each method reads the ones it uses.

    ``beta`` None means the method's default, the config's: ``unlearn.beta`` for npo/npo_gd,
    ``unlearn.simnpo_beta`` for simnpo (the one place these defaults live). ``gamma`` is SimNPO's reward
    margin. ``retain_weight`` scales the retain term of ga_gd, ga_kl and npo_gd. ``nll_clamp`` caps each
    forget token's NLL in the GA term, so tokens pushed past the cap stop receiving gradient and gradient
    ascent cannot run off to infinity on them.
    """

    beta: float | None = None
    gamma: float = 0.0
    retain_weight: float = 1.0
    nll_clamp: float | None = None

    def __post_init__(self) -> None:
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"MethodParams.beta must be positive, got {self.beta}")
        if not self.retain_weight >= 0:
            raise ValueError(f"MethodParams.retain_weight must be >= 0, got {self.retain_weight}")
        if self.nll_clamp is not None and not self.nll_clamp > 0:
            raise ValueError(f"MethodParams.nll_clamp must be positive, got {self.nll_clamp}")

    def beta_or(self, default: float) -> float:
        """The configured beta, or ``default`` when none was set."""
        return default if self.beta is None else self.beta


LossFn = Callable[[LossInputs, MethodParams], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its loss function and which inputs the loop must compute for it."""

    fn: LossFn
    needs_reference: bool
    needs_retain: bool
    needs_full_retain_dist: bool
    description: str


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    needs_reference: bool = False,
    needs_retain: bool = False,
    needs_full_retain_dist: bool = False,
    description: str | None = None,
) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss function to ``METHODS``; the description defaults to its docstring."""

    def decorate(fn: LossFn) -> LossFn:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} is already registered")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        METHODS[name] = MethodSpec(fn, needs_reference, needs_retain, needs_full_retain_dist, doc)
        return fn

    return decorate


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; ValueError listing the registered names if it is unknown."""
    try:
        return METHODS[name]
    except KeyError:
        allowed = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown unlearning method {name!r}; allowed: {allowed}") from None


# --------------------------------------------------------------------------------------- helpers


def _check_shape(name: str, value: torch.Tensor | None, shape: torch.Size | None, dims: int = 0) -> None:
    if value is None:
        return
    if dims and value.dim() != dims:
        raise ValueError(f"LossInputs.{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"LossInputs.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def _require(inputs: LossInputs, method: str, *names: str) -> None:
    missing = [name for name in names if getattr(inputs, name) is None]
    if missing:
        raise ValueError(f"unlearning method {method!r} needs LossInputs.{', '.join(missing)} (got None)")


def _count(given: Count | None, local: torch.Tensor) -> Count | torch.Tensor:
    # A shard with nothing scored has a zero sum; dividing it by 1 keeps it zero instead of NaN.
    return local.clamp_min(1) if given is None else given


def _masked_sum(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    # torch.where rather than a product: padding positions may hold -inf or NaN log-probs, and
    # 0 * inf is NaN in the value and in the gradient.
    return torch.where(scored, values, 0.0).sum()


def _seq_sum(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    return torch.where(scored, values, 0.0).sum(dim=-1)


def _stats(**values: torch.Tensor) -> dict[str, float]:
    return {key: float(value.detach()) for key, value in values.items()}


def _scaled(loss: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    return loss if inputs.token_weight is None else loss * inputs.token_weight


def _gradient_ascent(inputs: LossInputs, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(GA loss = −mean capped forget NLL, mean uncapped forget NLL for logging)."""
    scored = inputs.forget_mask != 0
    nll = -inputs.forget_logp.float()
    capped = nll if params.nll_clamp is None else torch.clamp(nll, max=params.nll_clamp)
    tokens = _count(inputs.forget_tokens, scored.sum())
    return -_masked_sum(capped, scored) / tokens, _masked_sum(nll.detach(), scored) / tokens


def _forget_nll(inputs: LossInputs) -> torch.Tensor:
    scored = inputs.forget_mask != 0
    nll = -inputs.forget_logp.detach().float()
    return _masked_sum(nll, scored) / _count(inputs.forget_tokens, scored.sum())


def _retain_nll(inputs: LossInputs) -> torch.Tensor:
    scored = inputs.retain_mask != 0
    nll = -inputs.retain_logp.float()
    return _masked_sum(nll, scored) / _count(inputs.retain_tokens, scored.sum())


def _retain_kl(inputs: LossInputs) -> torch.Tensor:
    """Token mean over scored retain positions of KL(θ₀ ‖ θ) = Σ_v p_ref (log p_ref − log p_θ)."""
    scored = inputs.retain_mask != 0
    ref = inputs.retain_ref_logprobs.detach().float()
    cur = inputs.retain_logprobs.float()
    p_ref = ref.exp()
    # 0 · log 0 = 0: a token the reference gives no mass contributes nothing (not NaN).
    per_vocab = torch.where(p_ref > 0, p_ref * (ref - cur), 0.0)
    per_token = per_vocab.sum(dim=-1)
    return _masked_sum(per_token, scored) / _count(inputs.retain_tokens, scored.sum())


def _npo(inputs: LossInputs, params: MethodParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(NPO loss, mean sequence log-ratio s_θ − s_ref for logging)."""
    beta = params.beta_or(UnlearnConfig.beta)
    scored = inputs.forget_mask != 0
    has_tokens = scored.any(dim=-1)
    log_ratio = _seq_sum(inputs.forget_logp.float(), scored) - _seq_sum(
        inputs.forget_ref_logp.detach().float(), scored
    )
    # −(2/β) log σ(−β·ratio): logsigmoid stays finite and smooth for any ratio, and the loss tends
    # to 0 (not −∞ as GA does) once the forget sequence is far less likely than under θ₀.
    per_seq = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)
    seqs = _count(inputs.forget_seqs, has_tokens.sum())
    loss = torch.where(has_tokens, per_seq, 0.0).sum() / seqs
    return loss, torch.where(has_tokens, log_ratio.detach(), 0.0).sum() / seqs


# --------------------------------------------------------------------------------------- methods


@register_method("ga")
def ga(inputs: LossInputs, params: MethodParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Gradient ascent: maximise the forget NLL (token mean, optionally capped by nll_clamp)."""
    _require(inputs, "ga", "forget_logp", "forget_mask")
    loss, forget_nll = _gradient_ascent(inputs, params)
    return _scaled(loss, inputs), _stats(forget_nll=forget_nll)


@register_method("ga_gd", needs_retain=True)
def ga_gd(inputs: LossInputs, params: MethodParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Gradient difference: gradient ascent on forget + retain_weight × retain NLL."""
    _require(inputs, "ga_gd", "forget_logp", "forget_mask", "retain_logp", "retain_mask")
    ga_loss, forget_nll = _gradient_ascent(inputs, params)
    retain_nll = _retain_nll(inputs)
    loss = ga_loss + params.retain_weight * retain_nll
    return _scaled(loss, inputs), _stats(forget_nll=forget_nll, retain_nll=retain_nll)


@register_method("ga_kl", needs_reference=True, needs_retain=True, needs_full_retain_dist=True)
def ga_kl(inputs: LossInputs, params: MethodParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Gradient ascent on forget + retain_weight × KL(θ₀ ‖ θ) on retain (token mean)."""
    _require(
        inputs, "ga_kl", "forget_logp", "forget_mask", "retain_mask", "retain_logprobs", "retain_ref_logprobs"
    )
    ga_loss, forget_nll = _gradient_ascent(inputs, params)
    kl = _retain_kl(inputs)
    loss = ga_loss + params.retain_weight * kl
    return _scaled(loss, inputs), _stats(forget_nll=forget_nll, kl=kl)


@register_method("npo", needs_reference=True)
def npo(inputs: LossInputs, params: MethodParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative preference optimisation against θ₀: −(2/β)·mean log σ(−β(s_θ − s_ref))."""
    _require(inputs, "npo", "forget_logp", "forget_mask", "forget_ref_logp")
    loss, log_ratio = _npo(inputs, params)
    return _scaled(loss, inputs), _stats(forget_nll=_forget_nll(inputs), log_ratio=log_ratio)


@register_method("npo_gd", needs_reference=True, needs_retain=True)
def npo_gd(inputs: LossInputs, params: MethodParams) -> tuple[torch.Tensor, dict[str, float]]:
    """NPO on forget + retain_weight × retain NLL."""
    _require(inputs, "npo_gd", "forget_logp", "forget_mask", "forget_ref_logp", "retain_logp", "retain_mask")
    npo_loss, log_ratio = _npo(inputs, params)
    retain_nll = _retain_nll(inputs)
    loss = npo_loss + params.retain_weight * retain_nll
    return _scaled(loss, inputs), _stats(
        forget_nll=_forget_nll(inputs), log_ratio=log_ratio, retain_nll=retain_nll
    )


@register_method("simnpo")
def simnpo(inputs: LossInputs, params: MethodParams) -> tuple[torch.Tensor, dict[str, float]]:
    """SimNPO, reference-free: −(2/β)·mean log σ(−(β/|y|)·s_θ − γ), |y| = scored tokens."""
    _require(inputs, "simnpo", "forget_logp", "forget_mask")
    beta = params.beta_or(UnlearnConfig.simnpo_beta)
    scored = inputs.forget_mask != 0
    lengths = scored.sum(dim=-1)
    has_tokens = lengths > 0
    mean_logp = _seq_sum(inputs.forget_logp.float(), scored) / lengths.clamp_min(1)
    per_seq = -(2.0 / beta) * F.logsigmoid(-beta * mean_logp - params.gamma)
    loss = torch.where(has_tokens, per_seq, 0.0).sum() / _count(inputs.forget_seqs, has_tokens.sum())
    return _scaled(loss, inputs), _stats(forget_nll=_forget_nll(inputs))
