"""The attack stage: does forgetting last? For each unlearned request (from the model saved at the step it became
unlearned), relearning (k fine-tuning steps on retain data, and on part of its own forget examples), weight-only
quantization reload, and membership inference (LOSS, zlib, Min-K%, Min-K%++ under θ₀, the unlearned model and θᵣ).
Everything is measured against the oracle θᵣ attacked the same way. Writes `attacks/<request>/` and
`attacks/summary.json` (with F4); the report shows them.

A request that never became unlearned is reported as such and skipped; a quantization backend this platform lacks
is one message, and the other attacks go on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from unlearnbench import attacks, metrics
from unlearnbench.config import Config
from unlearnbench.data.build import load_examples, load_tokenizer
from unlearnbench.distributed import peak_memory_mib, zero_stage
from unlearnbench.errors import UserError
from unlearnbench.evaluation import eval_subset
from unlearnbench.findings import finding_f4
from unlearnbench.io import read_json, write_json, write_parquet
from unlearnbench.models import load_pretrained, load_trained
from unlearnbench.rundir import Context, clear_outputs, finish_stage, require, should_run, stage_fingerprint
from unlearnbench.tracking import open_tracker

NAME = "attack"
OUTPUTS = ("attacks",)
SECTIONS = ("data", "model", "train", "score", "metrics", "unlearn", "attack", "run.seed")


def selected(cfg: Config, results: list[dict]) -> list[dict]:
    """The requests the attacks run on: all, or only those of the highest repetitions (`attack.requests`)."""
    if cfg.attack.requests == "max_repetitions":
        top = max(int(r["repetitions"]) for r in results)
        return [r for r in results if int(r["repetitions"]) == top]
    return list(results)


def request_sets(cfg: Config, ids: list[str], columns: dict, meta: pd.DataFrame,
                 forget_table: pd.DataFrame) -> attacks.RequestSets:
    """The request's examples and its kind's references as plain lists, and its seen / held-out split."""
    kinds = set(forget_table.set_index("example_id").loc[ids, "kind"])
    keep = meta.example_id.isin(ids) | ((meta.split == "reference") & meta.kind.isin(kinds))
    sub = meta[keep].reset_index(drop=True)
    row_of = {e: i for i, e in enumerate(columns["example_id"])}
    rows = [row_of[e] for e in sub.example_id]
    data = {c: [columns[c][i] for i in rows] for c in ("example_id", "input_ids", "score_start", "score_end")}
    texts = [columns["text"][i] for i in rows]
    order = np.random.default_rng([cfg.run.seed, 4099]).permutation(len(ids))
    n_seen = int(round(cfg.attack.relearn_forget_fraction * len(ids)))
    seen = sorted(ids[i] for i in order[:n_seen])
    held = sorted(set(ids) - set(seen))
    t = forget_table.set_index("example_id").loc[ids]
    form = cfg.metrics.exposure
    return attacks.RequestSets(ids, seen, held, data, sub, t[f"exposure_{form}_original"].to_numpy(),
                               t[f"exposure_{form}_oracle"].to_numpy(), texts)


def attack_request(ctx: Context, r: dict, sets: attacks.RequestSets, columns: dict, tok) -> dict:
    """Relearning (retain, forget fraction) and quantization of one unlearned request, with θᵣ as the yardstick."""
    cfg, acc = ctx.cfg, ctx.acc
    a, m = cfg.attack, cfg.metrics
    pad = tok.pad_token_id or 0
    out_dir = ctx.run_dir / "attacks" / r["request"]
    unlearned = load_pretrained(str(ctx.run_dir / "unlearn" / r["request"] / "model_unlearned"), cfg.model.dtype)
    # No-oracle mode (train.oracle=false): no θᵣ to attack; the held-out-reference e_r is the (unattacked) baseline
    oracle = load_trained(ctx.run_dir, "oracle", cfg.model.dtype) if cfg.train.oracle else None
    if oracle is None:
        print(f"[attack] {r['request']}: no oracle (train.oracle=false): the θr baseline is skipped; recovered shares "
              "are measured against the held-out-reference e_r, and MIA AUC / PrivLeak under θr are not available",
              flush=True)
    original = load_trained(ctx.run_dir, "original", cfg.model.dtype)
    row_of = {e: i for i, e in enumerate(columns["example_id"])}
    retain = [i for i, s in enumerate(columns["split"]) if s == "retain"]
    seen = [row_of[e] for e in sets.seen]
    res = {"request": r["request"], "kind": r["kind"], "repetitions": r["repetitions"],
           "replicate": r.get("replicate", 0), "n_examples": len(sets.example_ids), "n_seen": len(sets.seen),
           "n_held_out": len(sets.held_out), "gap_bits": float(np.mean(sets.e_0 - sets.e_r)),
           "baseline": "oracle" if oracle is not None else "held_out_references"}
    curves = []
    for variant, rows in (("retain", retain), ("forget_fraction", seen)):
        ids = [columns["input_ids"][i] for i in rows]
        spans = [(columns["score_start"][i], columns["score_end"][i]) for i in rows]
        per = {}
        for start, model in (("unlearned", unlearned), ("oracle", oracle)):
            if model is None:
                continue
            c = attacks.relearning_curve(acc, model, sets, ids, spans, cfg, pad)
            per[start] = c
            curves.append(c.drop(columns="exposures").assign(variant=variant, start=start))
        last_u = per["unlearned"].iloc[-1]
        base = per["oracle"].iloc[-1].exposures if oracle is not None else sets.e_r
        share = attacks.recovered_share(last_u.exposures, base, sets.e_0, sets.e_r, m.n_boot, cfg.run.seed, m.alpha)
        held = np.isin(sets.example_ids, sets.held_out)
        held_share = (attacks.recovered_share(last_u.exposures[held], base[held], sets.e_0[held],
                                              sets.e_r[held], m.n_boot, cfg.run.seed, m.alpha)
                      if variant == "forget_fraction" and held.any() else None)
        res[f"relearn_{variant}"] = {**share, "held_out": held_share, "steps": a.relearn_steps}
    with_oracle = {"oracle": oracle} if oracle is not None else {}
    res["quantization"] = quantization(ctx, sets, {"unlearned": unlearned, "original": original, **with_oracle}, pad)
    res["mia"] = membership(ctx, sets, {"original": original, "unlearned": unlearned, **with_oracle}, pad)
    # request-parallel: each process writes the requests it ran; result.json last marks the request done
    write_parquet(out_dir / "relearning.parquet", pd.concat(curves, ignore_index=True))
    write_json(out_dir / "result.json", {**res, "fingerprint": stage_fingerprint(cfg, NAME)})
    return res


def quantization(ctx: Context, sets: attacks.RequestSets, models: dict, pad: int) -> dict:
    """Exposure and UQ after weight-only quantization of the unlearned model, θ₀ and θᵣ quantized the same way."""
    from unlearnbench.quantize import quantize_model

    cfg, acc, m = ctx.cfg, ctx.acc, ctx.cfg.metrics
    e_t = attacks.exposure_of(acc, models["unlearned"], sets, m.loss, m.exposure, cfg.score.batch_size, pad)
    out = {"none": attacks.recovered_share(e_t, sets.e_r, sets.e_0, sets.e_r, m.n_boot, cfg.run.seed, m.alpha)}
    for bits in cfg.attack.quant_bits:
        try:
            e = {name: attacks.exposure_of(acc, quantize_model(model, bits), sets, m.loss, m.exposure,
                                          cfg.score.batch_size, pad) for name, model in models.items()}
        except UserError as exc:
            out[f"int{bits}"] = {"error": str(exc)}
            continue
        e_r = e.get("oracle", sets.e_r)  # no oracle: the held-out-reference e_r, unquantized
        uq = metrics.unlearning_quality(e["unlearned"], e["original"], e_r, m.uq_min_gap_bits).uq
        share = attacks.recovered_share(e["unlearned"], e_r, sets.e_0, sets.e_r, m.n_boot, cfg.run.seed, m.alpha)
        out[f"int{bits}"] = {"uq": float(uq), **share, "exposure_unlearned_mean": float(e["unlearned"].mean()),
                             "exposure_original_mean": float(e["original"].mean()),
                             "exposure_oracle_mean": float(e_r.mean())}
    return out


def membership(ctx: Context, sets: attacks.RequestSets, models: dict, pad: int) -> dict:
    """AUC of the request's examples (members) against its references (non-members) for four attacks under each
    model, from one token-level pass per model; PrivLeak relative to θᵣ."""
    from unlearnbench.metrics import mia
    from unlearnbench.scoring import token_score_pass

    cfg, acc = ctx.cfg, ctx.acc
    k = cfg.attack.mia_k
    text_of = dict(zip(sets.data["example_id"], sets.texts))
    out: dict = {}
    member = sets.meta.example_id.isin(sets.example_ids).to_numpy()
    for name, model in models.items():
        tok = token_score_pass(acc, model, sets.data, cfg.score.batch_size, pad, local=True)
        tok = sets.meta[["example_id"]].merge(tok, on="example_id")
        scores = {
            "loss": mia.loss_score(tok.nll.to_numpy()),
            "zlib": mia.zlib_score(tok.nll_sum.to_numpy(), [text_of[e] for e in tok.example_id]),
            "min_k": mia.min_k(list(tok.token_logp), k),
            "min_k_pp": mia.min_k_plus_plus(list(tok.token_logp), list(tok.token_mu), list(tok.token_sigma), k)}
        out[name] = {att: float(mia.auc(s[member], s[~member])) for att, s in scores.items()}
    if "oracle" not in out:  # no-oracle mode: no AUC under θᵣ, so no PrivLeak (same keys, null values)
        out["oracle"] = {att: None for att in out["unlearned"]}
    out["priv_leak"] = {att: (float(mia.priv_leak(out["unlearned"][att], out["oracle"][att]))
                              if out["oracle"][att] is not None else None) for att in out["oracle"]}
    return out


def run(ctx: Context) -> None:
    """Every selected request's attacks, then attacks/summary.json with F4."""
    require(ctx, "unlearn")
    if not should_run(ctx, NAME):
        return
    cfg, acc = ctx.cfg, ctx.acc
    if not cfg.attack.enabled:
        acc.print("[attack] attack.enabled=false: skipping the attacks")
        finish_stage(ctx, NAME, {"skipped": True})
        return
    if zero_stage(acc) > 0 or "FSDP" in str(acc.distributed_type):
        raise UserError("The attack stage runs each request on one device, but this launch shards the model (DeepSpeed "
                        "ZeRO or FSDP). Run `unlearnbench attack` with a DDP or single-device accelerate config, or "
                        "set attack.enabled=false.")
    clear_outputs(ctx, NAME)
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    subset = eval_subset(examples)
    columns = examples.select_columns(["example_id", "input_ids", "score_start", "score_end", "split", "text"]).to_dict()
    meta = subset.select_columns(["example_id", "kind", "split"]).to_pandas()
    forget_table = pd.read_parquet(ctx.run_dir / "scores" / "examples.parquet")
    summary = read_json(ctx.run_dir / "summary.json")
    results = [read_json(ctx.run_dir / "unlearn" / g["request"] / "result.json") for g in summary["groups"]]
    trk = open_tracker(ctx, NAME, writer=True)
    mine = selected(cfg, results)[acc.process_index::acc.num_processes]
    fingerprint = stage_fingerprint(cfg, NAME)
    for r in mine:
        done = ctx.run_dir / "attacks" / r["request"] / "result.json"
        if done.exists() and read_json(done).get("fingerprint") == fingerprint:  # finished for this config
            print(f"[attack] {r['request']}: already done, skipping", flush=True)
            continue
        model_dir = ctx.run_dir / "unlearn" / r["request"] / "model_unlearned"
        if r.get("outcome") != "unlearned" or r.get("nothing_to_forget") or not (model_dir / "config.json").exists():
            why = ("it had nothing to forget" if r.get("nothing_to_forget") else
                   f"it never became unlearned (outcome {r.get('outcome')})" if r.get("outcome") != "unlearned" else
                   f"no model saved at its unlearned step ({model_dir}; set unlearn.save_unlearned=true)")
            print(f"[attack] {r['request']}: skipped, {why}", flush=True)
            continue
        ids = list(pd.read_parquet(ctx.run_dir / "unlearn" / r["request"] / "examples.parquet").example_id)
        res = attack_request(ctx, r, request_sets(cfg, ids, columns, meta, forget_table), columns, tok)
        trk.log({f"attack/{r['request']}/relearn_{v}": res[f"relearn_{v}"]["recovered"]
                 for v in ("retain", "forget_fraction")}, request=r["request"])
        print(f"[attack] {r['request']}: recovered after {cfg.attack.relearn_steps} relearning steps "
              f"{res['relearn_forget_fraction']['recovered']:+.2f} (forget fraction), "
              f"{res['relearn_retain']['recovered']:+.2f} (retain); " +
              ", ".join(f"{q}: {v['recovered']:+.2f}" for q, v in res["quantization"].items() if "recovered" in v),
              flush=True)
    acc.wait_for_everyone()
    all_results = [read_json(p) for p in sorted((ctx.run_dir / "attacks").glob("*/result.json"))]
    if ctx.is_main:
        summary_doc = {"requests": all_results, "findings": {"F4": finding_f4(all_results, cfg.metrics.alpha)}}
        write_json(ctx.run_dir / "attacks" / "summary.json", summary_doc)
        add_to_run_summary(ctx, summary_doc)
        log_attacks(trk, ctx, all_results)
        trk.summary({f"findings/F4/{k}": v for k, v in summary_doc["findings"]["F4"].items() if isinstance(v, str)})
    trk.finish()
    acc.wait_for_everyone()
    finish_stage(ctx, NAME, {"requests": len(all_results), **peak_memory_mib()})


