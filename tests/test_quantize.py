"""Weight-only quantized copies for the quantization-reload attack: real rounding, the original untouched,
rescoring close to the float model at 8 bits and less close at 4, clear errors for a missing backend."""

import sys
import types

import numpy as np
import pytest
import torch

from unlearnbench.distributed import make_accelerator
from unlearnbench.errors import UserError
from unlearnbench.quantize import available_backends, group_for, quantize_model
from unlearnbench.scoring import score_pass

VOCAB = 211


def tiny_llama(tied: bool = True):
    """Like the presets' Llama: tied output layer, an MLP width (172) that a group of 64 does not divide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                        tie_word_embeddings=tied, initializer_range=0.1, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0)).eval()


def tiny_data(n: int = 24) -> dict:
    rng = np.random.default_rng(2)
    ids = [[0] + rng.integers(1, VOCAB, size=int(rng.integers(8, 48))).tolist() for _ in range(n)]
    return {"example_id": list(range(n)), "input_ids": ids, "score_start": [1] * n, "score_end": [len(s) for s in ids]}


@pytest.fixture(scope="module")
def setup():
    model, data = tiny_llama(), tiny_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = make_accelerator()
    base, _ = score_pass(acc, model, data, batch_size=8)
    q8, q4 = quantize_model(model, 8), quantize_model(model, 4)
    s8, _ = score_pass(acc, q8, data, batch_size=8)
    s4, _ = score_pass(acc, q4, data, batch_size=8)
    return model, before, base, (q8, s8), (q4, s4)


def test_rescored_nll_close_at_8_bits_and_further_at_4(setup):
    """Measured on this model (random init, std 0.1, nll ~5.6 nats/token): relative nll change max 1.3e-3 (mean
    5.2e-4) at 8 bits, max 2.4e-2 (mean 8.1e-3) at 4 bits; the bounds leave room for other kernels."""
    _, _, base, (_, s8), (_, s4) = setup
    assert list(s8.example_id) == list(base.example_id) and (s8.n_tokens == base.n_tokens).all()
    rel8 = ((s8.nll - base.nll).abs() / base.nll).to_numpy()
    rel4 = ((s4.nll - base.nll).abs() / base.nll).to_numpy()
    assert rel8.max() < 5e-3
    assert rel8.max() > 1e-6  # the weights were really rounded
    assert rel4.max() < 1e-1
    assert rel4.mean() > 3 * rel8.mean()


def test_original_model_untouched(setup):
    model, before, _, (q8, _), (q4, _) = setup
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert type(after[k]) is torch.Tensor and torch.equal(after[k], v), k
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in model.parameters())
    assert all(p1 is not p2 for p1 in model.parameters() for p2 in q8.parameters())
    assert not q8.training and not q4.training


def test_weights_are_rounded_per_channel_and_per_group(setup):
    """Independent of torchao's conventions: every row of an 8-bit weight is an integer multiple of its own scale
    (<= 256 levels, error <= scale / 2); every 4-bit group has <= 16 levels within half a step of the weight."""
    model, _, _, (q8, _), (q4, _) = setup
    for name, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear) or name == "lm_head":
            continue
        w = layer.weight.detach().double()
        d8 = q8.get_submodule(name).weight.dequantize().double()
        scale = w.abs().amax(1, keepdim=True) / 127
        assert ((d8 - w).abs() <= scale / 2 + 1e-6).all(), name
        levels = d8 / d8.abs().amax(1, keepdim=True)  # the largest entry sits on level 127 or 128 of its row
        assert max(len(torch.unique(r)) for r in levels) <= 256
        d4 = q4.get_submodule(name).weight.dequantize().double()
        g = group_for(w.shape[1], 64)
        wg, dg = w.reshape(w.shape[0], -1, g), d4.reshape(w.shape[0], -1, g)
        step = (wg.amax(-1) - wg.amin(-1)) / 15
        assert ((dg - wg).abs() <= step[..., None] / 2 * 1.02 + 1e-6).all(), name
        assert max(len(torch.unique(r)) for r in dg.reshape(-1, g)) <= 16
        assert (d4 - w).abs().mean() > 4 * (d8 - w).abs().mean()


def test_output_layer_and_embeddings_stay_float_and_tied(setup):
    _, _, _, (q8, _), (q4, _) = setup
    for q in (q8, q4):
        assert type(q.lm_head.weight) is torch.nn.Parameter
        assert q.lm_head.weight is q.model.embed_tokens.weight  # the tie survives the copy
        assert type(q.model.layers[0].mlp.down_proj.weight) is not torch.nn.Parameter
        assert q.unlearnbench_quantization["backend"] == "torchao" and q.unlearnbench_quantization["layers"] == 14
    assert q4.unlearnbench_quantization["scheme"].endswith("groups 43 (2 layers), 64 (12 layers)")


def test_group_for():
    assert [group_for(w, 64) for w in (64, 128, 172, 344, 96, 100, 173)] == [64, 64, 43, 43, 48, 50, 173]
    assert group_for(344, 32) == 43  # the largest divisor <= 32 is 8, too small: the next one above


def test_gpt2_conv1d_layers_are_quantized():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2, n_positions=128,
                                       bos_token_id=0, eos_token_id=0)).eval()
    data = tiny_data(8)
    base, _ = score_pass(make_accelerator(), model, data, batch_size=8)
    q = quantize_model(model, 8)
    assert q.unlearnbench_quantization["layers"] == 4  # c_attn, c_proj, c_fc, mlp c_proj
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the original keeps its layers
    s, _ = score_pass(make_accelerator(), q, data, batch_size=8)
    np.testing.assert_allclose(s.nll, base.nll, rtol=2e-3)
    assert not np.allclose(s.nll, base.nll, rtol=1e-7, atol=0)


def test_bad_requests_are_user_errors():
    model = tiny_llama()
    with pytest.raises(UserError, match="3 bits"):
        quantize_model(model, 3)
    with pytest.raises(UserError, match="Unknown quantization backend 'gptq'"):
        quantize_model(model, 8, backend="gptq")
    with pytest.raises(UserError, match="group size"):
        quantize_model(model, 4, group_size=0)


def test_missing_torchao_is_a_user_error(monkeypatch):
    model = tiny_llama()
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` now raises ImportError
    reason = available_backends()["torchao"]
    assert reason is not None and "pip install" in reason and "torchao" in reason
    for backend in ("torchao", "auto"):
        with pytest.raises(UserError, match="Cannot quantize with torchao") as err:
            quantize_model(model, 8, backend=backend)
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_bitsandbytes_missing_or_without_cuda_is_a_user_error(monkeypatch):
    model = tiny_llama()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert "pip install bitsandbytes" in available_backends()["bitsandbytes"]
    with pytest.raises(UserError, match="bitsandbytes does not import"):
        quantize_model(model, 4, backend="bitsandbytes")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))  # importable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in available_backends()["bitsandbytes"]
    with pytest.raises(UserError, match="torchao"):
        quantize_model(model, 8, backend="bitsandbytes")
    assert quantize_model(model, 8).unlearnbench_quantization["backend"] == "torchao"  # auto on CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes is used on CUDA only")
def test_bitsandbytes_on_cuda():
    pytest.importorskip("bitsandbytes")
    model, data = tiny_llama().cuda(), tiny_data()
    acc = make_accelerator()
    base, _ = score_pass(acc, model, data, batch_size=8)
    for bits, rtol in ((8, 2e-2), (4, 1e-1)):
        q = quantize_model(model, bits)
        assert q.unlearnbench_quantization["backend"] == "bitsandbytes"
        s, _ = score_pass(acc, q, data, batch_size=8)
        np.testing.assert_allclose(s.nll, base.nll, rtol=rtol)
