"""Models: a tiny Llama or GPT-2 from config, or any causal LM by name; safetensors only."""

from __future__ import annotations

from pathlib import Path

import torch

from unlearnbench.config import Config
from unlearnbench.data.build import BOS_ID, PAD_ID
from unlearnbench.errors import UserError
from unlearnbench.io import atomic_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(cfg: Config, vocab_size: int, seed: int, bos_id: int = BOS_ID, pad_id: int = PAD_ID):
    """A randomly initialised model from config, or the pretrained `model.name_or_path`. `bos_id` / `pad_id` are the
    tokenizer's (the defaults are the built-in tokenizer's): the padding id is the embedding's `padding_idx` (its
    row stays zero and untrained), so it must not be the BOS id, whose embedding every example's first prediction
    reads (docs/definitions.md §1)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    m = cfg.model
    if m.name_or_path:
        return load_pretrained(m.name_or_path, m.dtype, m.trust_remote_code, vocab_size)
    if bos_id == pad_id:
        raise ValueError(f"BOS and padding share id {bos_id}: BOS's embedding would never be trained")
    torch.manual_seed(seed)
    if m.arch == "llama":
        mc = LlamaConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads,
                         max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=m.tie_embeddings,
                         bos_token_id=bos_id, eos_token_id=bos_id, pad_token_id=pad_id, attention_dropout=0.0)
        model = LlamaForCausalLM(mc)
    else:
        mc = GPT2Config(vocab_size=vocab_size, n_embd=m.hidden_size, n_layer=m.n_layers, n_head=m.n_heads,
                        n_inner=m.intermediate_size, n_positions=m.max_position_embeddings, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=m.tie_embeddings,
                        bos_token_id=bos_id, eos_token_id=bos_id, pad_token_id=pad_id)
        model = GPT2LMHeadModel(mc)
    return model.to(DTYPES[m.dtype])


def load_pretrained(path: str, dtype: str = "float32", trust_remote_code: bool = False, vocab_size: int | None = None):
    """Load a causal LM from a local directory or hub name, safetensors weights only."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load, hundreds of loads per study
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(f"Could not load a causal LM from '{path}': {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. Give a directory written by "
                        "save_pretrained (safetensors) or a hub name reachable from here.") from None
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        raise UserError(f"The model at '{path}' has {model.get_input_embeddings().num_embeddings} embeddings but the "
                        f"tokenizer has {vocab_size} tokens: they do not belong together. Use the model's own "
                        "tokenizer (rerun prepare with this model.name_or_path).")
    return model


def n_params(model) -> int:
    """Number of parameters (shared ones once)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())


def model_dir(run_dir: Path, name: str) -> Path:
    """Where a trained model lives in a run directory."""
    return Path(run_dir) / "models" / name


def load_trained(run_dir: Path, name: str, dtype: str = "float32"):
    """A model saved by the train stage, its files checked against the train stage's record first (a truncated or
    altered file is reported by name and recomputed by the next `unlearnbench train` / `run`)."""
    from unlearnbench.records import verify_input

    path = model_dir(run_dir, name)
    if not (path / "config.json").exists():
        raise UserError(f"No trained model '{name}' at {path}. Run `unlearnbench train` (or `run`) first.")
    verify_input(path, run_dir)
    return load_pretrained(str(path), dtype)


def save_model(acc, model, tokenizer, path: Path) -> None:
    """Save a (possibly wrapped or sharded) model with its tokenizer as safetensors, atomically; every rank calls it
    (ZeRO-3 and FSDP gather the shards), the main process writes. A model with LoRA adapters (DDP, ZeRO-1/2) is
    saved merged, as a plain transformers model."""
    from unlearnbench.unlearn.lora import has_adapters, merged_state_dict

    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    lora = has_adapters(unwrapped)
    state = None if lora else acc.get_state_dict(model)
    if acc.is_main_process:
        state = merged_state_dict(unwrapped) if lora else state
        with atomic_dir(path) as tmp:
            unwrapped.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    acc.wait_for_everyone()


def save_local_model(model, tokenizer, path: Path) -> None:
    """Save a model this process owns alone (job-parallel training or unlearning) with its tokenizer,
    atomically, on any rank. transformers >= 5 `save_pretrained` writes weights and config only on torch.distributed
    rank 0 (`should_save_on_this_rank`) and silently skips the others; this process owns its model, so it answers yes
    for this one call. The files must be there afterwards. A model with LoRA adapters is saved merged (base +
    adapters under the plain layer names), as a plain transformers model."""
    from unlearnbench.unlearn.lora import merged_state_dict

    state = merged_state_dict(model)  # None without adapters: the model's own state dict
    model.should_save_on_this_rank = lambda is_main_process=True: True  # an instance attribute shadows the method
    try:
        with atomic_dir(path) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
            tokenizer.save_pretrained(str(tmp))
    finally:
        del model.should_save_on_this_rank
    if not (Path(path) / "config.json").exists() or not any(Path(path).glob("model*.safetensors")):
        raise RuntimeError(f"Saving {path} wrote no weights or config (transformers skipped this rank).")