# ----------------------------------------------------------------------------------------------- views


def attack_columns(res: dict) -> dict:
    """One request's attack results as flat columns (for summary.json's groups and the trackers): recovered share
    after relearning (retain, forget fraction, its held-out part) and quantization, MIA AUC under θ₀ (`original`),
    the unlearned model and θᵣ (`oracle`), PrivLeak."""
    out: dict = {}
    for v in ("retain", "forget_fraction"):
        r = res.get(f"relearn_{v}") or {}
        out.update({f"attack_relearn_{v}_{k}": r.get(k) for k in ("recovered", "lo", "hi")})
        if v == "forget_fraction":
            out["attack_relearn_held_out_recovered"] = (r.get("held_out") or {}).get("recovered")
    for q, v in (res.get("quantization") or {}).items():
        if "recovered" in v:
            out[f"attack_quant_{q}_recovered"] = v["recovered"]
        if "uq" in v:
            out[f"attack_quant_{q}_uq"] = v["uq"]
    mia = res.get("mia") or {}
    for model in ("original", "unlearned", "oracle"):
        out.update({f"attack_mia_{att}_auc_{model}": auc for att, auc in (mia.get(model) or {}).items()})
    out.update({f"attack_mia_{att}_priv_leak": v for att, v in (mia.get("priv_leak") or {}).items()})
    return out


