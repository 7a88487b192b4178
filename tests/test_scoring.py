"""The sharded scoring pass: every example once, equal across process counts, equal to a naive computation."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PY, ROOT, free_port
from unlearnbench.batching import length_batches
from unlearnbench.data.build import load_examples
from unlearnbench.distributed import make_accelerator
from unlearnbench.errors import UserError
from unlearnbench.models import build_model
from unlearnbench.scoring import auto_batch_tokens, score_pass

N = 103  # not divisible by 2 processes x batch 8


@pytest.fixture(scope="module")
def scoring_setup(prepared, tmp_path_factory):
    cfg, run_dir = prepared
    ds = load_examples(run_dir / "data")
    # a mix of kinds and lengths: canaries (secret span only), ID and domain passages
    idx = [i for i, s in enumerate(ds["split"]) if s in ("forget", "reference")]
    rng = np.random.default_rng(0)
    subset = ds.select(sorted(rng.choice(idx, size=N, replace=False).tolist()))
    tmp = tmp_path_factory.mktemp("scoring")
    subset.save_to_disk(str(tmp / "subset"))
    model = build_model(cfg, 2048, seed=3)
    model.save_pretrained(str(tmp / "model"))
    return model.eval(), subset, tmp


def naive_scores(model, subset) -> pd.DataFrame:
    """Each example alone through `model(input_ids, labels=...)`: the HF loss is the mean NLL of the labels."""
    rows = []
    with torch.no_grad():
        for ex in subset:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.full_like(ids, -100)
            labels[0, ex["score_start"]:ex["score_end"]] = ids[0, ex["score_start"]:ex["score_end"]]
            out = model(input_ids=ids, labels=labels)
            n = ex["score_end"] - max(ex["score_start"], 1)
            rows.append({"example_id": ex["example_id"], "nll": float(out.loss), "n_tokens": n,
                         "nll_sum": float(out.loss) * n})
    return pd.DataFrame(rows).sort_values("example_id").reset_index(drop=True)


def test_pass_matches_independent_per_example_computation(scoring_setup):
    model, subset, _ = scoring_setup
    acc = make_accelerator()
    df, stats = score_pass(acc, model, subset, batch_size=8)
    ref = naive_scores(model, subset)
    assert list(df.example_id) == sorted(subset["example_id"])
    assert (df.n_tokens.to_numpy() == ref.n_tokens.to_numpy()).all()
    np.testing.assert_allclose(df.nll.to_numpy(), ref.nll.to_numpy(), rtol=1e-5, atol=1e-5)
    assert 0 <= stats.padding_fraction < 0.2  # length bucketing keeps padding low


def test_scored_span_is_honoured(scoring_setup):
    model, subset, _ = scoring_setup
    acc = make_accelerator()
    df, _ = score_pass(acc, model, subset, batch_size=8)
    spans = {e: b - a for e, a, b in zip(subset["example_id"], subset["score_start"], subset["score_end"])}
    assert all(df.n_tokens.to_numpy() == [spans[e] for e in df.example_id])
    # widening a canary's span to the prefix changes its score; the prefix tokens were not counted before
    canary = [i for i, k in enumerate(subset["kind"]) if k == "canary"][0]
    wide = subset.select([canary]).map(lambda r: {"score_start": 1})
    w, _ = score_pass(acc, model, wide, batch_size=8)
    narrow = df.set_index("example_id").loc[subset[canary]["example_id"]]
    assert w.n_tokens[0] > narrow.n_tokens and abs(w.nll_sum[0] - narrow.nll_sum) > 1e-3


def _odd_budget(lengths: list[int]) -> int:
    """A token budget that cuts these examples into an odd number of batches of at least three sizes."""
    for t in range(64, 1025, 4):
        sizes = [len(b) for b in length_batches(lengths, 8, t)]
        if len(sizes) % 2 == 1 and len(set(sizes)) > 2:
            return t
    raise AssertionError("no such budget")


@pytest.mark.parametrize("budget", [False, True])
def test_two_processes_match_one(scoring_setup, budget):
    """Every process makes the same batches and takes every other one. 103 examples in batches of 8 (13 batches), or
    under a token budget that gives an odd number of batches of varying size: the process one batch short runs a
    dummy batch whose rows are dropped."""
    model, subset, tmp = scoring_setup
    acc = make_accelerator()
    tokens = _odd_budget([len(x) for x in subset["input_ids"]]) if budget else None
    one, stats = score_pass(acc, model, subset, batch_size=8, batch_tokens=tokens)
    out = tmp / "two.parquet"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs/cpu_ddp.yaml"),
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "mp_score.py"), str(tmp / "model"),
           str(tmp / "subset"), str(out), "8", *([str(tokens)] if tokens else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = pd.read_parquet(out)
    assert (two.world == 2).all() and (two.slots == stats.slots).all()  # the same batches, no dummy counted
    assert list(two.example_id) == list(one.example_id) and two.example_id.is_unique and len(two) == N
    np.testing.assert_allclose(two.nll_sum.to_numpy(), one.nll_sum.to_numpy(), rtol=1e-5)
    assert (two.n_tokens.to_numpy() == one.n_tokens.to_numpy()).all()
    assert (two.n_correct.to_numpy() == one.n_correct.to_numpy()).all()


def test_length_batches_by_hand():
    lengths = [5, 3, 8, 3, 10]  # in length order (ties by index): 1, 3, 0, 2, 4
    assert length_batches(lengths, 2, 16) == [[1, 3], [0, 2], [4]]  # 2 x 8 = 16 fits; the row cap cuts
    assert length_batches(lengths, 2, 15) == [[1, 3], [0], [2], [4]]  # 2 x 8 = 16 does not fit 15
    assert length_batches(lengths, 10, 0) == [[1, 3, 0, 2, 4]]  # no token cap
    assert length_batches(lengths, 10, 12) == [[1, 3], [0], [2], [4]]  # 3 x 5 = 15 > 12; then 2 x 8, 2 x 10 > 12
    assert length_batches([20, 2], 4, 8) == [[1], [0]]  # longer than the budget: a batch of its own
    assert length_batches([], 4, 8) == []


def test_batches_are_dealt_round_robin_with_a_dummy_for_the_process_one_short():
    from types import SimpleNamespace

    from unlearnbench.scoring import _my_batches

    batches = [[0, 1], [2], [3, 4, 5], [6], [7]]
    acc = lambda rank: SimpleNamespace(num_processes=2, process_index=rank)  # noqa: E731
    assert _my_batches(batches, acc(0), local=False) == [([0, 1], True), ([3, 4, 5], True), ([7], True)]
    assert _my_batches(batches, acc(1), local=False) == [([2], True), ([6], True), ([0, 1], False)]
    assert _my_batches(batches, acc(1), local=True) == [(b, True) for b in batches]  # job-parallel: all its own
    three = [_my_batches(batches[:4], SimpleNamespace(num_processes=3, process_index=r), False) for r in range(3)]
    assert [len(m) for m in three] == [2, 2, 2] and three[0] == [([0, 1], True), ([6], True)]
    assert three[1][1] == three[2][1] == ([0, 1], False)


def test_token_budget_changes_batches_not_scores(scoring_setup):
    model, subset, _ = scoring_setup
    acc = make_accelerator()
    base, s0 = score_pass(acc, model, subset, batch_size=64, batch_tokens=0)
    small, s1 = score_pass(acc, model, subset, batch_size=64, batch_tokens=256)
    np.testing.assert_allclose(small.nll_sum.to_numpy(), base.nll_sum.to_numpy(), rtol=1e-5, atol=1e-6)
    assert (small.n_correct.to_numpy() == base.n_correct.to_numpy()).all()
    lengths = [len(x) for x in subset["input_ids"]]
    batches = length_batches(lengths, 64, 256)
    assert all(len(b) * max(lengths[i] for i in b) <= 256 or len(b) == 1 for b in batches)
    assert s1.slots == sum(len(b) * max(lengths[i] for i in b) for b in batches) < s0.slots  # less padding too
    # the automatic budget: 2^22 logits on a CPU over the vocabulary (this model's: 2,048)
    assert auto_batch_tokens(acc, model) == 2 ** 22 // 2048 == 2048


def test_bad_inputs(scoring_setup):
    model, subset, _ = scoring_setup
    acc = make_accelerator()
    with pytest.raises(UserError, match="score_start"):
        score_pass(acc, model, subset.remove_columns(["score_start"]))
    with pytest.raises(UserError, match="empty"):
        score_pass(acc, model, subset.select([]))
    big = subset.select([0]).map(lambda r: {"input_ids": r["input_ids"] + [5000]})
    with pytest.raises(UserError, match="vocabulary"):
        score_pass(acc, model, big, vocab_size=2048)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_layer_on_scored_positions_only_matches_full_logits(scoring_setup, arch, monkeypatch):
    """The fast path (body, then lm_head on the scored positions) gives the full forward's numbers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import unlearnbench.scoring as scoring

    llama, subset, _ = scoring_setup
    model = llama if arch == "llama" else GPT2LMHeadModel(GPT2Config(
        vocab_size=2048, n_embd=64, n_layer=2, n_head=2, n_positions=256, bos_token_id=0, eos_token_id=0)).eval()
    acc = make_accelerator()
    assert scoring.split_head(acc, model, local=False) is not None
    fast, _ = score_pass(acc, model, subset, batch_size=8)
    monkeypatch.setattr(scoring, "split_head", lambda *a, **k: None)
    full, _ = score_pass(acc, model, subset, batch_size=8)
    np.testing.assert_allclose(fast.nll_sum.to_numpy(), full.nll_sum.to_numpy(), rtol=1e-5)
    assert (fast.n_tokens.to_numpy() == full.n_tokens.to_numpy()).all()
    assert (fast.n_correct.to_numpy() == full.n_correct.to_numpy()).all()


