#!/usr/bin/env python3
"""GPU suite: scoring and gradient-ascent throughput of a 0.1-1B Llama-style model in bf16, with MFU.

Made for a single-GPU machine with torch (+ transformers) preinstalled and no network: the model is built from a
config (random init, nothing downloaded), the data are random token ids with lengths uniform in 8..128.
It imports torch, transformers and numpy, plus the project's pure modules `unlearnbench.batching` and
`unlearnbench.unlearn.methods` (torch/numpy only) when they import, with identical local copies as a fallback.
No omegaconf, datasets, pandas, accelerate, deepspeed or wandb.

Measured (all in one process, the scoring variants alternated A B C D A B C D ...):
  * bf16 matmul peak: a big torch.matmul loop (8192^3), the denominator of MFU;
  * scoring: the project's earlier pass (length-sorted, padded batches of `score_batch` examples, per-example sums
    reduced on the device and copied back per batch), the same at a larger batch, the project's pass now
    (`project_token_budget`: `batching.length_batches` with the automatic GPU budget of 2^28 logits / vocabulary
    padded tokens and no row cap, the output layer on the scored positions only, per-example sums kept on the
    device and copied back once, as `unlearnbench.scoring.score_pass`), an unbucketed padded loop (original order), a per-example loop (batch 1, `model(ids, labels=ids)`, as
    MUSE scores) on a subset, and the packed ceiling (all tokens concatenated into rows of 128, causal mask only);
  * gradient ascent: the project's step (collate, forward, `token_logprobs`, the `ga` loss, backward, gradient
    norm, AdamW) against a `transformers.Trainer` whose `compute_loss` negates the loss, same model init and batch;
  * peak memory (torch.cuda.max_memory_allocated) of every phase.
MFU = 2*N*tokens/s (scoring) or 6*N*tokens/s (training) over the measured matmul peak, N = parameters that take
part in matmuls (all but the input embedding table); tokens = real tokens, not padding slots.

Writes $OUT/gpu_bench.json when OUT is set, else benchmarks/results/gpu_bench.json (or --out).
GPU_SUITE_TINY=1 runs a tiny model on a few examples (on CPU when no GPU) to test the logic.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = os.environ.get("GPU_SUITE_TINY", "") == "1"

# --------------------------------------------------------------------------- the project's pure pieces
# batching and unlearn.methods import with torch alone (no omegaconf/datasets/pandas), so the GPU image runs them.
sys.path.insert(0, str(ROOT / "src"))
from unlearnbench.batching import IGNORE, collate, length_batches, token_logprobs  # noqa: E402
from unlearnbench.unlearn.methods import LossInputs, MethodParams, get_method  # noqa: E402

GA = get_method("ga").fn


# --------------------------------------------------------------------------- setup

def settings() -> dict:
    if TINY:
        return dict(hidden=64, layers=2, heads=4, inter=172, vocab=1000, n_examples=160, n_per_example=24,
                    score_batch=16, big_batch=64, pack_rows=16, reps=2, ga_steps=8, ga_warmup=2, matmul_n=256,
                    matmul_iters=3)
    return dict(hidden=1536, layers=24, heads=12, inter=4096, vocab=32000, n_examples=4096, n_per_example=384,
                score_batch=64, big_batch=256, pack_rows=64, reps=3, ga_steps=40, ga_warmup=5, matmul_n=8192,
                matmul_iters=100)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(s: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["heads"], max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, attention_dropout=0.0)
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    model.config.use_cache = False
    return model


def make_data(s: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 129, size=s["n_examples"])
    ids = [rng.integers(1, s["vocab"], size=int(n)).tolist() for n in lengths]
    # the project scores the span after a short prompt for canaries and the whole text otherwise: whole text here
    return ids, [0] * len(ids), [len(x) for x in ids]


def matmul_peak(s: dict, device, dtype) -> dict:
    n = s["matmul_n"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(s["matmul_iters"]):
        a @ b
    sync(device)
    sec = time.perf_counter() - t0
    del a, b
    return {"n": n, "iters": s["matmul_iters"], "seconds": sec,
            "tflops": 2 * n ** 3 * s["matmul_iters"] / sec / 1e12}


# --------------------------------------------------------------------------- scoring variants

def _reduce(logits, labels):
    """Per-example nll sum, scored count and correct count, on the device (as score_pass)."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                            targets.clamp(min=0).reshape(-1), reduction="none")
    nll = torch.where(mask, nll.view_as(targets), torch.zeros((), device=nll.device))
    correct = (logits.argmax(-1) == targets) & mask
    return torch.stack([nll.sum(1).double(), mask.sum(1).double(), correct.sum(1).double()], dim=1)


