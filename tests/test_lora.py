"""LoRA unlearning (`unlearn.lora.rank` > 0, peft): only the adapters train, θ₀'s weights stay as they were, the
saved model is merged and loads with plain transformers, and its scores are the adapted model's.

Fast tests drive `setup` / `step` directly on the smoke study's θ₀; the slow ones run the unlearn stage with LoRA
under 2-process DDP and DeepSpeed ZeRO-2 on CPU and compare with one process, as tests/test_backends.py does for
full unlearning.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, assert_same_curve, launch, smoke_config
from unlearnbench.errors import UserError

LORA = ["unlearn.lora.rank=8", "unlearn.lr=1e-2"]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _request(run, cfg, kind="canary", reps=16):
    from unlearnbench.data.build import load_examples
    from unlearnbench.unlearn.request import Request, RequestData

    ex = load_examples(run / "data")
    columns = ex.select_columns(["example_id", "input_ids", "score_start", "score_end", "split"]).to_dict()
    forget_scores = pd.read_parquet(run / "scores/forget.parquet")
    ids = sorted(forget_scores[(forget_scores.kind == kind) & (forget_scores.repetitions == reps)].example_id)
    return RequestData.build(cfg, Request("r", ids, kind, reps), columns, 0), ids, ex


def _unlearner(run, *overrides, load_reference=None):
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.models import load_trained
    from unlearnbench.unlearn.request import Worker, setup

    cfg = smoke_config(run, *overrides)
    data, ids, ex = _request(run, cfg)
    u = setup(cfg, Worker(make_accelerator(), True), load_trained(run, "original"), data, load_reference)
    return u, data, ids, ex


def _forget_loglik(model, data) -> float:
    """Mean log-likelihood per scored token of the request's forget examples."""
    from unlearnbench.scoring import scored_logprobs

    batch = data.batch(data.forget_rows, "cpu")
    with torch.no_grad():
        logp, mask = scored_logprobs(model, batch, None)
    return float(logp.sum() / mask.sum())


def _is_adapter(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _plain_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _theta0(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "models/original/model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("override, words", [
    ("unlearn.lora.rank=-1", "unlearn.lora.rank must be >= 0"),
    ("unlearn.lora.alpha=0", "unlearn.lora.alpha must be a positive"),
    ("unlearn.lora.dropout=1.0", "unlearn.lora.dropout must lie in [0, 1)"),
    ("unlearn.lora.target_modules=[]", "must name the modules"),
    ("unlearn.lora.target_modules=[all-linear,q_proj]", "give it alone"),
])
def test_lora_config_is_validated(override, words, tmp_path):
    extra = [] if "rank" in override else ["unlearn.lora.rank=4"]
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        smoke_config(tmp_path, *extra, override)
    smoke_config(tmp_path, "unlearn.lora.alpha=0")  # keys of a LoRA that is off are not checked


def test_lora_config_changes_the_unlearn_fingerprint(tmp_path):
    from unlearnbench.records import stage_fingerprint

    off, on = smoke_config(tmp_path), smoke_config(tmp_path, "unlearn.lora.rank=8")
    alpha = smoke_config(tmp_path, "unlearn.lora.rank=8", "unlearn.lora.alpha=32")
    assert off.unlearn.lora.rank == 0  # off by default
    fps = {stage_fingerprint(c, "unlearn") for c in (off, on, alpha)}
    assert len(fps) == 3
    assert stage_fingerprint(off, "score") == stage_fingerprint(on, "score")  # earlier stages are not redone


# ---------------------------------------------------------------------------------------------------------------
# one process


