"""The markdown of one run's report (`report/report.md`) from its merged summary: the request table per kind and
repetitions, the findings with their numbers, the example-level view, the attacks, the cost and the figures; and the
findings block the report stage prints.
"""

from __future__ import annotations


from unlearnbench.reporting.style import FIGURES, kind_key, mean, num, request_cells
from unlearnbench.results import outcome_counts

G3 = "{:.3g}"


def _outcomes(gs: list[dict]) -> str:
    """How the cell's requests ended (`results.outcome_counts`): u unlearned, c censored, x collapsed, n nothing to
    forget."""
    letter = {"unlearned": "u", "collapsed": "x", "nothing_to_forget": "n"}
    counts = {"u": 0, "c": 0, "x": 0, "n": 0}
    for outcome, n in outcome_counts(gs).items():
        counts[letter.get(outcome, "c")] += n
    return " ".join(f"{v}{k}" for k, v in counts.items() if v) or "–"


def cell_table(summary: dict) -> list[str]:
    """Markdown table per (kind, repetitions); cells with several requests show means."""
    lines = ["| kind | reps | requests | examples | outcomes | steps to unlearn | utility drop there | final UQ "
             "| max UQ | exposure θ0 (bits) | exposure θr (bits) | steps to forget | censored | memorization "
             "(nats/tok) | difficulty (nats/tok) | collapsed | nothing to forget |", "|" + "---|" * 17]
    for kind, reps, gs in request_cells(summary["requests"]):
        unlearned = [g for g in gs if g.get("steps_to_unlearn") is not None and not g.get("nothing_to_forget")]
        lines.append(
            f"| {kind} | {reps} | {len(gs)} | {sum(g['n_examples'] for g in gs)} | {_outcomes(gs)} | "
            f"{num(mean(g['steps_to_unlearn'] for g in unlearned), '{:.3g}')} | "
            f"{num(mean(g['utility_drop_at_unlearned'] for g in unlearned), '{:+.1%}')} | "
            f"{num(mean(g['uq_final'] for g in gs))} | {num(mean(g.get('uq_max') for g in gs))} | "
            f"{num(mean(g['exposure_original_mean'] for g in gs))} | "
            f"{num(mean(g['exposure_oracle_mean'] for g in gs))} | "
            f"{num(mean(g['steps_to_forget_mean'] for g in gs), '{:.1f}')} | "
            f"{num(mean(g.get('censored_fraction') for g in gs), '{:.0%}')} | "
            f"{num(mean(g['memorization_mean'] for g in gs), '{:.3f}')} | "
            f"{num(mean(g['difficulty_mean'] for g in gs), '{:.3f}')} | "
            f"{sum(bool(g.get('collapsed')) for g in gs)} | {sum(bool(g.get('nothing_to_forget')) for g in gs)} |")
    return lines


def _interval(e: dict, fmt: str = "{:.3g}") -> str:
    return f"{num(e.get('mean'), fmt)} [{num(e.get('lo'), fmt)}, {num(e.get('hi'), fmt)}]"


def _effect_text(e: dict) -> str:
    """An effect with its interval and what its n counts; F1's step readouts also as a ratio of (1 + steps)."""
    text = f"{_interval(e)}"
    if e.get("ratio") is not None:
        text += f" (×{num(e['ratio'], '{:.2f}')} [{num(e.get('ratio_lo'), '{:.2f}')}, {num(e.get('ratio_hi'), '{:.2f}')}])"
    return text + f", n = {e.get('n', 0)} {e.get('n_unit', 'groups')}"


def _left_out(e: dict) -> str:
    """How many requests each side used, how many were censoring bounds, and what was left out and why."""
    c = e.get("counts") or {}
    out = [f"ID {c.get('id_used', 0)} ({c.get('id_censored', 0)} censored), OOD {c.get('ood_used', 0)} "
           f"({c.get('ood_censored', 0)} censored)"]
    for side in ("id", "ood"):
        for why, n in (c.get(f"{side}_left_out") or {}).items():
            out.append(f"{side.upper()} {n} left out: {why}")
    return "; ".join(out)


