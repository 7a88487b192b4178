"""Membership-inference scores (metrics.mia) and the per-token scoring pass behind them (token_score_pass)."""

import os
import pickle
import subprocess
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PY, ROOT, free_port
from unlearnbench.distributed import make_accelerator
from unlearnbench.metrics.mia import (auc, loss_score, min_k, min_k_count, min_k_plus_plus, priv_leak,
                                      standardized_logprobs, zlib_ratio, zlib_score)
from unlearnbench.scoring import TOKEN_COLUMNS, score_pass, token_score_pass

VOCAB = 131


# ---------------------------------------------------------------- the attacks, against hand-computed values


def test_loss_score_is_negated_nll():
    np.testing.assert_array_equal(loss_score([1.0, 2.5, 0.0]), [-1.0, -2.5, -0.0])


def test_zlib_ratio_divides_by_compressed_utf8_bytes():
    texts = ["a" * 200, "The quick brown fox jumps over the lazy dog.", "Grüße aus Köln, ça va? ✓"]
    nll_sum = [10.0, 20.0, 30.0]
    sizes = [len(zlib.compress(t.encode("utf-8"))) for t in texts]
    assert sizes[0] < sizes[1]  # repetitive text compresses: same loss, larger ratio
    assert sizes[2] > len(zlib.compress(texts[2].encode("ascii", "ignore")))  # bytes, not characters
    expected = np.array(nll_sum) / np.array(sizes)
    np.testing.assert_allclose(zlib_ratio(nll_sum, texts), expected, rtol=1e-15)
    np.testing.assert_allclose(zlib_score(nll_sum, texts), -expected, rtol=1e-15)
    with pytest.raises(ValueError):
        zlib_ratio([1.0, 2.0], ["one text"])