def test_ddp_wrapped_model_projects_only_the_scored_positions(scoring_setup):
    """Data-parallel unlearning: a DDP-wrapped model runs its own forward (DDP's gradient bookkeeping), with the
    output layer patched for that call to project the scored positions only; log-probs and gradients are the full
    logits' (a 1-process gloo group), and the output layer is itself again afterwards."""
    import copy
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate.utils import DistributedType

    from unlearnbench.batching import collate, token_logprobs
    from unlearnbench.scoring import scored_logprobs, split_head

    model, subset, _ = scoring_setup
    rows = subset.select(range(12))
    batch = collate(rows["input_ids"], rows["score_start"], rows["score_end"], 0)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        fast_model, full_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
        ddp = torch.nn.parallel.DistributedDataParallel(fast_model)
        head = split_head(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), ddp, local=False)
        assert head == (None, fast_model.lm_head)
        shapes = []
        hook = fast_model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
        logp, mask = scored_logprobs(ddp, batch, head)
        hook.remove()
        assert shapes == [(int(mask.sum()), model.config.vocab_size)] and int(mask.sum()) < mask.numel()
        assert "forward" not in fast_model.lm_head.__dict__  # the class's forward again
        ref, ref_mask = token_logprobs(full_model(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).logits, batch["labels"])
        torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(mask, ref_mask)
        (logp * mask).sum().backward()
        (ref * ref_mask).sum().backward()
        for (name, a), (_, b) in zip(fast_model.named_parameters(), full_model.named_parameters()):
            # float32 sums in another order: an entry may differ by 1e-4 of the tensor's largest gradient
            # (measured: 1.3e-6 on one of 131,072 embedding entries); a missing or extra position moves entries
            # by their own size
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * float(b.grad.abs().max()),
                                       msg=lambda m, name=name: f"{name}: {m}")
    finally:
        if started:
            dist.destroy_process_group()