def finding_lines(findings: dict) -> list[str]:
    """F1-F4 with their overall verdicts (family-wise: Holm over the cells), each contrast's effect and interval per
    target (unadjusted), what every request became, and F3's Cox models."""
    if not findings:
        return ["No findings: the run has no (kind, repetitions) requests or no forgetting tables."]
    lines = []
    for key, f in findings.items():
        if "statement" not in f:
            continue  # the replicate spread, not a finding
        units = "contrasts" if "contrasts" in f else "kinds"
        lines.append(f"- **{key}: {f['verdict']}**" + (f" ({f['detail']})" if f.get("detail") else "")
                     + f". {f['statement']}. Effect: {f['effect']}. Unit: {f.get('unit_note') or f.get('unit')}. "
                     f"{f.get('family', '')} ({f['holds']} of {f['of']} {units} significant after it).")
        for c in f.get("contrasts", []):
            e = c["by_target"][c["main"]]
            others = "; ".join(f"{t}: {_effect_text(x)} {x['verdict']}" for t, x in c["by_target"].items()
                               if t != c["main"])
            lines.append(f"  - r{c['repetitions']} {c['ood_kind']} vs id: **{c['family_verdict']}** after Holm "
                         f"(p = {num(c['p'], '{:.2g}')}, Holm {num(c.get('p_holm'), '{:.2g}')}); {c['main']}: "
                         f"{_effect_text(e)}, unadjusted {c['verdict']}; {_left_out(e)}"
                         + ("" if c["stable_across_targets"] else "; **depends on target**")
                         + f". Descriptive, unadjusted: {others}")
        for c in f.get("kinds", []):
            m, d = c["cox"]["memorization"], c["cox"]["difficulty"]
            desc = (c.get("pooled_spearman_descriptive") or {}).get("memorization") or {}
            lines.append(f"  - {c['kind']}: **{c['family_verdict']}** after Holm (unadjusted {c['verdict']}, "
                         f"p = {num(c['p'], '{:.2g}')} by the {c.get('test') or 'no'} test"
                         + (f"; {c['reason']}" if c.get("reason") else "") + "); hazard ratio of forgetting per "
                         f"within-request SD of memorization {num(m['hr'], '{:.3g}')} [{num(m.get('hr_lo'), '{:.3g}')}, "
                         f"{num(m.get('hr_hi'), '{:.3g}')}], of difficulty {num(d['hr'], '{:.3g}')} "
                         f"[{num(d.get('hr_lo'), '{:.3g}')}, {num(d.get('hr_hi'), '{:.3g}')}]; n = {c['n']} examples "
                         f"in {c['requests']} requests ({c.get('forgotten_at_start', 0)} forgotten at step 0 left out), "
                         f"{num(c['censored_fraction'], '{:.0%}')} censored"
                         + (f". Descriptive only (pooled over repetitions, confounded): Spearman ρ = "
                            f"{num(desc.get('rho'))} [{num(desc.get('lo'))}, {num(desc.get('hi'))}]" if desc else ""))
        if f.get("excluded_requests"):
            lines.append(f"  - left out (nothing to forget): {', '.join(f['excluded_requests'])}")
    lines += ["", "A contrast's effect is a two-sample one (OOD against ID groups of the same repetitions, never paired "
              "by label), with its 95% interval; with one seed the units are the forget groups of this trained pair, "
              "with several the seeds. The overall verdict controls the family-wise error over the finding's cells "
              "(Holm); per-cell verdicts and the other targets are unadjusted and descriptive. `uq_T`: log(1 + "
              "interpolated steps) to reach UQ T (F1, × its ratio) or log(ppl/ppl_0) there (F2); `auc`: area under the "
              "running maximum of UQ against log(1+step). docs/findings.md says how each is decided."]
    return lines


