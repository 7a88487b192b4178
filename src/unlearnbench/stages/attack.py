"""The attack stage: does forgetting last? For each unlearned request (from the model saved at the step it became
unlearned), relearning (k fine-tuning steps on retain data, and on part of its own forget examples), weight-only
quantization reload, and membership inference (LOSS, zlib, Min-K%, Min-K%++ under θ₀, the unlearned model and θᵣ).
Everything is measured against the oracle θᵣ attacked the same way. Writes only under `attacks/`:
`attacks/<request>/` and `attacks/summary.json` (the attacked requests' results, the skipped ones with the reason,
the settings); the report stage decides F4 from them and shows them.

A request that never became unlearned is skipped, and the reason printed and kept; a quantization backend this
platform lacks is one message, and the other attacks go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from unlearnbench import attacks, metrics
from unlearnbench.config import Config
from unlearnbench.data.build import load_examples, load_tokenizer
from unlearnbench.distributed import is_sharded, peak_memory_mib
from unlearnbench.errors import UserError
from unlearnbench.evaluation import eval_subset
from unlearnbench.io import read_json, write_json, write_parquet
from unlearnbench.models import load_pretrained, load_trained
from unlearnbench.records import clear_outputs, finish_stage, require, should_run, stage_fingerprint
from unlearnbench.results import load_requests
from unlearnbench.rundir import Context
from unlearnbench.run_summary import attack_columns, attack_summary
from unlearnbench.tracking import open_tracker

NAME = "attack"


def selected(cfg: Config, results: list[dict]) -> list[dict]:
    """The requests the attacks run on: all, or only those of the highest repetitions (`attack.requests`)."""
    if cfg.attack.requests == "max_repetitions":
        top = max(int(r["repetitions"]) for r in results)
        return [r for r in results if int(r["repetitions"]) == top]
    return list(results)


def request_sets(cfg: Config, ids: list[str], columns: dict, meta: pd.DataFrame,
                 forget_scores: pd.DataFrame) -> attacks.RequestSets:
    """The request's examples and its kind's references as plain lists, and its seen / held-out split."""
    kinds = set(forget_scores.set_index("example_id").loc[ids, "kind"])
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
    forget_scores = forget_scores.set_index("example_id").loc[ids]  # the request's rows
    form = cfg.metrics.exposure
    return attacks.RequestSets(ids, seen, held, data, sub, forget_scores[f"exposure_{form}_original"].to_numpy(),
                               forget_scores[f"exposure_{form}_oracle"].to_numpy(), texts)


def kinds_of(forget_scores: pd.DataFrame, ids: list[str]) -> tuple[str, ...]:
    """The kinds a request's examples are of (one for the built-in requests)."""
    return tuple(sorted(set(forget_scores.set_index("example_id").loc[ids, "kind"])))


def assign(requests: list[dict], kinds: dict[str, tuple], n: int, rank: int,
           weights: dict[str, float] | None = None) -> list[dict]:
    """The attacked requests one process runs (job-parallel: each process runs whole requests): the requests sorted
    by kind, cut into `n` contiguous runs of near-equal total weight (`weights`: a request's cost, e.g. the tokens each of its scoring
    passes reads; 1 each by default), so that a process meets as few kinds as possible (each kind's θ₀/θᵣ work is
    done once per process that meets it: `Baselines`). Every request goes to exactly one process."""
    order = sorted(requests, key=lambda r: (kinds[r["request"]], r["request"]))
    w = np.array([float((weights or {}).get(r["request"], 1.0)) for r in order])
    cum = np.concatenate([[0.0], np.cumsum(w)])
    # cut k sits where the running weight comes closest to k/n of the total (ties to the earlier cut)
    cuts = [0] + [int(np.argmin(np.abs(cum - cum[-1] * k / n))) for k in range(1, n)] + [len(order)]
    cuts = list(np.maximum.accumulate(cuts))
    return order[cuts[rank]:cuts[rank + 1]]


@dataclass
class Baselines:
    """The attack work on θ₀ and θᵣ, which is the same for every attacked request of one kind: θᵣ relearned on
    retain data, θ₀ and θᵣ after quantization, their membership-inference scores. Measured once (per process) on
    the union of the kind's attacked requests and its references, then read per request: an example's exposure
    depends only on its own loss and its kind's references, so the union gives each request the numbers its own
    pass would (up to float rounding in the batching)."""

    sets: attacks.RequestSets  # the union: every attacked request of these kinds, and their references
    oracle_retain: list[tuple[int, np.ndarray]]  # θᵣ relearned on retain data: (step, exposures of sets.example_ids)
    quant: dict[int, dict[str, np.ndarray] | str]  # bits -> {"original": e, "oracle": e}, or why it failed
    mia: dict[str, pd.DataFrame]  # model -> membership scores of every row of sets.data

    @cached_property
    def _position(self) -> dict[str, int]:
        return {x: i for i, x in enumerate(self.sets.example_ids)}

    def take(self, e: np.ndarray, ids: list[str]) -> np.ndarray:
        """The exposures of a request's examples out of an array over the union."""
        return e[[self._position[x] for x in ids]]