def attack_tables(results: list[dict]) -> dict[str, pd.DataFrame]:
    """A table per attack, one row per request (and variant, quantization, MIA attack)."""
    relearn, quant, mia = [], [], []
    for r in results:
        key = {"request": r["request"], "kind": r["kind"], "repetitions": r["repetitions"]}
        for v in ("retain", "forget_fraction"):
            x = r[f"relearn_{v}"]
            relearn.append({**key, "variant": v, "steps": x.get("steps"), "recovered": x["recovered"], "lo": x["lo"],
                            "hi": x["hi"], "held_out_recovered": (x.get("held_out") or {}).get("recovered")})
        for q, x in r["quantization"].items():
            quant.append({**key, "quantization": q, "uq": x.get("uq"), "recovered": x.get("recovered"),
                          "lo": x.get("lo"), "hi": x.get("hi"), "error": x.get("error")})
        for att in r["mia"]["oracle"]:
            aucs = {f"auc_{m}": r["mia"][m][att] for m in ("original", "unlearned", "oracle")}
            mia.append({**key, "attack": att, **aucs, "priv_leak": r["mia"]["priv_leak"][att]})
    return {"relearning": pd.DataFrame(relearn), "quantization": pd.DataFrame(quant), "mia": pd.DataFrame(mia)}