def attack_lines(results: list[dict], f4: dict | None) -> list[str]:
    """Per attacked request (`results`: their attacks/<request>/result.json): recovered share of the exposure gap
    after each attack (beyond the oracle attacked the same way), MIA AUC under θ₀ / unlearned / θᵣ; then F4."""
    lines = ["| request | relearn on forget part (held-out part) | relearn on retain | no attack | int8 | int4 | LOSS AUC "
             "θ0 / θt / θr | Min-K%++ AUC θ0 / θt / θr |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (kind_key(r["kind"]), r["repetitions"], r["request"])):
        ff, rt = r["relearn_forget_fraction"], r["relearn_retain"]
        held = ff.get("held_out") or {}
        q = r.get("quantization", {})
        mia = r.get("mia", {})

        def auc(att_name):
            return " / ".join(num(mia.get(m, {}).get(att_name)) for m in ("original", "unlearned", "oracle"))
        lines.append(f"| {r['request']} | {_interval(_rec(ff))} ({_interval(_rec(held))}) | {_interval(_rec(rt))} | "
                     f"{_interval(_rec(q.get('none', {})))} | {_interval(_rec(q.get('int8', {})))} | {_interval(_rec(q.get('int4', {})))} | {auc('loss')} | "
                     f"{auc('min_k_pp')} |")
    errors = sorted({v["error"] for r in results for v in r.get("quantization", {}).values()
                     if "error" in v})
    lines += [""] + [f"- quantization unavailable: {e}" for e in errors]
    lines += ["", "Recovered = (ē attacked − ē oracle attacked the same way) / (ē θ0 − ē θr): the share of the original "
              "exposure gap that comes back beyond what an exactly-unlearned model picks up; [95% bootstrap interval "
              "over the request's examples]; \"no attack\": the unlearned model as saved, the level the reloads start from. AUC: "
              "forget examples (members) vs their references (non-members).", ""]
    if any(r.get("baseline") == "held_out_references" for r in results):
        lines += ["No oracle (`train.oracle=false`): θr was not attacked. \"ē oracle attacked\" is replaced by the "
                  "held-out-reference e_r (unattacked), and the AUC and PrivLeak under θr are not available (–).", ""]
    if f4:
        lines += finding_lines({"F4": f4})[:-2]
        lines.append(f"  - requests the attack stage skipped: {f4.get('skipped', 0)}; without an oracle baseline: "
                     f"{f4.get('excluded_without_oracle', 0)} (counted in each contrast's left-out requests)")
    return lines


def _rec(d: dict) -> dict:
    return {"mean": d.get("recovered"), "lo": d.get("lo"), "hi": d.get("hi")}


def cost_lines(summary: dict) -> list[str]:
    """Wall time, device-seconds, peak memory and estimated FLOPs (train: 6·N per trained token; score: 2·N per
    computed token slot) per stage; estimated FLOPs and device-seconds per request."""
    cost = summary["cost"]
    lines = ["| stage | wall s | device-s | peak memory MiB | est. FLOPs |", "|---|---|---|---|---|"]
    for stage, c in cost.get("stages", {}).items():
        lines.append(f"| {stage} | {num(c.get('seconds'), '{:.1f}')} | {num(c.get('device_seconds'), '{:.1f}')} | "
                     f"{num(c.get('peak_memory_mib'), '{:.0f}')} | {num(c.get('flops'), '{:.3g}')} |")
    lines += ["", "| request | outcome | steps | wall s | eval share | est. FLOPs | device-s |", "|---|---|---|---|---|---|---|"]
    for g in summary["requests"]:
        lines.append(f"| {g['request']} | {g.get('outcome')} | {g.get('steps_run')} | {num(g.get('wall_seconds'), '{:.1f}')} | "
                     f"{num(g.get('eval_share'), '{:.0%}')} | {num(g.get('flops'), '{:.3g}')} | "
                     f"{num(g.get('device_seconds'), '{:.1f}')} |")
    r = cost.get("unlearn_requests", {})
    lines += ["", f"All requests: {num(r.get('flops'), '{:.3g}')} FLOPs (6·N per trained token, 2·N per scored "
              f"token), {num(r.get('device_seconds'), '{:.0f}')} device-seconds."]
    return lines


def survival_lines(surv: dict) -> list[str]:
    """The example-level view: median steps to forget per cell and the log-rank tests OOD vs ID."""
    if not surv:
        return []
    lines = ["| kind | reps | examples | forgotten | median steps to forget |", "|---|---|---|---|---|"]
    for c in sorted(surv["kaplan_meier"], key=lambda c: (kind_key(c["kind"]), c["repetitions"])):
        lines.append(f"| {c['kind']} | {c['repetitions']} | {c['n']} | {c['events']} | {num(c['median_steps'], '{:.3g}')} |")
    lines += ["", "Log-rank test of the steps to forget, OOD vs ID at the same repetitions (example-level F1):", ""]
    for t in surv["logrank"]:
        lines.append(f"- {t['repetitions']} repetitions, {t['ood_kind']} vs id: median {num(t['median_ood'], '{:.3g}')} "
                     f"vs {num(t['median_id'], '{:.3g}')} steps, χ² = {num(t['statistic'])}, p = {num(t['p'], '{:.2g}')}")
    return lines


def e_r_line(summary: dict) -> str:
    """Which e_r the run's UQ, forgotten rule and gaps use (`e_r_source` in summary.json)."""
    if summary.get("e_r_source", "oracle") == "held_out_references":
        return ("**e_r source: held-out references (no oracle, `train.oracle=false`).** No θr was trained: e_r of each "
                "example is the mean exposure of its kind's held-out references under θ0, each against the other "
                "references (leave-one-out); the \"θr\" columns below hold that estimate, and memorization and "
                "difficulty (which need θr) are not available.")
    return "e_r source: the oracle θr (retrained without the forget sets)."


def render_markdown(summary: dict, figures: dict[str, str] | None = None,
                    attack_results: list[dict] | None = None) -> str:
    """Markdown of a run's merged summary: per (kind, repetitions) table, F1-F3 with their numbers, the attacks
    (`attack_results`: the attacked requests' results) with F4, the cost, then the figures."""
    lines = [f"# unlearnbench report: {summary['run']} (seed {summary['seed']})", "",
             f"Method `{summary['method']}`, lr {summary['lr']}, exposure `{summary['exposure']}`, "
             f"UQ target {summary['uq_target']}, max steps {summary['max_steps']}.", "",
             e_r_line(summary), "",
             "## Forget requests per kind and repetitions", ""]
    lines += cell_table(summary)
    lines += ["", "Outcomes: u unlearned (UQ reached the target), c censored (the budget ran out first), x collapsed "
              "(a non-finite loss, an exploding gradient or the utility past its limit ended it first), n nothing to "
              "forget. Steps to unlearn and the utility drop there (ppl_t / ppl_0 − 1 on the ID holdout) are means "
              "over the unlearned requests only: read them with the outcome counts.", "", "## Findings", ""]
    lines += finding_lines(summary.get("findings", {}))
    if summary.get("survival"):
        lines += ["", "## Example level: steps to forget", ""] + survival_lines(summary["survival"])
    if summary.get("attacks") is not None:
        lines += ["", "## Does forgetting last? Relearning, quantization, membership inference", ""]
        lines += attack_lines(attack_results or [], summary["attacks"].get("findings", {}).get("F4"))
    if summary.get("cost"):
        lines += ["", "## Cost", ""] + cost_lines(summary)
    if figures:
        lines += ["", "## Figures", ""]
        for name, file in figures.items():
            heading, caption = FIGURES.get(name, (name, ""))
            lines += [f"### {heading}", "", caption, "",
                      f"![{name}]({file})", ""]
    return "\n".join(lines).rstrip() + "\n"


def format_findings(summary: dict) -> str:
    """The findings block the report stage prints."""
    lines = ["[findings]"]
    findings = {**summary.get("findings", {}), **summary.get("attacks", {}).get("findings", {})}
    for key, f in findings.items():
        if "statement" not in f:
            continue
        lines.append(f"  {key}: {f['verdict']}" + (f" ({f['detail']})" if f.get("detail") else "")
                     + f" — {f['statement']}")
        for c in f.get("contrasts", []):
            e = c["by_target"][c["main"]]
            lines.append(f"    r{c['repetitions']} {c['ood_kind']} vs id: {c['family_verdict']} after Holm "
                         f"(effect {num(e['mean'], G3)} [{num(e['lo'], G3)}, {num(e['hi'], G3)}], n = {e.get('n', 0)} "
                         f"{e.get('n_unit', 'groups')}; unadjusted {c['verdict']}; across targets: {c['across_targets']})")
        for c in f.get("kinds", []):
            m = c["cox"]["memorization"]
            lines.append(f"    {c['kind']}: {c['family_verdict']} after Holm (HR per within-request SD of memorization "
                         f"{num(m['hr'], G3)} [{num(m.get('hr_lo'), G3)}, {num(m.get('hr_hi'), G3)}], n = {c['n']})")
    return "\n".join(lines)
