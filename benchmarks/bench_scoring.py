#!/usr/bin/env python3
"""Scoring throughput: the project's `score_pass` against the loops users would otherwise write.

Variants, all on the same model (the `default` Llama, random init) and the same examples (prepared `default` data,
2,000 examples of 8..128 tokens), in one process with 2 threads, repetitions alternated A B C D A B C D ...:
  project      `unlearnbench.scoring.score_pass` as configured (length-sorted batches of at most score.batch_size=64
               examples and the automatic token budget, 2^22 / vocabulary = 1,024 padded tokens; per-example sums
               reduced in the pass, the DataFrame built at the end)
  project_rows the same pass with no token budget (`batch_tokens=0`): batches of 64 examples, as before the budget
  project_dict the same `score_pass` given the columns as plain lists (a dict) instead of the `datasets.Dataset`:
               isolates what indexing the Dataset's columns row by row costs inside the pass
  per_example  batch size 1, `model(input_ids, labels=...)` and the loss read back (how MUSE scores privacy)
  unbucketed   padded batches of 32 in the original order, the same per-example reduction as the pass
  packed       every token concatenated into rows of 128, no padding, causal mask only, batches of 32 rows:
               the same FLOPs on real tokens with no padding and no per-example bookkeeping (the ceiling)
Throughput is examples/s and tokens/s (real input tokens). Targets: project >= 0.9x packed, >= 2.5x per-example,
>= 2.5x unbucketed. The per-example nll of the three per-example variants are compared (they must agree).
Then a token-budget sweep in one thread (one process's share of the 2-core machine in `make run`): `score_pass` at
batch_tokens 0 (rows of 64), 512, 1,024, 2,048 and 4,096, alternated, on the same examples (`--no-sweep` skips it).

    python benchmarks/bench_scoring.py            # full settings (about 2 minutes on 2 idle cores)
    python benchmarks/bench_scoring.py --quick    # tiny settings, a few seconds: checks the script works
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402

IGNORE = -100


def _reduce(logits, labels):
    """Per-example nll sum, scored count, correct count: what score_pass computes per batch."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                            targets.clamp(min=0).reshape(-1), reduction="none")
    nll = torch.where(mask, nll.view_as(targets), torch.zeros(()))
    correct = (logits.argmax(-1) == targets) & mask
    return torch.stack([nll.sum(1).double(), mask.sum(1).double(), correct.sum(1).double()], dim=1)


@torch.inference_mode()
def per_example(model, ids, starts, ends):
    out = np.zeros(len(ids))
    for i, (seq, a, b) in enumerate(zip(ids, starts, ends)):
        x = torch.tensor([seq])
        labels = torch.full_like(x, IGNORE)
        labels[0, a:b] = x[0, a:b]
        loss = model(input_ids=x, labels=labels).loss
        out[i] = float(loss) * int((labels[0, 1:] != IGNORE).sum())
    return out