def relearning_records(run_dir, res: dict) -> list[tuple[int, dict]]:
    """The relearning curves of one request, per step: mean exposure (and of the held-out part) of each variant
    from the unlearned model and from θᵣ, and the share recovered at that step (its last step is the result's)."""
    curve = pd.read_parquet(run_dir / "attacks" / res["request"] / "relearning.parquet")
    base, out = f"attack/relearn/{res['request']}", []
    gap = res["gap_bits"]
    for step, at in curve.groupby("step", sort=True):
        rec = {}
        for row in at.itertuples(index=False):
            rec[f"{base}/{row.variant}/{row.start}/exposure_mean"] = row.exposure_mean
            rec[f"{base}/{row.variant}/{row.start}/exposure_held_out_mean"] = row.exposure_held_out_mean
        for v in sorted(set(at.variant)):
            u, o = rec.get(f"{base}/{v}/unlearned/exposure_mean"), rec.get(f"{base}/{v}/oracle/exposure_mean")
            if u is not None and o is not None:
                rec[f"{base}/{v}/recovered"] = (u - o) / gap if gap > 0 else float("nan")
        out.append((int(step), rec))
    return out


def log_attacks(trk, ctx: Context, results: list[dict]) -> None:
    """The relearning curves on their own step axis (`attack/step`), a table per attack, and each request's
    columns as summary values."""
    trk.define_step("attack/step", "attack/relearn")
    for res in results:
        for step, rec in relearning_records(ctx.run_dir, res):
            trk.log(rec, **{"attack/step": step}, request=res["request"])
    if results:
        for name, table in attack_tables(results).items():
            trk.log_table(f"attack/{name}", table)
    trk.summary({f"attack/{r['request']}/{k}": v for r in results for k, v in attack_columns(r).items()
                 if v is not None})


def add_to_run_summary(ctx: Context, summary_doc: dict) -> None:
    """The attack columns in the run's summary.json: each attacked request's group row gets `attack_*` columns
    (`attacked` says which rows have them) and an `attacks` block holds the settings and F4. The unlearn stage's
    record is amended to the new file, so the rewrite is not mistaken for damage."""
    from unlearnbench.rundir import amend_record

    path = ctx.run_dir / "summary.json"
    summary = read_json(path)
    by_request = {r["request"]: attack_columns(r) for r in summary_doc["requests"]}
    for g in summary.get("groups", []):
        for k in [k for k in g if k.startswith("attack_")]:
            del g[k]
        g["attacked"] = g["request"] in by_request
        g.update(by_request.get(g["request"], {}))
    a = ctx.cfg.attack
    summary["attacks"] = {"requests": sorted(by_request), "selection": a.requests, "relearn_steps": a.relearn_steps,
                          "relearn_lr": a.relearn_lr, "quant_bits": list(a.quant_bits),
                          "findings": summary_doc["findings"]}
    write_json(path, summary)
    amend_record(ctx.run_dir, "unlearn", "summary.json")