class Attacker:
    """Runs the attacks of one process's requests; loads θ₀ / θᵣ once and keeps each kind's `Baselines`."""

    def __init__(self, ctx: Context, columns: dict, meta: pd.DataFrame, forget_scores: pd.DataFrame, tok,
                 unions: dict[tuple, list[str]]):
        self.ctx, self.columns, self.meta, self.forget_scores = ctx, columns, meta, forget_scores
        self.pad, self.unions, self._baselines = tok.pad_token_id or 0, unions, {}
        self.row_of = {e: i for i, e in enumerate(columns["example_id"])}
        self.retain = [i for i, s in enumerate(columns["split"]) if s == "retain"]
        cfg = ctx.cfg
        self.original = load_trained(ctx.run_dir, "original", cfg.model.dtype)
        # No-oracle mode (train.oracle=false): no θᵣ to attack; the held-out-reference e_r is the (unattacked) baseline
        self.oracle = load_trained(ctx.run_dir, "oracle", cfg.model.dtype) if cfg.train.oracle else None

    def rows(self, rows: list[int]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        c = self.columns
        return [c["input_ids"][i] for i in rows], [(c["score_start"][i], c["score_end"][i]) for i in rows]

    @property
    def ends(self) -> dict:
        """θ₀ and (unless in no-oracle mode) θᵣ, by name."""
        return {"original": self.original, **({"oracle": self.oracle} if self.oracle is not None else {})}

    def baselines(self, kinds: tuple) -> Baselines:
        """This kind's θ₀ / θᵣ work, computed the first time a request of it comes."""
        if kinds not in self._baselines:
            cfg, acc = self.ctx.cfg, self.ctx.acc
            sets = request_sets(cfg, self.unions[kinds], self.columns, self.meta, self.forget_scores)
            retain = []
            if self.oracle is not None:
                c = attacks.relearning_curve(acc, self.oracle, sets, *self.rows(self.retain), cfg, self.pad)
                retain = [(int(s), e) for s, e in zip(c.step, c.exposures)]
            quant = {}
            for bits in cfg.attack.quant_bits:
                try:
                    quant[bits] = {name: self._quantized_exposures(model, bits, sets)
                                   for name, model in self.ends.items()}
                except UserError as exc:
                    quant[bits] = str(exc)
            mia = {name: attacks.mia_scores(acc, model, sets, cfg.attack.mia_k, cfg.score.batch_size, self.pad,
                                            cfg.score.batch_tokens)
                   for name, model in self.ends.items()}
            self._baselines[kinds] = Baselines(sets, retain, quant, mia)
        return self._baselines[kinds]

    def _quantized_exposures(self, model, bits: int, sets: attacks.RequestSets) -> np.ndarray:
        from unlearnbench.quantize import quantize_model

        cfg, m = self.ctx.cfg, self.ctx.cfg.metrics
        return attacks.exposure_of(self.ctx.acc, quantize_model(model, bits), sets, m.loss, m.exposure,
                                   cfg.score.batch_size, self.pad, cfg.score.batch_tokens)

    def request(self, r: dict, sets: attacks.RequestSets, kinds: tuple) -> dict:
        """Relearning (retain, forget fraction), quantization and membership inference of one unlearned request,
        with θᵣ as the yardstick."""
        ctx = self.ctx
        cfg, acc, a, m = ctx.cfg, ctx.acc, ctx.cfg.attack, ctx.cfg.metrics
        out_dir = ctx.run_dir / "attacks" / r["request"]
        if self.oracle is None:
            print(f"[attack] {r['request']}: no oracle (train.oracle=false): the θr baseline is skipped; recovered "
                  "shares are measured against the held-out-reference e_r, and MIA AUC / PrivLeak under θr are not "
                  "available", flush=True)
        base = self.baselines(kinds)
        unlearned = load_pretrained(str(ctx.run_dir / "unlearn" / r["request"] / "model_unlearned"), cfg.model.dtype)
        e_u = attacks.exposure_of(acc, unlearned, sets, m.loss, m.exposure, cfg.score.batch_size, self.pad,
                                  cfg.score.batch_tokens)
        held = np.isin(sets.example_ids, sets.held_out)
        res = {"request": r["request"], "kind": r["kind"], "repetitions": r["repetitions"],
               "group": r.get("group", 0), "n_examples": len(sets.example_ids), "n_seen": len(sets.seen),
               "n_held_out": len(sets.held_out), "gap_bits": float(np.mean(sets.e_0 - sets.e_r)),
               "baseline": "oracle" if self.oracle is not None else "held_out_references"}
        curves = []
        for variant, rows in (("retain", self.retain), ("forget_fraction", [self.row_of[e] for e in sets.seen])):
            per = {"unlearned": attacks.relearning_curve(acc, unlearned, sets, *self.rows(rows), cfg, self.pad,
                                                         start_exposures=e_u)}
            if self.oracle is not None and variant == "retain":  # the same for every request of the kind
                per["oracle"] = pd.DataFrame([attacks.curve_row(s, base.take(e, sets.example_ids), held)
                                              for s, e in base.oracle_retain])
            elif self.oracle is not None:
                per["oracle"] = attacks.relearning_curve(acc, self.oracle, sets, *self.rows(rows), cfg, self.pad,
                                                         start_exposures=base.take(base.oracle_retain[0][1],
                                                                                   sets.example_ids))
            curves += [c.drop(columns="exposures").assign(variant=variant, start=start) for start, c in per.items()]
            last_u = per["unlearned"].iloc[-1]
            b = per["oracle"].iloc[-1].exposures if self.oracle is not None else sets.e_r
            share = attacks.recovered_share(last_u.exposures, b, sets.e_0, sets.e_r, m.n_boot, cfg.run.seed, m.alpha)
            held_share = (attacks.recovered_share(last_u.exposures[held], b[held], sets.e_0[held], sets.e_r[held],
                                                  m.n_boot, cfg.run.seed, m.alpha)
                          if variant == "forget_fraction" and held.any() else None)
            res[f"relearn_{variant}"] = {**share, "held_out": held_share, "steps": a.relearn_steps}
        res["quantization"] = self.quantization(sets, base, unlearned, e_u)
        res["mia"] = self.membership(sets, base, unlearned)
        # job-parallel: each process writes the requests it ran; result.json last marks the request done
        write_parquet(out_dir / "relearning.parquet", pd.concat(curves, ignore_index=True))
        write_json(out_dir / "result.json", {**res, "fingerprint": stage_fingerprint(cfg, NAME)})
        return res

    def quantization(self, sets: attacks.RequestSets, base: Baselines, unlearned, e_u: np.ndarray) -> dict:
        """Exposure and UQ after weight-only quantization of the unlearned model, θ₀ and θᵣ quantized the same
        way (`base`); `none` is the unquantized unlearned model (`e_u`)."""
        cfg, m = self.ctx.cfg, self.ctx.cfg.metrics
        out = {"none": attacks.recovered_share(e_u, sets.e_r, sets.e_0, sets.e_r, m.n_boot, cfg.run.seed, m.alpha)}
        for bits in cfg.attack.quant_bits:
            ends = base.quant[bits]
            if isinstance(ends, str):
                out[f"int{bits}"] = {"error": ends}
                continue
            try:
                e = {"unlearned": self._quantized_exposures(unlearned, bits, sets),
                     **{name: base.take(x, sets.example_ids) for name, x in ends.items()}}
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

    def membership(self, sets: attacks.RequestSets, base: Baselines, unlearned) -> dict:
        """AUC of the request's examples (members) against its references (non-members) for four attacks under
        each model (θ₀ and θᵣ from `base`), one token-level pass for the unlearned model; PrivLeak relative to θᵣ."""
        from unlearnbench.metrics import mia

        cfg = self.ctx.cfg
        refs = list(sets.meta.example_id[sets.meta.split == "reference"])
        scores = {"original": base.mia["original"],
                  "unlearned": attacks.mia_scores(self.ctx.acc, unlearned, sets, cfg.attack.mia_k,
                                                  cfg.score.batch_size, self.pad, cfg.score.batch_tokens),
                  **({"oracle": base.mia["oracle"]} if "oracle" in base.mia else {})}
        out: dict = {name: attacks.mia_aucs(s, sets.example_ids, refs) for name, s in scores.items()}
        if "oracle" not in out:  # no-oracle mode: no AUC under θᵣ, so no PrivLeak (same keys, null values)
            out["oracle"] = {att: None for att in out["unlearned"]}
        out["priv_leak"] = {att: (float(mia.priv_leak(out["unlearned"][att], out["oracle"][att]))
                                  if out["oracle"][att] is not None else None) for att in out["oracle"]}
        return out


def run(ctx: Context) -> None:
    """Every selected request's attacks, then attacks/summary.json."""
    require(ctx, "unlearn")
    if not should_run(ctx, NAME):
        return
    cfg, acc = ctx.cfg, ctx.acc
    if not cfg.attack.enabled:
        acc.print("[attack] attack.enabled=false: skipping the attacks")
        clear_outputs(ctx, NAME)  # --force: no earlier attack results stay behind to be reported
        finish_stage(ctx, NAME, {"skipped": True})
        return
    if is_sharded(acc):
        raise UserError("The attack stage runs each request on one device, but this launch shards the model (DeepSpeed "
                        "ZeRO or FSDP). Run `unlearnbench attack` with a DDP or single-device accelerate config, or "
                        "set attack.enabled=false.")
    results = load_requests(ctx.run_dir)  # before anything is removed: an old run directory is refused here
    clear_outputs(ctx, NAME)
    examples = load_examples(ctx.run_dir / "data")
    tok = load_tokenizer(ctx.run_dir / "data")
    subset = eval_subset(examples)
    columns = examples.select_columns(["example_id", "input_ids", "score_start", "score_end", "split", "text"]).to_dict()
    meta = subset.select_columns(["example_id", "kind", "split"]).to_pandas()
    forget_scores = pd.read_parquet(ctx.run_dir / "scores" / "forget.parquet")
    trk = open_tracker(ctx, NAME, job_parallel=True)
    todo, ids_of, skipped = [], {}, []
    for r in selected(cfg, results):
        model_dir = ctx.run_dir / "unlearn" / r["request"] / "model_unlearned"
        if r.get("outcome") != "unlearned" or r.get("nothing_to_forget") or not (model_dir / "config.json").exists():
            why = ("it had nothing to forget" if r.get("nothing_to_forget") else
                   f"it never became unlearned (outcome {r.get('outcome')})" if r.get("outcome") != "unlearned" else
                   f"no model saved at its unlearned step ({model_dir}; set unlearn.save_unlearned=true)")
            acc.print(f"[attack] {r['request']}: skipped, {why}")
            skipped.append({"request": r["request"], "kind": r["kind"], "repetitions": r["repetitions"],
                            "group": r.get("group", 0), "reason": why})
            continue
        todo.append(r)
        ids_of[r["request"]] = list(pd.read_parquet(ctx.run_dir / "unlearn" / r["request"] / "forgetting.parquet")
                                    .example_id)
    kinds = {name: kinds_of(forget_scores, ids) for name, ids in ids_of.items()}
    unions: dict[tuple, list[str]] = {}
    for r in todo:  # every attacked request of a kind, whichever process runs it: the same union in any layout
        unions.setdefault(kinds[r["request"]], []).extend(ids_of[r["request"]])
    fingerprint = stage_fingerprint(cfg, NAME)
    attacker = None
    # a request's passes each read its examples and its kind's references: their tokens weigh the assignment
    n_tokens = dict(zip(columns["example_id"], map(len, columns["input_ids"])))
    ref_tokens = meta[meta.split == "reference"].groupby("kind").example_id.agg(lambda e: sum(n_tokens[x] for x in e))
    weight = {n: sum(n_tokens[x] for x in ids) + sum(ref_tokens.get(k, 0) for k in kinds[n]) for n, ids in ids_of.items()}
    for r in assign(todo, kinds, acc.num_processes, acc.process_index, weight):
        done = ctx.run_dir / "attacks" / r["request"] / "result.json"
        if done.exists() and read_json(done).get("fingerprint") == fingerprint:  # finished for this config
            print(f"[attack] {r['request']}: already done, skipping", flush=True)
            continue
        attacker = attacker or Attacker(ctx, columns, meta, forget_scores, tok, unions)
        res = attacker.request(r, request_sets(cfg, ids_of[r["request"]], columns, meta, forget_scores),
                               kinds[r["request"]])
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
        write_json(ctx.run_dir / "attacks" / "summary.json", attack_summary(cfg, all_results, skipped))
        log_attacks(trk, ctx, all_results)
    trk.finish()
    acc.wait_for_everyone()
    finish_stage(ctx, NAME, {"requests": len(all_results), **peak_memory_mib()})


# ----------------------------------------------------------------------------------------------- views


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
