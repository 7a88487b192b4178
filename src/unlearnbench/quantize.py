"""Weight-only quantized copies of a model, for the quantization-reload attack (docs/findings.md, F4).

Does forgetting last? An unlearned model whose weights moved only a little from θ₀ can snap back when its
weights are rounded to a coarse grid. `quantize_model` returns a quantized **copy** (the model passed in is
never touched) that scores like any model: `scoring.score_pass(acc, quantize_model(m, 8), data)`.

Every `torch.nn.Linear` (and transformers' GPT-2 `Conv1D`, turned into the equal Linear) is quantized except
the output layer (`get_output_embeddings()`), which stays in its dtype as in `transformers`' own quantized
loading; embeddings and norms are not quantized either.

Backends:

- ``torchao`` (a dependency; CPU and GPU): 8 bits = int8 per output channel, symmetric
  (`Int8WeightOnlyConfig`); 4 bits = int4 per group of `group_size` (default 64) input weights, asymmetric (with a zero
  point, as GPTQ/AWQ-style int4), `IntxWeightOnlyConfig`. Activations stay in the model's dtype.
- ``bitsandbytes`` (optional, CUDA only): 8 bits = LLM.int8 (`Linear8bitLt`, outlier threshold 6.0, the
  `load_in_8bit` default); 4 bits = NF4 with block size 64 (`Linear4bit`, the `load_in_4bit` recipe). LLM.int8
  also quantizes activations outside the outlier columns, so it is not strictly weight-only.
- ``auto``: bitsandbytes when the model is on a CUDA device and bitsandbytes imports, torchao otherwise. The
  copy records what was done in `model.unlearnbench_quantization`; quantize θ₀, θᵣ and θₜ with one backend.
"""
from __future__ import annotations

import copy
import importlib
import logging

import torch

from unlearnbench.errors import UserError

__all__ = ["BACKENDS", "BITS", "available_backends", "group_for", "quantize_model"]

BACKENDS = ("torchao", "bitsandbytes")
BITS = (8, 4)
TORCHAO_PIN = "torchao>=0.18,<0.19"


def _import(name: str):
    """Import a backend module; torchao's import-time warnings about CUDA-only kernels on a CPU build are muted."""
    if name.startswith("torchao"):
        logging.getLogger("torchao").setLevel(logging.ERROR)
    return importlib.import_module(name)


def _unavailable(name: str, device: torch.device | None = None) -> str | None:
    """Why backend `name` cannot quantize a model on `device` here (None: it can)."""
    if name == "torchao":
        try:
            _import("torchao.quantization")
        except Exception as exc:  # ImportError, or a torchao built against another torch
            return (f"torchao does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                    f"It is a dependency of unlearnbench: reinstall the project (`pip install -e .`) or run "
                    f"`pip install '{TORCHAO_PIN}'` in its environment.")
        return None
    if name == "bitsandbytes":
        try:
            _import("bitsandbytes")
        except Exception as exc:
            return (f"bitsandbytes does not import ({type(exc).__name__}). It is optional and quantizes on a CUDA "
                    "GPU: `pip install bitsandbytes` on a machine with one, or use backend 'torchao' (or 'auto'), "
                    "which runs on CPU as well.")
        if not torch.cuda.is_available():
            return ("bitsandbytes is installed but there is no CUDA device here, and unlearnbench uses it on CUDA "
                    "only. Use backend 'torchao' (or 'auto'), which runs on CPU.")
        if device is not None and device.type != "cuda":
            return (f"bitsandbytes quantizes CUDA models only, and this model is on {device}. Move the model to "
                    "the GPU first, or use backend 'torchao' (or 'auto').")
        return None
    raise UserError(f"Unknown quantization backend {name!r}: choose one of {', '.join(BACKENDS)} or 'auto'.")