def test_lora_ga_trains_only_the_adapters_and_lowers_the_forget_likelihood(smoke_study):
    _, run = smoke_study
    from unlearnbench.unlearn.lora import optimizer_state_bytes, trainable_params
    from unlearnbench.unlearn.request import step

    u, data, _, _ = _unlearner(run, *LORA)
    names = {id(p): n for n, p in u.model.named_parameters()}
    trained = [n for n, p in u.model.named_parameters() if p.requires_grad]
    assert trained and all(_is_adapter(n) for n in trained)
    # every attention and MLP projection of the Llama blocks is adapted ("all-linear"), the output layer is not
    assert {n.split(".")[-4] for n in trained} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert not any("lm_head" in n or "embed" in n for n in trained)
    in_opt = [names[id(p)] for g in u.opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted(trained)

    before = _forget_loglik(u.model, data)
    for i in range(5):
        res = step(u, i)
        assert res.collapsed is None
        grads = [n for n, p in u.model.named_parameters() if p.grad is not None]
        assert all(_is_adapter(n) for n in grads)  # zeroed after the step; nothing else ever had one
    after = _forget_loglik(u.model, data)
    assert after < before - 0.05, (before, after)  # GA on the adapters alone pushes the forget set down

    # θ₀'s weights are untouched: the base layers and everything not adapted are bit-identical to the saved θ₀
    theta0 = _theta0(run)
    state = {_plain_name(k): v for k, v in u.model.state_dict().items() if not _is_adapter(k)}
    assert set(theta0) <= set(state)
    assert all(torch.equal(state[k], theta0[k]) for k in theta0)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in u.model.named_parameters() if "lora_B" in n)

    # the saving: LoRA's optimizer state against the state of full unlearning after one step
    full, _, _, _ = _unlearner(run)
    step(full, 0)
    lora_bytes, full_bytes = optimizer_state_bytes(u.opt), optimizer_state_bytes(full.opt)
    n_lora, n_full = trainable_params(u.model), trainable_params(full.model)
    print(f"trainable params: LoRA {n_lora} vs full {n_full}; optimizer state: LoRA {lora_bytes} B vs full "
          f"{full_bytes} B")
    assert lora_bytes == 2 * 4 * n_lora  # AdamW's two float32 moments per trained parameter
    assert full_bytes == 2 * 4 * n_full
    assert lora_bytes < full_bytes / 5