@torch.inference_mode()
def score_batched(model, data, batch, device, bucket: bool):
    """The project's pass (bucket=True: length-sorted) or the unbucketed padded loop (original order)."""
    ids, starts, ends = data
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i)) if bucket else list(range(len(ids)))
    out, slots = [], 0
    for k in range(0, len(order), batch):
        rows = order[k:k + batch]
        b = collate([ids[i] for i in rows], [starts[i] for i in rows], [ends[i] for i in rows], 0)
        b = {key: v.to(device, non_blocking=True) for key, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out.append(_reduce(logits, b["labels"]).cpu())  # the pass copies each batch back (gather_for_metrics)
        slots += b["input_ids"].numel()
    table = torch.cat(out)
    res = torch.empty_like(table)
    res[torch.tensor(order)] = table
    return res, slots


@torch.inference_mode()
def score_token_budget(model, data, budget, device):
    """As `scoring.score_pass` with `score.batch_tokens`: length-sorted batches of at most `budget` padded tokens
    (`batching.length_batches`, no row cap), the body's hidden states at the scored positions only through the
    output layer, per-example sums on the device, one copy to the host at the end."""
    ids, starts, ends = data
    batches = length_batches([len(x) for x in ids], len(ids), budget)
    body, head = model.model, model.lm_head
    parts, slots = [], 0
    for rows in batches:
        b = collate([ids[i] for i in rows], [starts[i] for i in rows], [ends[i] for i in rows], 0)
        b = {key: v.to(device, non_blocking=True) for key, v in b.items()}
        targets = b["labels"][:, 1:]
        mask = targets != IGNORE
        hidden = body(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, :-1]
        logits = head(hidden[mask]).float()
        wanted = targets[mask]
        owner = mask.nonzero()[:, 0]
        nll = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(
            0, owner, torch.nn.functional.cross_entropy(logits, wanted, reduction="none").double())
        correct = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(
            0, owner, (logits.argmax(-1) == wanted).double())
        parts.append(torch.stack([torch.tensor(rows, device=device, dtype=torch.float64), nll,
                                  mask.sum(1).double(), correct], dim=1))
        slots += b["input_ids"].numel()
    table = torch.cat(parts).cpu()
    res = torch.empty((len(ids), 3), dtype=torch.float64)
    res[table[:, 0].long()] = table[:, 1:]
    return res, slots, len(batches)


@torch.inference_mode()
def score_per_example(model, data, n, device):
    """MUSE-style: one example at a time, `model(ids, labels=ids)`, the loss read back."""
    ids, _, _ = data
    out = []
    for i in range(n):
        x = torch.tensor([ids[i]], device=device)
        loss = model(input_ids=x, labels=x).loss
        out.append(float(loss) * (len(ids[i]) - 1))
    return out


@torch.inference_mode()
def score_packed(model, data, rows_per_batch, device, width=128):
    """The ceiling: every token concatenated into rows of `width`, no padding, causal attention only."""
    flat = torch.tensor([t for x in data[0] for t in x], dtype=torch.long)
    n_full = len(flat) // width
    rows = list(flat[: n_full * width].view(n_full, width))
    if len(flat) % width:
        rows.append(flat[n_full * width:])
    total = torch.zeros((), dtype=torch.float64)
    for k in range(0, n_full, rows_per_batch):
        x = torch.stack(rows[k:min(k + rows_per_batch, n_full)]).to(device, non_blocking=True)
        total += _reduce(model(input_ids=x).logits, x).sum(0)[0].cpu()
    if len(flat) % width:
        x = rows[-1][None].to(device)
        total += _reduce(model(input_ids=x).logits, x).sum(0)[0].cpu()
    return float(total)


# --------------------------------------------------------------------------- gradient ascent

def project_ga(model, data, steps, warmup, batch, device, lr=3e-4):
    """The project's unlearning step (unlearn/loop.py), single device: returns timing over steps >= warmup."""
    ids, starts, ends = data
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    params = MethodParams()
    rng = np.random.default_rng(1)
    model.train()
    t_begin, tokens, step_times = None, 0, []
    for step in range(steps):
        if step == warmup:
            sync(device)
            t_begin = time.perf_counter()
        t0 = time.perf_counter()
        rows = sorted(rng.choice(len(ids), size=batch, replace=False).tolist(), key=lambda i: (len(ids[i]), i))
        b = collate([ids[i] for i in rows], [starts[i] for i in rows], [ends[i] for i in rows], 0)
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        f_logp, f_mask = token_logprobs(logits, b["labels"])
        loss, _ = GA(LossInputs(forget_logp=f_logp, forget_mask=f_mask,
                                forget_tokens=int(sum(ends[i] - starts[i] for i in rows)), forget_seqs=len(rows),
                                token_weight=1.0), params)
        loss.backward()
        float(loss.detach())  # the loop reduces and reads the loss every step
        float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))  # divergence check
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += int(b["attention_mask"].sum())
            step_times.append(time.perf_counter() - t0)
    sync(device)
    sec = time.perf_counter() - t_begin
    del opt
    return {"steps": steps - warmup, "seconds": sec, "tokens": tokens, "step_ms_median": 1e3 * statistics.median(step_times)}