def test_wrapped_or_scaled_models_take_the_full_forward():
    import unlearnbench.scoring as scoring
    from transformers import LlamaConfig, LlamaForCausalLM

    acc = make_accelerator()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    assert scoring.split_head(acc, torch.nn.Sequential(model), local=False) is None  # a wrapper
    model.config.final_logit_softcapping = 30.0
    assert scoring.split_head(acc, model, local=False) is None


def test_scored_logprobs_match_full_logits_in_value_and_gradient(scoring_setup):
    """The unlearning step's forget log-probs through the fast path: the values and parameter gradients of
    `token_logprobs` over the full logits."""
    import copy

    from unlearnbench.batching import collate, token_logprobs
    from unlearnbench.scoring import scored_logprobs, split_head

    model, subset, _ = scoring_setup
    rows = subset.select(range(12))  # canaries (secret only) and passages of mixed lengths: padding and prefixes
    batch = collate(rows["input_ids"], rows["score_start"], rows["score_end"], 0)
    fast_model, full_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    head = split_head(make_accelerator(), fast_model, False)
    assert head is not None
    logp, mask = scored_logprobs(fast_model, batch, head)
    ref, ref_mask = token_logprobs(full_model(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits, batch["labels"])
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ref_mask) and int(mask.sum()) < mask.numel()  # some positions were skipped
    (logp * mask).sum().backward()
    (ref * ref_mask).sum().backward()
    for (name, a), (_, b) in zip(fast_model.named_parameters(), full_model.named_parameters()):
        # float32 sums in another order: an entry may differ by 1e-4 of the tensor's largest gradient
        # (measured: 1.3e-6 on one of 131,072 embedding entries); a missing or extra position moves entries
        # by their own size
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * float(b.grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