def available_backends() -> dict[str, str | None]:
    """Each backend's name -> why it cannot run here, or None when it can."""
    return {name: _unavailable(name) for name in BACKENDS}


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _linearize(model: torch.nn.Module) -> None:
    """Replace transformers' Conv1D layers (GPT-2: y = x W + b, W stored [in, out]) by the equal nn.Linear."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return
    for name, old in list(model.named_modules()):
        if isinstance(old, Conv1D):
            new = torch.nn.Linear(old.weight.shape[0], old.weight.shape[1], device=old.weight.device,
                                  dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(old.weight.T)
                new.bias.copy_(old.bias)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)


def _targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers to quantize: all but the output layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def group_for(width: int, group_size: int) -> int:
    """The 4-bit group of a layer with `width` inputs: `group_size` when it divides the width, else the largest
    divisor of the width up to `group_size` if that is at least half of it, else the smallest divisor above it
    (the whole row at worst). Widths like 172 or 344 (the presets' MLP) get groups of 43."""
    if width % group_size == 0:
        return group_size
    below = max(d for d in range(1, group_size + 1) if width % d == 0)
    if 2 * below >= group_size:
        return below
    return min(d for d in range(group_size + 1, width + 1) if width % d == 0)


def _torchao(model: torch.nn.Module, bits: int, group_size: int) -> dict:
    q = _import("torchao.quantization")
    targets = _targets(model)
    if bits == 8:
        # set_inductor_config=False: the default would change torch._inductor's global settings for the process
        config = q.Int8WeightOnlyConfig(set_inductor_config=False)
        wanted = {id(m) for _, m in targets}
        q.quantize_(model, config, filter_fn=lambda m, fqn: id(m) in wanted)
        return {"scheme": "int8 per output channel, symmetric"}
    groups: dict[int, set[int]] = {}
    for _, m in targets:
        groups.setdefault(group_for(m.in_features, group_size), set()).add(id(m))
    for g, wanted in sorted(groups.items()):
        config = q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(g),
                                        mapping_type=q.MappingType.ASYMMETRIC)
        q.quantize_(model, config, filter_fn=lambda m, fqn, wanted=wanted: id(m) in wanted)
    sizes = ", ".join(f"{g} ({len(w)} layers)" for g, w in sorted(groups.items()))
    return {"scheme": f"int4 per group, asymmetric; groups {sizes}"}


def _bitsandbytes(model: torch.nn.Module, bits: int, device: torch.device) -> dict:
    bnb = _import("bitsandbytes")
    for name, old in _targets(model):
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        w = old.weight.detach().to("cpu")
        if bits == 8:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=old.weight.dtype, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.detach().to("cpu"), requires_grad=False)
        setattr(parent, name.rpartition(".")[2], new.to(device))  # moving to the GPU quantizes
    return {"scheme": "LLM.int8, outlier threshold 6.0" if bits == 8 else "NF4, block size 64"}


def quantize_model(model: torch.nn.Module, bits: int, backend: str = "auto", group_size: int = 64) -> torch.nn.Module:
    """A weight-only quantized copy of `model` (8 or 4 bits) in eval mode; `model` itself is left as it was.

    `group_size` is the torchao 4-bit group (input weights sharing one scale and zero point; `group_for` picks
    a divisor of a layer's width when it does not divide it). Errors that the user can fix (unknown backend or
    bit width, a backend that is missing or cannot run here) raise UserError.
    """
    if bits not in BITS:
        raise UserError(f"Quantization to {bits} bits is not offered: choose 8 (int8) or 4 (4-bit) weights.")
    if group_size < 1:
        raise UserError(f"The 4-bit group size must be positive, got {group_size}.")
    device = _device(model)
    if backend == "auto":
        backend = "bitsandbytes" if device.type == "cuda" and _unavailable("bitsandbytes", device) is None \
            else "torchao"
    reason = _unavailable(backend, device)
    if reason is not None:
        raise UserError(f"Cannot quantize with {backend}: {reason}")
    quantized = copy.deepcopy(model).eval()
    quantized.requires_grad_(False)
    _linearize(quantized)
    targets = _targets(quantized)
    if not targets:
        raise UserError(f"{type(model).__name__} has no linear layers besides its output layer: there is nothing "
                        "to quantize weight-only.")
    info = _torchao(quantized, bits, group_size) if backend == "torchao" else _bitsandbytes(quantized, bits, device)
    quantized.unlearnbench_quantization = {"backend": backend, "bits": bits, "layers": len(targets), **info}
    return quantized