@torch.inference_mode()
def unbucketed(model, ids, starts, ends, batch=32):
    from unlearnbench.batching import collate

    parts = []
    for k in range(0, len(ids), batch):
        b = collate(ids[k:k + batch], starts[k:k + batch], ends[k:k + batch], 0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        parts.append(_reduce(logits, b["labels"]))
    return torch.cat(parts)[:, 0].numpy()


@torch.inference_mode()
def packed(model, ids, width=128, rows_per_batch=32):
    flat = torch.tensor([t for s in ids for t in s], dtype=torch.long)
    n_full = len(flat) // width
    full = flat[: n_full * width].view(n_full, width)
    total = 0.0
    for k in range(0, n_full, rows_per_batch):
        x = full[k:k + rows_per_batch]
        total += float(_reduce(model(input_ids=x).logits, x)[:, 0].sum())
    if len(flat) % width:
        x = flat[n_full * width:][None]
        total += float(_reduce(model(input_ids=x).logits, x)[:, 0].sum())
    return total


SWEEP = (0, 512, 1024, 2048, 4096)


def budget_sweep(acc, model, cols: dict, batch: int, reps: int, n_tok: int) -> dict:
    """tokens/s of `score_pass` at each token budget of SWEEP (0: no budget, rows of `batch`), in one thread."""
    from unlearnbench.scoring import score_pass

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {b: [] for b in SWEEP}
        for _ in range(reps):
            for b in SWEEP:  # alternated
                t0 = time.perf_counter()
                score_pass(acc, model, cols, batch, 0, batch_tokens=b)
                times[b].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for b, ts in times.items():
        s = C.summary(ts)
        out[f"tokens_{b}" if b else "rows_64"] = {"batch_tokens": b, "seconds": s, "tokens_per_s": n_tok / s["median"]}
    base = out["rows_64"]["tokens_per_s"]
    for v in out.values():
        v["vs_rows"] = v["tokens_per_s"] / base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings: prove the script works in seconds")
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--no-sweep", action="store_true", help="skip the one-thread token-budget sweep")
    args = ap.parse_args()
    n = args.examples or (48 if args.quick else 2000)
    reps = args.reps or (2 if args.quick else 3)
    C.set_threads(args.threads)

    from unlearnbench.distributed import make_accelerator
    from unlearnbench.scoring import score_pass

    cfg = C.default_config()
    acc = make_accelerator()
    ds = C.scoring_data(n)
    # plain lists for the hand-written loops (and the `project_dict` variant): a `datasets` column indexed per
    # row costs ~0.2 ms a lookup, which is no part of what those loops stand for
    cols = ds.select_columns(["example_id", "input_ids", "score_start", "score_end"]).to_dict()
    ids, starts, ends = cols["input_ids"], cols["score_start"], cols["score_end"]
    n_tok = int(sum(len(s) for s in ids))
    model = C.default_model(cfg.data.vocab_size).eval()
    batch = cfg.score.batch_size

    variants = {
        "project": lambda: score_pass(acc, model, ds, batch, 0, cfg.data.vocab_size),
        "project_dict": lambda: score_pass(acc, model, cols, batch, 0, cfg.data.vocab_size),
        "project_rows": lambda: score_pass(acc, model, ds, batch, 0, cfg.data.vocab_size, batch_tokens=0),
        "per_example": lambda: per_example(model, ids, starts, ends),
        "unbucketed": lambda: unbucketed(model, ids, starts, ends, 32),
        "packed": lambda: packed(model, ids),
    }
    # warm-up on a slice (allocator, kernels), not timed
    small = ds.select(range(min(64, n)))
    score_pass(acc, model, small, batch, 0)
    per_example(model, ids[:8], starts[:8], ends[:8])
    unbucketed(model, ids[:64], starts[:64], ends[:64])
    packed(model, ids[:64])

    times = {k: [] for k in variants}
    results = {}
    for rep in range(reps):
        for name, fn in variants.items():  # alternated: A B C D A B C D ...
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
        print(f"[bench_scoring] rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    df, stats = results["project"]
    proj_nll = df["nll_sum"].to_numpy()  # sorted by example_id; put back in dataset order
    order = {e: i for i, e in enumerate(df["example_id"])}
    rows = [order[e] for e in cols["example_id"]]
    proj_nll = proj_nll[rows]
    n_tokens = np.maximum(1, df["n_tokens"].to_numpy()[rows])
    agreement = {"max_abs_diff_nll_per_token_project_vs_per_example":
                 float(np.max(np.abs(proj_nll - results["per_example"]) / n_tokens)),
                 "max_abs_diff_nll_per_token_project_vs_unbucketed":
                 float(np.max(np.abs(proj_nll - results["unbucketed"]) / n_tokens)),
                 "total_nll_project": float(proj_nll.sum()), "total_nll_packed": float(results["packed"])}

    out = {}
    for name, ts in times.items():
        s = C.summary(ts)
        out[name] = {"seconds": s, "examples_per_s": n / s["median"], "tokens_per_s": n_tok / s["median"]}
    out["project"]["padding_fraction"] = stats.padding_fraction
    out["project_dict"]["padding_fraction"] = stats.padding_fraction
    out["project_rows"]["padding_fraction"] = results["project_rows"][1].padding_fraction
    slots_unb = sum(len(ids[k:k + 32]) * max(len(x) for x in ids[k:k + 32]) for k in range(0, n, 32))
    out["unbucketed"]["padding_fraction"] = 1 - n_tok / slots_unb
    tps = {k: v["tokens_per_s"] for k, v in out.items()}
    ratios = {"project_vs_packed": tps["project"] / tps["packed"],
              "project_vs_per_example": tps["project"] / tps["per_example"],
              "project_vs_unbucketed": tps["project"] / tps["unbucketed"],
              "project_dict_vs_packed": tps["project_dict"] / tps["packed"],
              "project_dict_vs_project": tps["project_dict"] / tps["project"],
              "project_vs_project_rows": tps["project"] / tps["project_rows"],
              "packed_vs_per_example": tps["packed"] / tps["per_example"],
              "packed_vs_unbucketed": tps["packed"] / tps["unbucketed"]}
    targets = {"project_vs_packed >= 0.9": ratios["project_vs_packed"] >= 0.9,
               "project_vs_per_example >= 2.5": ratios["project_vs_per_example"] >= 2.5,
               "project_vs_unbucketed >= 2.5": ratios["project_vs_unbucketed"] >= 2.5}
    sweep = None if args.no_sweep else budget_sweep(acc, model, cols, batch, reps, n_tok)
    body = {"settings": {"examples": n, "tokens": n_tok, "reps": reps, "threads": torch.get_num_threads(),
                         "project_batch": batch, "unbucketed_batch": 32, "packed_rows": "32 x 128",
                         "model": "default llama (4 layers, hidden 128, 4 heads, ff 344, vocab 4096), random init",
                         "data": "default preset prepared examples, random subset of 8..128 tokens"},
            "variants": out, "ratios_tokens_per_s": ratios, "targets_met": targets, "agreement": agreement,
            "token_budget_sweep_1_thread": sweep}
    path = C.write_result("bench_scoring", body, args.quick, args.out_dir)
    rows = [[k, f"{v['examples_per_s']:.0f}", f"{v['tokens_per_s']:.0f}", f"{v['seconds']['median']:.2f}",
             f"{v['seconds']['spread_pct']:.0f}%", f"{v.get('padding_fraction', 0):.1%}"] for k, v in out.items()]
    print(C.fmt_table(rows, ["variant", "ex/s", "tok/s", "median s", "spread", "padding"]))
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print(f"agreement: {agreement}")
    if sweep:
        print("token budget sweep (1 thread): " + ", ".join(
            f"{k} {v['tokens_per_s']:.0f} tok/s ({v['vs_rows']:.2f}x rows of 64)" for k, v in sweep.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