def test_merged_model_loads_with_plain_transformers_and_scores_like_the_adapted_one(smoke_study, tmp_path):
    _, run = smoke_study
    from transformers import AutoModelForCausalLM

    from unlearnbench.data.build import load_tokenizer
    from unlearnbench.models import save_local_model
    from unlearnbench.scoring import score_pass
    from unlearnbench.unlearn.request import step

    u, data, ids, ex = _unlearner(run, *LORA)
    for i in range(4):
        step(u, i)
    theta0 = _theta0(run)
    adapted_state = {k: v.clone() for k, v in u.model.state_dict().items()}
    save_local_model(u.model, load_tokenizer(run / "data"), tmp_path / "merged")
    # saving merges beside the model: the adapted model is not changed by it (training may go on)
    assert all(torch.equal(v, adapted_state[k]) for k, v in u.model.state_dict().items())
    assert not list((tmp_path / "merged").glob("adapter_*"))

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), use_safetensors=True)
    assert type(merged).__name__ == "LlamaForCausalLM" and not any(_is_adapter(n) for n, _ in merged.named_parameters())
    saved = merged.state_dict()
    assert set(theta0) <= set(saved)
    changed = {k for k in theta0 if not torch.equal(saved[k], theta0[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted layers moved

    sub = ex.select(range(0, len(ex), 7))  # a spread of every kind and split
    acc = u.worker.acc
    a, _ = score_pass(acc, u.model, sub, batch_size=64, local=True)
    b, _ = score_pass(acc, merged, sub, batch_size=64, local=True)
    a, b = a.set_index("example_id").sort_index(), b.set_index("example_id").sort_index()
    assert list(a.index) == list(b.index)
    # B A folded into W reorders the float32 sums only: per-example NLLs agree to ~1e-7 nats/token
    np.testing.assert_allclose(a.nll.to_numpy(), b.nll.to_numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(_forget_loglik(u.model, data), _forget_loglik(merged, data), atol=1e-5)


def test_reference_is_theta0_with_the_adapters_disabled(smoke_study):
    """npo with LoRA: no second copy of θ₀ is loaded; the reference is the model itself with its adapters off, which
    gives exactly θ₀'s log-probabilities after the adapters moved, and training goes on afterwards."""
    _, run = smoke_study
    from unlearnbench.models import load_trained
    from unlearnbench.unlearn.request import step

    def no_copy():
        raise AssertionError("LoRA must not load a second θ₀")

    u, data, _, _ = _unlearner(run, *LORA, "unlearn.method=npo", load_reference=no_copy)
    assert u.reference is u.model and u.lora is not None
    first = step(u, 0)
    assert first.stats["log_ratio"] == 0.0  # B starts at zero: the adapted model starts as θ₀
    for i in range(1, 4):
        res = step(u, i)
    assert res.stats["log_ratio"] < -1e-3
    theta0 = load_trained(run, "original").eval()
    with u.reference_mode():
        assert not u.model.training
        ref = _forget_loglik(u.reference, data)
    assert u.model.training  # restored
    assert ref == pytest.approx(_forget_loglik(theta0, data), abs=1e-6)
    assert _forget_loglik(u.model, data) < ref - 1e-3
    assert all(p.requires_grad for n, p in u.model.named_parameters() if _is_adapter(n))  # adapters train on
    b_before = {n: p.detach().clone() for n, p in u.model.named_parameters() if "lora_B" in n}
    step(u, 4)
    assert any(not torch.equal(p, b_before[n]) for n, p in u.model.named_parameters() if n in b_before)


def test_gpt2_conv1d_layers_are_adapted_and_merged(tmp_path):
    """GPT-2 keeps its projections in transformers' Conv1D (transposed weights): all-linear adapts c_attn, c_proj
    and c_fc, and the merged weights reproduce the adapted model."""
    from unlearnbench.models import build_model
    from unlearnbench.unlearn.lora import attach, merged_state_dict

    cfg = smoke_config(tmp_path, "model.arch=gpt2", "unlearn.lora.rank=4")
    model = build_model(cfg, 300, 0)
    plain_keys = set(model.state_dict())
    peft_model = attach(cfg.unlearn.lora, model, 0)
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"c_attn", "c_proj", "c_fc"}
    with torch.no_grad():  # move B off zero so that the merge has something to fold in
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = merged_state_dict(model)
    assert set(state) == plain_keys
    plain = build_model(cfg, 300, 1)
    plain.load_state_dict(state)
    ids = torch.randint(0, 300, (3, 17))
    model.eval(), plain.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - base).abs().max() > 1e-3  # the adapters really changed the outputs


def test_unknown_target_module_names_the_models_layers(smoke_study):
    _, run = smoke_study
    with pytest.raises(UserError, match="Its linear layers are named .*q_proj"):
        _unlearner(run, "unlearn.lora.rank=4", "unlearn.lora.target_modules=[nope_proj]")


def test_lora_unlearn_stage_saves_a_merged_model_and_records_the_saving(smoke_study, tmp_path):
    """The stage end to end with LoRA: result.json records the trained parameters and the optimizer state, the
    saved final model loads with load_pretrained (as the attack stage loads model_unlearned) and scores like the
    adapted model did at its last in-loop evaluation."""
    _, src = smoke_study
    from unlearnbench.data.build import load_examples
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.models import load_pretrained
    from unlearnbench.scoring import score_pass
    from unlearnbench.study import run_study

    run = tmp_path / "run"
    shutil.copytree(src, run)
    forget_scores = pd.read_parquet(run / "scores/forget.parquet")
    ids = sorted(forget_scores[(forget_scores.kind == "canary") & (forget_scores.repetitions == 16)].example_id)
    cfg = smoke_config(run, *LORA, "unlearn.requests=ids", f"unlearn.example_ids=[{','.join(ids)}]",
                       "unlearn.max_steps=3", "unlearn.save_model=true", "unlearn.stop_on_target=false")
    run_study(cfg, "unlearn", force=True)
    out = run / "unlearn" / "ids_canary"
    res = json.loads((out / "result.json").read_text())
    full = json.loads((src / "unlearn/canary_r16/result.json").read_text())  # the smoke study's full unlearning
    assert res["lora_rank"] == 8 and full["lora_rank"] == 0
    assert res["trainable_params"] < full["trainable_params"] / 5
    assert res["optimizer_state_bytes"] == 8 * res["trainable_params"]
    assert full["optimizer_state_bytes"] == 8 * full["trainable_params"]
    assert res["peak_memory_mib"] > 0
    print(f"LoRA r=8: {res['trainable_params']} trained parameters, {res['optimizer_state_bytes']} B of optimizer "
          f"state; full: {full['trainable_params']}, {full['optimizer_state_bytes']} B")

    model = load_pretrained(str(out / "model"))
    traj = pd.read_parquet(out / "trajectory.parquet")
    last = traj[traj.step == traj.step.max()].set_index("example_id").loc[ids]
    assert int(traj.step.max()) == 3
    ex = load_examples(run / "data")
    rows = [i for i, e in enumerate(ex["example_id"]) if e in set(ids)]
    scores, _ = score_pass(make_accelerator(), model, ex.select(rows), batch_size=64, local=True)
    scores = scores.set_index("example_id").loc[ids]
    np.testing.assert_allclose(scores.nll.to_numpy(), last.nll.to_numpy(), atol=1e-5, rtol=0)
    theta0_nll = forget_scores.set_index("example_id").loc[ids, "nll_original"].to_numpy()
    assert (last.nll.to_numpy() > theta0_nll).mean() > 0.9


# ---------------------------------------------------------------------------------------------------------------
# several processes (slow): DDP and ZeRO-2 against one process


OVERRIDES = [*LORA, "unlearn.max_steps=4", "unlearn.request_kinds=[canary]", "unlearn.parallel=data",
             "unlearn.save_model=true"]
BACKENDS = {"ddp": ("cpu_ddp.yaml", "type=MULTI_CPU backend=gloo zero_stage=0"),
            "zero2": ("cpu_deepspeed_zero2.yaml", "type=DEEPSPEED backend=gloo zero_stage=2")}


@pytest.fixture(scope="module")
def lora_one_process(smoke_study, tmp_path_factory):
    from unlearnbench.study import run_study

    run = tmp_path_factory.mktemp("lora") / "one"
    shutil.copytree(smoke_study[1], run)
    run_study(smoke_config(run, *OVERRIDES), "unlearn", force=True)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_lora_unlearn_matches_one_process(backend, lora_one_process, tmp_path):
    from safetensors.torch import load_file

    config, setup_line = BACKENDS[backend]
    run = tmp_path / backend
    shutil.copytree(lora_one_process, run)
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))}
    res = launch("unlearn", "--preset", "smoke", "--force", f"run.dir={run}", *OVERRIDES, config=config, env=env,
                 timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"processes=2 {setup_line}" in res.stdout and "data-parallel" in res.stdout
    for r in (1, 4, 16):
        name = f"canary_r{r}"
        a = pd.read_parquet(lora_one_process / "unlearn" / name / "curve.parquet")
        b = pd.read_parquet(run / "unlearn" / name / "curve.parquet")
        d_uq = float(np.abs(a.uq - b.uq).max())
        print(f"[{backend}] LoRA unlearn {name}: max |Δuq| {d_uq:.2e}, |Δexposure| "
              f"{float(np.abs(a.exposure_mean - b.exposure_mean).max()):.2e} bits")
        assert_same_curve(a, b)  # the same adapters' init (seeded): the backend tests' tolerances (conftest)
        ra = json.loads((lora_one_process / "unlearn" / name / "result.json").read_text())
        rb = json.loads((run / "unlearn" / name / "result.json").read_text())
        assert rb["trainable_params"] == ra["trainable_params"]
        if backend == "zero2":  # each rank holds half of the (flattened, padded) optimizer state
            assert rb["optimizer_state_bytes"] <= ra["optimizer_state_bytes"] / 2 + 1024
        # the merged model: plain names, the same weights as one process's merge
        wa = load_file(str(lora_one_process / "unlearn" / name / "model" / "model.safetensors"))
        wb = load_file(str(run / "unlearn" / name / "model" / "model.safetensors"))
        assert set(wa) <= set(wb) and set(wb) - set(wa) <= {"lm_head.weight"}
        assert not any(_is_adapter(k) or "base_layer" in k for k in wb)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
        # the attacks' starting point, saved merged at the step the request became unlearned
        unlearned = lora_one_process / "unlearn" / name / "model_unlearned"
        assert unlearned.exists() == (run / "unlearn" / name / "model_unlearned").exists()
        if unlearned.exists():
            wu = load_file(str(run / "unlearn" / name / "model_unlearned" / "model.safetensors"))
            assert not any(_is_adapter(k) or "base_layer" in k for k in wu)