def test_min_k_hand_values():
    lp = [np.array([-1.0, -5.0, -2.0, -8.0]), np.array([-0.5, -3.0]), np.array([-4.0]), np.array([])]
    out = min_k(lp, 0.5)
    np.testing.assert_allclose(out[:3], [-6.5, -3.0, -4.0])  # mean(-8, -5); the lowest of 2; the only one
    assert np.isnan(out[3])  # no scored tokens
    np.testing.assert_allclose(min_k(lp[:1], 0.2), [-8.0])  # floor(0.8) = 0 tokens, at least 1
    np.testing.assert_allclose(min_k(lp[:1], 0.75), [-5.0])  # mean(-8, -5, -2)
    np.testing.assert_allclose(min_k(lp[:1], 1.0), [-4.0])  # all of them: the mean log-prob
    assert [min_k_count(n, 0.3) for n in (0, 1, 3, 10, 11)] == [0, 1, 1, 3, 3]  # 10 * 0.3 is 3.0000000000000004
    for bad in (0.0, 20, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            min_k(lp, bad)


def test_min_k_plus_plus_hand_values():
    lp = [np.array([-1.0, -5.0, -2.0, -8.0])]
    mu = [np.array([-1.0, -3.0, -1.0, -4.0])]
    sigma = [np.array([1.0, 2.0, 0.5, 2.0])]
    # z = (0, -1, -2, -2): the two lowest are tokens 2 and 3, where Min-K% picks tokens 3 and 1
    np.testing.assert_allclose(min_k_plus_plus(lp, mu, sigma, 0.5), [-2.0])
    np.testing.assert_allclose(min_k_plus_plus(lp, mu, sigma, 0.25), [-2.0])
    np.testing.assert_allclose(min_k_plus_plus(lp, mu, sigma, 1.0), [-1.25])
    # flat distributions (sigma = 0 up to rounding): z = 0 at the mean log-prob, else -inf / +inf
    np.testing.assert_array_equal(standardized_logprobs([-2.0, -2.0 + 1e-7, -5.0, 0.0, -1.0],
                                                        [-2.0, -2.0, 0.0, -1.0, -2.0], [0.0, 1e-7, 0.0, 0.0, 0.5]),
                                  [0.0, 0.0, -np.inf, np.inf, 2.0])
    np.testing.assert_allclose(min_k_plus_plus([[-3.0, -3.0 + 2e-7, -1.0]], [[-3.0] * 3], [[4e-7, 0.0, 1.0]], 1.0),
                               [2.0 / 3.0])
    with pytest.raises(ValueError, match="example 0"):
        min_k_plus_plus(lp, [mu[0][:3]], sigma, 0.5)
    with pytest.raises(ValueError):
        min_k_plus_plus(lp, mu + mu, sigma, 0.5)


def test_auc_hand_values():
    assert auc([3, 2], [1, 2]) == 0.875  # pairs: 3>1, 3>2, 2>1, 2=2 (1/2): 3.5 / 4
    assert auc([5, 6], [1, 2, 3]) == 1.0
    assert auc([1, 2, 3], [5, 6]) == 0.0
    assert auc([4, 4], [4, 4, 4]) == 0.5
    assert auc([-np.inf, 0.0], [1.0]) == 0.0  # infinite scores rank like any other
    with pytest.raises(ValueError):
        auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auc([np.nan, 1.0], [1.0])


def test_auc_matches_brute_force_pairwise_count():
    rng = np.random.default_rng(0)
    for n1, n0 in [(50, 37), (1, 9), (200, 3)]:
        m = rng.integers(0, 12, n1).astype(float)  # many ties
        n = rng.integers(0, 10, n0).astype(float)
        diff = m[:, None] - n[None, :]
        brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (n1 * n0)
        assert auc(m, n) == pytest.approx(brute, abs=1e-12)


def test_priv_leak():
    assert priv_leak(0.6, 0.5) == pytest.approx(0.2)
    assert priv_leak(0.5, 0.5) == 0.0
    np.testing.assert_allclose(priv_leak([0.25, 0.75], [0.5, 0.5]), [-0.5, 0.5])


# ---------------------------------------------------------------- token_score_pass on a tiny random Llama


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def tiny_data(n: int = 23, seed: int = 0) -> dict:
    """Mixed lengths; whole-text spans (start 1), canary-like suffix spans, one span starting at 0 (position 0 is
    never predicted) and one example with nothing scored."""
    rng = np.random.default_rng(seed)
    ids = [[0] + rng.integers(1, VOCAB, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]
    starts = [1 if i % 3 == 0 else max(1, len(s) - int(rng.integers(1, 6))) for i, s in enumerate(ids)]
    ends = [len(s) for s in ids]
    starts[1] = 0
    starts[2] = ends[2]  # empty span
    return {"example_id": [1000 + 7 * i for i in range(n)], "input_ids": ids, "score_start": starts,
            "score_end": ends}


def direct(model, data: dict) -> pd.DataFrame:
    """Each example alone through `model(input_ids)`; log p, mu and sigma from the full logits in float64."""
    rows = []
    with torch.no_grad():
        for eid, ids, a, b in zip(data["example_id"], data["input_ids"], data["score_start"], data["score_end"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            pos = torch.arange(max(a, 1), b)  # token t is predicted at position t - 1
            p = torch.softmax(logits[pos - 1], -1)
            logp = torch.log(p)
            mu = (p * logp).sum(-1)
            sigma = (p * (logp - mu[:, None]) ** 2).sum(-1).sqrt()
            tok = logp[torch.arange(len(pos)), torch.tensor(ids)[pos]]
            rows.append({"example_id": eid, "nll_sum": float(-tok.sum()), "n_tokens": len(pos),
                         "token_logp": tok.numpy(), "token_mu": mu.numpy(), "token_sigma": sigma.numpy()})
    return pd.DataFrame(rows).sort_values("example_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def setup():
    model, data = tiny_llama(), tiny_data()
    acc = make_accelerator()
    return model, data, token_score_pass(acc, model, data, batch_size=4)


def test_token_pass_matches_per_example_forward(setup):
    model, data, df = setup
    ref = direct(model, data)
    assert list(df.example_id) == sorted(data["example_id"])
    assert list(df.columns) == ["example_id", "nll_sum", "n_tokens", "nll", *TOKEN_COLUMNS]
    assert (df.n_tokens.to_numpy() == ref.n_tokens.to_numpy()).all() and df.n_tokens.min() == 0
    np.testing.assert_allclose(df.nll_sum, ref.nll_sum, rtol=1e-5, atol=1e-5)
    for col in TOKEN_COLUMNS:
        for got, want, n in zip(df[col], ref[col], df.n_tokens):
            assert got.dtype == np.float32 and got.shape == (n,)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=col)
    # the sum of the per-token log-probs is the example's loss
    np.testing.assert_allclose([-t.sum() for t in df.token_logp], df.nll_sum, rtol=1e-5, atol=1e-5)


def test_token_pass_losses_equal_score_pass(setup):
    model, data, df = setup
    scores, _ = score_pass(make_accelerator(), model, data, batch_size=4)
    np.testing.assert_allclose(df.nll_sum, scores.nll_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(df.nll, scores.nll, rtol=1e-5, atol=1e-6)
    assert (df.n_tokens.to_numpy() == scores.n_tokens.to_numpy()).all()


def test_token_pass_full_forward_and_small_chunks_agree(setup, monkeypatch):
    """The output layer on scored positions only (fast path) and the model's own forward give the same
    numbers; so does computing mu and sigma a few positions at a time."""
    import unlearnbench.scoring as scoring

    model, data, fast = setup
    monkeypatch.setattr(scoring, "split_head", lambda *a, **k: None)
    stats = scoring._token_stats
    monkeypatch.setattr(scoring, "_token_stats", lambda logits, wanted: stats(logits, wanted, chunk_elems=3 * VOCAB))
    full = token_score_pass(make_accelerator(), model, data, batch_size=5)
    np.testing.assert_allclose(full.nll_sum, fast.nll_sum, rtol=1e-5, atol=1e-6)
    for col in TOKEN_COLUMNS:
        np.testing.assert_allclose(np.concatenate(full[col]), np.concatenate(fast[col]), rtol=1e-5, atol=1e-6)


def test_min_k_plus_plus_from_the_pass_matches_softmax_recomputation(setup):
    """Min-K%++ of one example from the pass's columns against z-scores recomputed with torch.softmax in float64.
    Its first scored position follows BOS = pad = 0, whose embedding is zero (padding_idx): the model predicts a
    uniform distribution there, sigma = 0 and z is defined as 0."""
    model, data, df = setup
    whole = [k for k, a in enumerate(data["score_start"]) if a == 1]
    k = max(whole, key=lambda j: data["score_end"][j])
    row = df.set_index("example_id").loc[data["example_id"][k]]
    ids, a, b = data["input_ids"][k], 1, data["score_end"][k]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, a - 1:b - 1].double()
    p = torch.softmax(logits, -1)
    mu = (p * p.log()).sum(-1)
    sigma = ((p * p.log() ** 2).sum(-1) - mu ** 2).clamp(min=0).sqrt()  # the other form of the variance
    lp = p[torch.arange(b - a), torch.tensor(ids[a:b])].log()
    flat = sigma < 1e-6
    assert flat[0] and not flat[1:].any() and float(logits[0].std()) == 0.0
    z = torch.where(flat, 0.0, (lp - mu) / sigma).numpy()
    assert float(row.token_sigma[0]) < 1e-5 and row.token_sigma[0] != 0  # float32 rounding, not exactly 0
    for kk in (0.2, 0.5, 1.0):
        m = max(1, int(len(z) * kk + 1e-9))
        want = np.sort(z)[:m].mean()
        got = min_k_plus_plus([row.token_logp], [row.token_mu], [row.token_sigma], kk)[0]
        assert got == pytest.approx(want, rel=1e-4, abs=5e-5), kk  # float32 z: per-token error up to ~2e-5
        assert min_k([row.token_logp], kk)[0] == pytest.approx(np.sort(lp.numpy())[:m].mean(), rel=1e-5)


def test_token_pass_local_restores_training_mode(setup):
    model, data, df = setup
    model.train()
    try:
        local = token_score_pass(make_accelerator(), model, data, batch_size=64, local=True)
        assert model.training
    finally:
        model.eval()
    np.testing.assert_allclose(local.nll_sum, df.nll_sum, rtol=1e-5, atol=1e-6)


MP_SCRIPT = """
import pickle, sys
from transformers import AutoModelForCausalLM
from unlearnbench.distributed import make_accelerator
from unlearnbench.scoring import token_score_pass

model_dir, data_file, out = sys.argv[1:4]
acc = make_accelerator()
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
df = token_score_pass(acc, model, pickle.load(open(data_file, "rb")), batch_size=5)
if acc.is_main_process:
    df["world"] = acc.num_processes
    pickle.dump(df, open(out, "wb"))
"""


def test_token_pass_two_processes_match_one(setup, tmp_path):
    """Ragged per-token arrays padded across processes and gathered: equal to one process, every example once.
    23 examples in 5 batches of 5 (the last of 3) over 2 processes: every round pads the smaller batch's rows and
    widths, and the last round gives the second process a dummy batch whose rows are dropped."""
    model, data, _ = setup
    one = token_score_pass(make_accelerator(), model, data, batch_size=5)
    model.save_pretrained(str(tmp_path / "model"))
    (tmp_path / "data.pkl").write_bytes(pickle.dumps(data))
    (tmp_path / "mp.py").write_text(textwrap.dedent(MP_SCRIPT))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs/cpu_ddp.yaml"), "--main_process_port", str(free_port()),
           str(tmp_path / "mp.py"), str(tmp_path / "model"),
           str(tmp_path / "data.pkl"), str(tmp_path / "two.pkl")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = pickle.loads((tmp_path / "two.pkl").read_bytes())
    assert (two.world == 2).all() and two.example_id.is_unique
    assert list(two.example_id) == list(one.example_id)
    assert (two.n_tokens.to_numpy() == one.n_tokens.to_numpy()).all()
    np.testing.assert_allclose(two.nll_sum, one.nll_sum, rtol=1e-5, atol=1e-6)
    for col in TOKEN_COLUMNS:
        for a, b in zip(two[col], one[col]):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
