"""LoRA unlearning with peft (`unlearn.lora.rank` > 0): only low-rank adapters are trained.

`attach` injects the adapters into the model in place (peft's LoRA layers replace the targeted linear layers of
the same transformers model object, whose base weights are frozen), so everything downstream of `setup` keeps
working on a plain transformers model: the backend wrapping (DDP, DeepSpeed ZeRO-1/2), the split output layer and
the evaluator, which therefore score the adapted model. The PeftModel handle is kept only for two things:

- the frozen θ₀ of methods that compare with it (npo, ga_kl, ...) is the same model with its adapters disabled
  (`adapters_off`): no second copy of the weights, and exactly θ₀ since the base weights never change;
- the saved model (`merged_state_dict`): base + scale x B A per adapted layer, under the plain layer names, so
  `model_unlearned` loads with `AutoModelForCausalLM.from_pretrained` (the attack stage) with no peft involved.
  The merge is computed beside the model, never in it: training can go on after a save with the base untouched.

peft imports torchao and prints loader warnings, so it is imported here only when LoRA is on.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from unlearnbench.config import LoraConfig
from unlearnbench.errors import UserError


def enabled(lora: LoraConfig) -> bool:
    """Whether LoRA unlearning is on."""
    return lora.rank > 0


def check_backend(acc) -> None:
    """LoRA runs in one process, under DDP and under DeepSpeed ZeRO-1/2; ZeRO-3 and FSDP shard the base weights,
    which the merged save and the adapter-off reference do not gather."""
    from unlearnbench.distributed import is_sharded

    if is_sharded(acc, weights=True):
        raise UserError("unlearn.lora.rank > 0 (LoRA unlearning) runs in one process, under DDP and under DeepSpeed "
                        "ZeRO-1/2, but this launch shards the base weights (ZeRO-3 or FSDP). Launch with a DDP or "
                        "ZeRO-2 accelerate config (LoRA's optimizer state is small, so ZeRO-2 already holds it "
                        "sharded), or set unlearn.lora.rank=0.")


def _import_peft():
    """peft, imported quietly: it imports torchao, which logs a warning per optional kernel library it cannot load
    and per enum it registers with torch.compile; none of them matter to LoRA training."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import peft
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return peft


def attach(lora: LoraConfig, model, seed: int = 0):
    """Inject LoRA adapters into `model` in place (its base weights frozen) and return the PeftModel around it.

    The adapters' random initialisation (A; B starts at zero, so the adapted model starts as θ₀) is drawn from
    `seed`, on a forked RNG: every request, process and rerun starts from the same adapters.

    peft's "all-linear" adapts every nn.Linear and transformers Conv1D (GPT-2's c_attn, c_proj, c_fc) except the
    output layer; named modules match as suffixes of module names (peft's rule).
    """
    import warnings

    from transformers.pytorch_utils import Conv1D

    peft = _import_peft()

    targets: Any = list(lora.target_modules)
    targets = "all-linear" if targets == ["all-linear"] else targets
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             bias="none", fan_in_fan_out=conv1d)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(seed)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, (torch.nn.Linear, Conv1D))})
        raise UserError(f"unlearn.lora.target_modules={lora.target_modules} does not fit this model "
                        f"({type(model).__name__}): {str(exc).splitlines()[0]}. Its linear layers are named "
                        f"{', '.join(linear)}; give some of these, or [all-linear].") from None
    if wrapped.get_base_model() is not model:  # the in-place injection everything else relies on
        raise RuntimeError("peft did not adapt the model in place")
    if hasattr(model.get_output_embeddings(), "lora_A") and getattr(model.config, "tie_word_embeddings", False):
        raise UserError(f"unlearn.lora.target_modules={lora.target_modules} adapts the output layer, which this model "
                        "ties to its input embeddings: the merged model could not keep both. Leave the output layer "
                        "out (all-linear does).")
    return wrapped


def has_adapters(model) -> bool:
    """Whether `model` (a transformers model, unwrapped) carries LoRA layers; no peft import."""
    return any(hasattr(m, "lora_A") and hasattr(m, "get_delta_weight") for m in model.modules())


@contextmanager
def adapters_off(peft_model, model):
    """θ₀: `model` (the adapted model, as the reference forward calls it) with its adapters disabled and in eval mode
    (as a separately loaded θ₀ would be: no dropout); train/eval modes are restored afterwards."""
    training = model.training
    model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        model.train(training)


def trainable_params(model) -> int:
    """Parameters the optimizer updates (shared ones once)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values()
               if p.requires_grad)


def optimizer_state_bytes(opt) -> int:
    """Bytes of the optimizer's state tensors held by this process (Adam's moments; under ZeRO-1/2 this rank's
    partition), through Accelerate's and DeepSpeed's wrappers."""
    seen, inner, tensors = set(), opt, {}
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        states = getattr(inner, "state", None)
        for state in states.values() if isinstance(states, dict) else ():
            for v in state.values() if isinstance(state, dict) else ():
                if torch.is_tensor(v) and v.dim() > 0:  # a 0-d step counter is not state memory
                    tensors[v.data_ptr()] = v.numel() * v.element_size()
        inner = getattr(inner, "optimizer", None)
    return int(sum(tensors.values()))


@torch.no_grad()
def merged_state_dict(model, device: str | torch.device = "cpu") -> dict | None:
    """The state dict of `model` with every LoRA layer merged (W + scale x B A) under the plain layer's names, on
    `device`; None when the model has no adapters. The model itself is not changed."""
    if not has_adapters(model):
        return None
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_delta_weight")}
    state, moved = {}, {}  # moved: one copy per storage, so tied weights stay tied for save_pretrained
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if any(part.startswith("lora_") for part in key.split(".")):
            continue  # adapter weights: merged below
        if owner.endswith(".base_layer") and owner[: -len(".base_layer")] in layers:
            key = owner[: -len(".base_layer")] + "." + key.rsplit(".", 1)[1]
        ptr = (value.data_ptr(), value.shape, value.dtype)
        if ptr not in moved:
            moved[ptr] = value.detach().to(device)
        state[key] = moved[ptr]
    for name, layer in layers.items():
        base = layer.get_base_layer()
        weight = base.weight.detach()
        delta = torch.zeros_like(weight, dtype=torch.float32)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta += layer.get_delta_weight(adapter).float()
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype).to(device)
    return state
