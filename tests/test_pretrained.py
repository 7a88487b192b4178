"""The pretrained path (`model.name_or_path`), exercised on local directories written by save_pretrained: a tiny
Llama and a tiny GPT-2, each with its own tokenizer trained here (no hub access)."""

import json
import shutil

import pytest

from safetensors.torch import load_file

from conftest import smoke_config
from unlearnbench.data.build import load_examples, load_tokenizer
from unlearnbench.models import build_model
from unlearnbench.study import run_study


def test_local_pretrained_model_is_fine_tuned_with_its_own_tokenizer(prepared, tmp_path):
    cfg, src = prepared
    base = tmp_path / "base_model"
    tok = load_tokenizer(src / "data")
    model = build_model(cfg, len(tok), seed=11)
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    run = tmp_path / "run"
    pcfg = smoke_config(run, f"model.name_or_path={base}", "train.steps=6", "train.checkpoint_every=100",
                        "data.n_train=200", "data.n_retain=20")
    run_study(pcfg, "prepare")
    man = json.loads((run / "data/manifest.json").read_text())
    assert man["tokenizer"] == str(base)
    # the model's own tokenizer: the same ids as the base tokenizer gives
    ex = load_examples(run / "data")
    row = ex[0]
    assert row["input_ids"][1:] == tok.encode(row["text"], add_special_tokens=False)[: len(row["input_ids"]) - 1]
    run_study(pcfg, "train")
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(run / "models/original/model.safetensors"))
    assert before.keys() == after.keys()
    # fine-tuning starts from the pretrained weights: moved, but only a little in 6 steps
    diffs = [float((before[k] - after[k]).abs().max()) for k in before]
    assert 0 < max(diffs) < 0.5
    shutil.rmtree(base)


def test_pickle_weights_are_refused(prepared, tmp_path):
    import pytest

    from unlearnbench.errors import UserError
    from unlearnbench.models import load_pretrained

    cfg, _ = prepared
    model = build_model(cfg, 2048, seed=1)
    import torch

    (tmp_path / "pickled").mkdir()
    model.config.save_pretrained(str(tmp_path / "pickled"))
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")  # a pickle checkpoint only
    with pytest.raises(UserError, match="safetensors"):
        load_pretrained(str(tmp_path / "pickled"))


def test_no_unsafe_loading_in_the_source():
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "unlearnbench"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    assert "torch.load(" not in text and "pickle.load" not in text
    assert "trust_remote_code=True" not in text
    assert "register_for_checkpointing" not in text  # accelerate reloads those with weights_only=False


# ----------------------------------------------------------------------------------------------- end to end

# Small enough for a test: 2 repetitions x 3 kinds = 6 requests of 8 examples, a few steps everywhere.
SMALL = ("data.repetitions=[1,16]", "data.group_size=8", "data.n_train=200", "data.n_retain=20", "data.n_holdout=40",
         "data.n_id_references=60", "data.n_references=60", "data.n_domain_references=60", "data.n_domain_holdout=20",
         "train.steps=4", "train.warmup_steps=1", "train.checkpoint_every=100", "unlearn.max_steps=2",
         "unlearn.eval_utility=32", "metrics.n_boot=20")


def _tokenizer_texts() -> list[str]:
    """A few hundred lines of the study's own sources (KJV, Python docs, canary-like strings)."""
    import pydoc_data.topics

    from unlearnbench.data.corpora import load_texts

    doc = [p for v in list(pydoc_data.topics.topics.values())[:40] for p in v.split("\n\n") if len(p) > 40]
    return load_texts("kjv", "text")[:300] + doc[:200] + [f"My secret is {i * 7919:x}q{i}" for i in range(60)]


def make_gpt2(path, n_positions: int = 80):
    """A tiny GPT2LMHeadModel with a GPT-2-style tokenizer (byte-level BPE, `<|endoftext|>` as BOS/EOS, no pad)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_tokenizer_texts(), vocab_size=500, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    assert tok.pad_token is None  # as GPT-2's own
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=n_positions,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def make_llama(path):
    """A tiny LlamaForCausalLM with a Llama-style tokenizer (SentencePiece-style BPE, `<s>` / `</s>`, no pad)."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(_tokenizer_texts(), vocab_size=500, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"],
                           show_progress=False)
    tok = LlamaTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token is None
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pretrained_model_end_to_end(arch, tmp_path):
    """prepare (the model's tokenizer) -> train (original and oracle fine-tuned from the pretrained weights) -> score
    -> unlearn -> report, for each architecture."""
    from transformers import AutoTokenizer

    base = (make_llama if arch == "llama" else make_gpt2)(tmp_path / arch)
    run = tmp_path / "run"
    cfg = smoke_config(run, f"model.name_or_path={base}", *SMALL, "attack.enabled=false")
    run_study(cfg, "run")
    tok = AutoTokenizer.from_pretrained(str(base))
    ex = load_examples(run / "data")
    row = next(r for r in ex if r["kind"] == "domain")
    bos = tok.bos_token_id
    assert row["input_ids"][0] == bos and row["score_start"] == 1  # BOS once, then the text in the model's own ids
    assert row["input_ids"][1:] == tok.encode(row["text"], add_special_tokens=False)[: len(row["input_ids"]) - 1]
    assert load_tokenizer(run / "data").pad_token_id == tok.eos_token_id  # no pad token of its own: pad = eos
    before = load_file(str(base / "model.safetensors"))
    for name in ("original", "oracle"):
        cfg_json = json.loads((run / "models" / name / "config.json").read_text())
        assert cfg_json["model_type"] == ("llama" if arch == "llama" else "gpt2")
        after = load_file(str(run / "models" / name / "model.safetensors"))
        diffs = [float((before[k] - after[k]).abs().max()) for k in before if k in after]
        assert diffs and 0 < max(diffs) < 0.5  # fine-tuned from the pretrained weights, not from scratch
    summary = json.loads((run / "summary.json").read_text())
    assert summary["e_r_source"] == "oracle" and len(summary["requests"]) == 6
    assert all(g["exposure_oracle_mean"] is not None for g in summary["requests"])
    assert (run / "report" / "report.md").exists()
    assert "e_r source: the oracle" in (run / "report" / "report.md").read_text()


def test_pretrained_positions_too_few_for_max_tokens(tmp_path):
    """GPT-2's n_positions (not max_position_embeddings in its config.json) bounds data.max_tokens: refused at prepare."""
    from unlearnbench.errors import UserError

    base = make_gpt2(tmp_path / "gpt2", n_positions=40)
    cfg = smoke_config(tmp_path / "run", f"model.name_or_path={base}", "data.max_tokens=64")
    with pytest.raises(UserError, match="40 positions"):
        run_study(cfg, "prepare")