def trainer_ga(model, data, steps, warmup, batch, device, lr=3e-4):
    """`transformers.Trainer` with compute_loss = -loss (TOFU / open-unlearning); same model, data, batch, AdamW."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ids, starts, ends = data

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return i

    counted = {"tokens": 0}

    def coll(rows):
        b = collate([ids[i] for i in rows], [starts[i] for i in rows], [ends[i] for i in rows], 0)
        return b

    class NegLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            if self.state.global_step >= warmup:
                counted["tokens"] += int(inputs["attention_mask"].sum())
            loss = -out.loss
            return (loss, out) if return_outputs else loss

    marks = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup and "t0" not in marks:
                sync(device)
                marks["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps:
                sync(device)
                marks["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps,
                                 learning_rate=lr, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
                                 optim="adamw_torch", logging_strategy="no", save_strategy="no", report_to=[],
                                 disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
                                 use_cpu=device.type != "cuda", seed=1)
        tr = NegLoss(model=model, args=args, train_dataset=DS(), data_collator=coll, callbacks=[Clock()])
        t_all = time.perf_counter()
        tr.train()
        t_all = time.perf_counter() - t_all
    return {"steps": steps - warmup, "seconds": marks["t1"] - marks["t0"], "tokens": counted["tokens"],
            "train_call_seconds": t_all}


# --------------------------------------------------------------------------- where the time goes

def profile_top(fn, device, k=12) -> list:
    """torch.profiler over one call of fn: the top-k operators by self device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    evs = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:k]
    return [{"op": e.key, "calls": e.count, "self_device_ms": (getattr(e, "self_device_time_total", 0) or 0) / 1e3,
             "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in evs]


# --------------------------------------------------------------------------- main

def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-trainer", action="store_true")
    args = ap.parse_args()
    t_script = time.perf_counter()
    s = settings()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    import transformers

    res = {"benchmark": "gpu_suite", "tiny": TINY, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "bash benchmarks/gpu_suite.sh" + (" (GPU_SUITE_TINY=1)" if TINY else ""),
           "machine": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                       "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "cuda": torch.version.cuda, "numpy": np.__version__},
           "dtype": str(dtype).replace("torch.", ""), "settings": s}
    print(f"[gpu_bench] {res['machine']['device']} torch {torch.__version__} transformers {transformers.__version__}",
          flush=True)

    def mem_reset():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def mem_peak():
        return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    # matmul peak
    mm = matmul_peak(s, device, dtype)
    res["matmul_peak"] = mm
    peak = mm["tflops"] * 1e12
    print(f"[gpu_bench] matmul peak {mm['tflops']:.1f} TFLOP/s", flush=True)

    mem_reset()
    model = build_model(s, device, dtype)
    n_total = sum(p.numel() for p in model.parameters())
    n_mm = n_total - model.get_input_embeddings().weight.numel()
    res["model"] = {"params": n_total, "params_matmul": n_mm, "hidden": s["hidden"], "layers": s["layers"],
                    "heads": s["heads"], "intermediate": s["inter"], "vocab": s["vocab"],
                    "attn_implementation": getattr(model.config, "_attn_implementation", None),
                    "weights_mib": mem_peak()}
    print(f"[gpu_bench] model {n_total/1e6:.0f}M params ({n_mm/1e6:.0f}M in matmuls), "
          f"attn={res['model']['attn_implementation']}", flush=True)
    data = make_data(s)
    n_tok = sum(len(x) for x in data[0])
    n_pe = s["n_per_example"]
    pe_tok = sum(len(x) for x in data[0][:n_pe])
    res["data"] = {"examples": len(data[0]), "tokens": n_tok, "lengths": "uniform 8..128, random ids",
                   "per_example_subset": n_pe, "per_example_subset_tokens": pe_tok}

    # ---- scoring
    model.eval()
    budget = max(1, (1 << 28) // s["vocab"])  # scoring.auto_batch_tokens on a GPU
    variants = {
        "project_bucketed": lambda: score_batched(model, data, s["score_batch"], device, True),
        "project_bucketed_bigbatch": lambda: score_batched(model, data, s["big_batch"], device, True),
        "project_token_budget": lambda: score_token_budget(model, data, budget, device),
        "unbucketed": lambda: score_batched(model, data, s["score_batch"], device, False),
        "packed": lambda: score_packed(model, data, s["pack_rows"], device),
        "per_example": lambda: score_per_example(model, data, n_pe, device),
    }
    # warm-up, not timed: one whole pass of each batched variant (every batch shape meets its kernels and the
    # allocator once; the first H200 run, without it, had a cold first repetition) and a few per-example calls
    for name, fn in variants.items():
        if name != "per_example":
            fn()
    score_per_example(model, data, 16, device)
    sync(device)
    times = {k: [] for k in variants}
    mems = {}
    outputs = {}
    for rep in range(s["reps"]):
        for name, fn in variants.items():
            mem_reset()
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            mems[name] = mem_peak()
            outputs[name] = out
        print(f"[gpu_bench] scoring rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    # correctness: the batched passes agree with one another and with the per-example loop
    b_tab, slots_b = outputs["project_bucketed"]
    u_tab, slots_u = outputs["unbucketed"]
    _, slots_big = outputs["project_bucketed_bigbatch"]
    t_tab, slots_t, n_batches_t = outputs["project_token_budget"]
    pe = np.array(outputs["per_example"])
    tol = {"max_abs_diff_bucketed_vs_unbucketed_nll_per_token":
           float((b_tab[:, 0] / b_tab[:, 1] - u_tab[:, 0] / u_tab[:, 1]).abs().max()),
           "max_abs_diff_token_budget_vs_bucketed_nll_per_token":
           float((t_tab[:, 0] / t_tab[:, 1] - b_tab[:, 0] / b_tab[:, 1]).abs().max()),
           "max_abs_diff_bucketed_vs_per_example_nll_per_token":
           float(np.abs(b_tab[:n_pe, 0].numpy() / b_tab[:n_pe, 1].numpy()
                        - pe / b_tab[:n_pe, 1].numpy()).max())}
    scoring = {}
    for name, ts in times.items():
        toks = pe_tok if name == "per_example" else n_tok
        exs = n_pe if name == "per_example" else len(data[0])
        med = statistics.median(ts)
        scoring[name] = {"seconds": summary(ts), "examples_per_s": exs / med, "tokens_per_s": toks / med,
                         "mfu": 2 * n_mm * toks / med / peak, "peak_memory_mib": mems[name]}
    scoring["project_bucketed"]["padding_fraction"] = 1 - n_tok / slots_b
    scoring["project_bucketed_bigbatch"]["padding_fraction"] = 1 - n_tok / slots_big
    scoring["project_token_budget"].update(padding_fraction=1 - n_tok / slots_t, batch_tokens=budget,
                                           batches=n_batches_t)
    scoring["unbucketed"]["padding_fraction"] = 1 - n_tok / slots_u
    tps = {k: v["tokens_per_s"] for k, v in scoring.items()}
    ratios = {"project_vs_packed": tps["project_bucketed"] / tps["packed"],
              "project_vs_per_example": tps["project_bucketed"] / tps["per_example"],
              "project_vs_unbucketed": tps["project_bucketed"] / tps["unbucketed"],
              "project_bigbatch_vs_packed": tps["project_bucketed_bigbatch"] / tps["packed"],
              "project_token_budget_vs_packed": tps["project_token_budget"] / tps["packed"],
              "project_token_budget_vs_bucketed": tps["project_token_budget"] / tps["project_bucketed"],
              "packed_vs_per_example": tps["packed"] / tps["per_example"],
              "packed_vs_unbucketed": tps["packed"] / tps["unbucketed"]}
    res["scoring"] = {"variants": scoring, "ratios_tokens_per_s": ratios, "agreement": tol}
    for k, v in scoring.items():
        print(f"[gpu_bench] score {k:27s} {v['tokens_per_s']:12.0f} tok/s {v['examples_per_s']:9.1f} ex/s "
              f"MFU {v['mfu']:.3f} peak {v['peak_memory_mib']} MiB", flush=True)
    print("[gpu_bench] ratios " + json.dumps({k: round(v, 3) for k, v in ratios.items()}), flush=True)
    del outputs, b_tab, u_tab, t_tab
    try:  # where the project pass spends its time, on the first 16 batches
        sub = (data[0][: 16 * s["score_batch"]], data[1], data[2])
        res["scoring"]["profile_project_bucketed_16_batches"] = profile_top(
            lambda: score_batched(model, sub, s["score_batch"], device, True), device)
    except Exception as exc:
        res.setdefault("errors", {})["profile_scoring"] = f"{type(exc).__name__}: {exc}"

    # ---- gradient ascent: project step vs Trainer, alternating, each from the same initial weights
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ga = {"project_loop": [], "trainer": []}
    ga_mem = {}
    kinds = ["project_loop"] + ([] if args.no_trainer else ["trainer"])
    n_rep = 2 if not TINY else 1
    for kind in kinds:  # warm-up run of each loop, not recorded
        model.load_state_dict(init_state)
        try:
            (project_ga if kind == "project_loop" else trainer_ga)(model, data, s["ga_warmup"] + 3, s["ga_warmup"],
                                                                    32, device)
        except Exception as exc:
            print(f"[gpu_bench] warm-up {kind} failed: {type(exc).__name__}: {exc}", flush=True)
    for rep in range(n_rep):
        for kind in kinds:
            model.load_state_dict(init_state)
            mem_reset()
            try:
                fn = project_ga if kind == "project_loop" else trainer_ga
                r = fn(model, data, s["ga_steps"], s["ga_warmup"], 32, device)
            except Exception as exc:
                print(f"[gpu_bench] {kind} failed: {type(exc).__name__}: {exc}", flush=True)
                res.setdefault("errors", {})[kind] = f"{type(exc).__name__}: {exc}"
                if kind == "trainer":
                    kinds = ["project_loop"]
                continue
            ga_mem[kind] = mem_peak()
            ga[kind].append(r)
            print(f"[gpu_bench] GA {kind} rep {rep}: {r['steps'] / r['seconds']:.2f} steps/s "
                  f"{r['tokens'] / r['seconds']:.0f} tok/s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    try:  # where a gradient-ascent step spends its time: 4 steps of the project loop
        model.load_state_dict(init_state)
        res["profile_project_ga_4_steps"] = profile_top(
            lambda: project_ga(model, data, 5, 1, 32, device), device)
    except Exception as exc:
        res.setdefault("errors", {})["profile_ga"] = f"{type(exc).__name__}: {exc}"
    ga_out = {}
    for kind, runs in ga.items():
        if not runs:
            continue
        sps = [r["steps"] / r["seconds"] for r in runs]
        tps_ = [r["tokens"] / r["seconds"] for r in runs]
        ga_out[kind] = {"steps_per_s": summary(sps), "tokens_per_s": summary(tps_),
                        "mfu": 6 * n_mm * statistics.median(tps_) / peak, "peak_memory_mib": ga_mem.get(kind),
                        "runs": runs}
    if "trainer" in ga_out and "project_loop" in ga_out:
        ga_out["ratio_project_vs_trainer_steps_per_s"] = (ga_out["project_loop"]["steps_per_s"]["median"]
                                                          / ga_out["trainer"]["steps_per_s"]["median"])
    res["gradient_ascent"] = {"batch": 32, "optimizer": "AdamW lr 3e-4", "steps_timed": s["ga_steps"] - s["ga_warmup"],
                              **ga_out}
    for kind in ("project_loop", "trainer"):
        if kind in ga_out:
            print(f"[gpu_bench] GA {kind}: {ga_out[kind]['tokens_per_s']['median']:.0f} tok/s "
                  f"MFU {ga_out[kind]['mfu']:.3f} peak {ga_out[kind]['peak_memory_mib']} MiB", flush=True)
    res["targets"] = {"scoring_vs_packed>=0.9": ratios["project_vs_packed"] >= 0.9,
                      "scoring_vs_per_example>=2.5": ratios["project_vs_per_example"] >= 2.5,
                      "scoring_vs_unbucketed>=2.5": ratios["project_vs_unbucketed"] >= 2.5}
    if "ratio_project_vs_trainer_steps_per_s" in ga_out:
        res["targets"]["unlearn_vs_trainer>=1.0"] = ga_out["ratio_project_vs_trainer_steps_per_s"] >= 1.0
    for name in ("profile_project_ga_4_steps",):
        for row in res.get(name, [])[:8]:
            print(f"[gpu_bench] {name}: {row['op'][:60]:60s} {row['self_device_ms']:9.2f} ms dev "
                  f"{row['self_cpu_ms']:9.2f} ms cpu x{row['calls']}")
    for row in res["scoring"].get("profile_project_bucketed_16_batches", [])[:8]:
        print(f"[gpu_bench] profile_score: {row['op'][:60]:60s} {row['self_device_ms']:9.2f} ms dev "
              f"{row['self_cpu_ms']:9.2f} ms cpu x{row['calls']}")
    res["script_seconds"] = time.perf_counter() - t_script
    if args.out:
        out = Path(args.out)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_bench.json"
    elif TINY:
        out = Path(tempfile.gettempdir()) / "gpu_bench_tiny.json"
    else:
        out = ROOT / "benchmarks" / "results" / "gpu_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    print(f"[gpu_bench] targets {json.dumps(res['targets'])}")
    print(f"[gpu_bench] wrote {out} after {res['script_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
