"""The report stage: report/report.md with the group table, the findings and PNG figures of a run; and
`report --compare`, several runs side by side.

Figures use matplotlib's object API (no pyplot, so no global backend state): one colour per kind (ID blue,
canary vermillion, domain green) and one marker per repetitions, the same in every figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

from unlearnbench.errors import UserError
from unlearnbench.findings import flatten_findings, group_values
from unlearnbench.io import atomic_dir, read_json
from unlearnbench.metrics import mean_ci
from unlearnbench.records import finish_stage, require
from unlearnbench.rundir import Context
from unlearnbench.tracking import open_tracker

NAME = "report"

KIND_ORDER = ("id", "canary", "domain")
KIND_COLORS = {"id": "#0072B2", "canary": "#D55E00", "domain": "#009E73"}  # Okabe-Ito: colour-blind safe
KIND_LABELS = {"id": "ID (KJV)", "canary": "OOD canary", "domain": "OOD domain"}
REP_MARKERS = {1: "o", 4: "s", 16: "^"}
OTHER_MARKERS = ("D", "v", "P", "X", "h", "<", ">")
ATTACK_FIGURES = ("relearning", "recovered", "mia_auc")  # only when the attack stage ran
STEP_LABEL = "unlearning step (optimizer steps, symlog)"
FIGURES = {  # name -> (heading, caption)
    "exposure_trajectories": ("Exposure trajectories, ID vs OOD",
                              "Mean exposure of each forget request vs step; dashed: its level under the oracle θr."),
    "uq_vs_step": ("Unlearning quality vs step",
                   "UQ of each request with its 95% bootstrap band; dotted: the UQ target (vertical: reached)."),
    "utility_vs_step": ("Utility vs step",
                        "ID-holdout perplexity relative to θ0 (utility drop = ratio − 1); star: the step the "
                        "request became unlearned."),
    "uq_vs_utility": ("Trade-off: unlearning quality vs utility",
                      "UQ against the utility cost along each unlearning run; star: the step it became unlearned."),
    "steps_to_forget_vs_memorization": ("Steps to forget vs memorization",
                                        "Per example; hollow markers: censored (not forgotten by the request's last "
                                        "evaluation). The pooled ρ is descriptive: F3 is the Cox model within requests."),
    "steps_to_forget_vs_difficulty": ("Steps to forget vs difficulty",
                                      "Per example; hollow markers: censored (not forgotten by the request's last "
                                      "evaluation). The pooled ρ is descriptive."),
    "survival": ("Fraction not yet forgotten (Kaplan-Meier)",
                 "Per kind and repetitions, pooled over the replicate groups, with the 95% band; the log-rank test OOD "
                 "vs ID per repetitions is in the text."),
    "relearning": ("Exposure during relearning", "Mean exposure of each attacked request over relearning steps; dashed: "
                   "the oracle θr given the same steps on the same data."),
    "recovered": ("Recovered share after each attack", "Per request and attack, with the 95% bootstrap interval; 0 = no "
                  "more than the oracle picks up."),
    "mia_auc": ("Membership inference AUC", "Min-K%++ AUC of the request's examples against its references under θ0, "
                "the unlearned model and θr."),
    "finding_effects": ("F1 and F2 effects over replicates",
                        "Each dot is one replicate pair (hollow: a censoring bound); bar: mean and 95% t-interval. "
                        "F1: OOD − ID steps to reach UQ 0.9 (> 0 supports F1); F2: ID − OOD log(ppl_t/ppl_0) at that "
                        "crossing (> 0 supports F2)."),
}


# ----------------------------------------------------------------------------------------------- helpers

def _num(x, fmt="{:.2f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return fmt.format(x)


def kind_color(kind: str) -> str:
    """The colour of a forget kind in every figure (grey for kinds outside the study's three)."""
    return KIND_COLORS.get(kind, "#666666")


def rep_marker(reps: int) -> str:
    """The marker of a repetitions count in every figure."""
    return REP_MARKERS.get(int(reps), OTHER_MARKERS[abs(int(reps)) % len(OTHER_MARKERS)])


def _kind_key(kind: str) -> tuple:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def _cells(groups: list[dict]) -> list[tuple[str, int, list[dict]]]:
    """Requests grouped by (kind, repetitions), in the study's order."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for g in groups:
        cells.setdefault((g["kind"], int(g["repetitions"])), []).append(g)
    return [(k, r, cells[(k, r)]) for k, r in sorted(cells, key=lambda c: (_kind_key(c[0]), c[1]))]


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def _reps_title(reps: int) -> str:
    return f"{reps} repetition" + ("" if reps == 1 else "s")


def _step_axis(ax, max_steps: int | None, axis: str = "x") -> None:
    """Symlog steps (the evaluation schedule is log-spaced, and starts at 0) with plain-number ticks."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    top = max_steps or 100
    (ax.set_xscale if axis == "x" else ax.set_yscale)("symlog", linthresh=1.0)
    ticks = [t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if t <= top]
    a.set_major_locator(FixedLocator(ticks))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_locator(NullLocator())
    (ax.set_xlim if axis == "x" else ax.set_ylim)(-0.05 if axis == "x" else -0.3, top * 1.08)
    if axis == "x":
        ax.set_xlabel(STEP_LABEL)


def _ratio_axis(ax, curves: list[pd.Series], axis: str) -> str:
    """Log scale for a perplexity ratio when it spans more than 3x, else linear; plain-number ticks."""
    vals = pd.concat(curves).dropna() if curves else pd.Series(dtype=float)
    log = len(vals) and vals.max() / max(vals.min(), 1e-12) > 3
    a = ax.xaxis if axis == "x" else ax.yaxis
    if log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        a.set_major_locator(LogLocator(subs=(1.0, 3.0)))
        a.set_minor_locator(NullLocator())
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    return "log" if log else "linear"


def _legend_handles(kinds: list[str], reps: list[int], extra: list[Line2D] = ()) -> list[Line2D]:
    h = [Line2D([], [], color=kind_color(k), lw=2.5, label=KIND_LABELS.get(k, k)) for k in kinds]
    h += [Line2D([], [], color="black", marker=rep_marker(r), ls="none", label=_reps_title(r)) for r in reps]
    return h + list(extra)


def _figure(n_panels: int, width: float = 4.6, height: float = 3.6, rows: int = 1) -> tuple[Figure, np.ndarray]:
    n_panels, rows = max(1, n_panels), max(1, rows)  # a run without curves still gets a (blank) figure
    fig = Figure(figsize=(width * n_panels, height * rows + 0.9), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, n_panels, squeeze=False))
    return fig, axes


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png")


# ----------------------------------------------------------------------------------------------- data

def load_run(run_dir: Path) -> tuple[dict, dict[str, pd.DataFrame], pd.DataFrame]:
    """summary.json, the curve of each request and the per-example table (with a `request` column)."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.exists():
        raise UserError(f"No summary.json in {run_dir}: run the unlearn stage first "
                        f"(`unlearnbench unlearn run.dir={run_dir}`).")
    summary = read_json(path)
    if "runs" in summary:
        raise UserError(f"{path} aggregates several seeds; make the report of each seed_*/ run, or compare them with "
                        f"`unlearnbench report --compare {run_dir}`.")
    curves, frames = {}, []
    for g in summary["groups"]:
        d = run_dir / "unlearn" / g["request"]
        if (d / "curve.parquet").exists():
            curves[g["request"]] = pd.read_parquet(d / "curve.parquet")
        if (d / "examples.parquet").exists():
            frames.append(pd.read_parquet(d / "examples.parquet").assign(request=g["request"]))
    examples = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return summary, curves, examples


# ----------------------------------------------------------------------------------------------- figures

def _by_reps(summary: dict, curves: dict) -> tuple[list[int], list[str], dict[int, list[dict]]]:
    groups = [g for g in summary["groups"] if g["request"] in curves]
    reps = sorted({int(g["repetitions"]) for g in groups})
    kinds = sorted({g["kind"] for g in groups}, key=_kind_key)
    per = {r: sorted([g for g in groups if int(g["repetitions"]) == r], key=lambda g: _kind_key(g["kind"]))
           for r in reps}
    return reps, kinds, per


def _line_kw(g: dict, many: bool) -> dict:
    return {"color": kind_color(g["kind"]), "marker": None if many else rep_marker(g["repetitions"]),
            "ms": 4, "lw": 0.8 if many else 1.6, "alpha": 0.35 if many else 1.0}


def fig_exposure(summary: dict, curves: dict, path: Path) -> None:
    """Mean exposure (bits) vs step per request, one panel per repetitions; oracle level dashed."""
    reps, kinds, per = _by_reps(summary, curves)
    fig, axes = _figure(len(reps))
    for ax, r in zip(axes[0], reps):
        many = len(per[r]) > len(kinds)
        for g in per[r]:
            c = curves[g["request"]]
            ax.plot(c.step, c.exposure_mean, **_line_kw(g, many))
            ax.axhline(float(c.exposure_oracle_mean.iloc[0]), color=kind_color(g["kind"]), ls="--", lw=1,
                       alpha=0.4 if many else 0.9)
        ax.set_title(_reps_title(r))
        ax.set_ylabel("mean exposure of the request (bits)")
        _step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="grey", ls="--", label="same request under oracle θr")]
    fig.legend(handles=_legend_handles(kinds, reps, extra), loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(f"Exposure trajectories during unlearning: ID vs OOD ({summary.get('exposure', '')} exposure)")
    _save(fig, path)


def fig_uq(summary: dict, curves: dict, path: Path) -> None:
    """UQ vs step with the bootstrap band, one panel per (kind, repetitions)."""
    cells = [(k, r, [g for g in gs if g["request"] in curves]) for k, r, gs in _cells(summary["groups"])]
    cells = [c for c in cells if c[2]]
    kinds = sorted({k for k, _, _ in cells}, key=_kind_key)
    reps = sorted({r for _, r, _ in cells})
    fig, axes = _figure(len(reps), 4.0, 2.8, rows=len(kinds))
    for ax in axes.flat:
        ax.set_visible(False)
    target = summary.get("uq_target")
    for k, r, gs in cells:
        ax = axes[kinds.index(k), reps.index(r)]
        ax.set_visible(True)
        many = len(gs) > 1
        for g in gs:
            c = curves[g["request"]]
            if not many:
                ax.fill_between(c.step, c.uq_lo, c.uq_hi, color=kind_color(k), alpha=0.2, lw=0)
            ax.plot(c.step, c.uq, **_line_kw(g, many))
            if g.get("steps_to_unlearn") is not None and not many and not g.get("nothing_to_forget"):
                ax.axvline(g["steps_to_unlearn"], color=kind_color(k), ls=":", lw=1)
        if target is not None:
            ax.axhline(target, color="black", ls=":", lw=1)
        note = " (nothing to forget)" if all(g.get("nothing_to_forget") for g in gs) else ""
        ax.set_title(f"{KIND_LABELS.get(k, k)}, {_reps_title(r)}{note}", fontsize=9)
        ax.set_ylabel("UQ (0 = as θ0, 1 = as θr)")
        _step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="grey", lw=6, alpha=0.3, label="95% bootstrap interval"),
             Line2D([], [], color="black", ls=":", label=f"UQ target {target}")]
    fig.legend(handles=_legend_handles(kinds, reps, extra), loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle("Unlearning quality vs step")
    _save(fig, path)


def _ppl_ratio(c: pd.DataFrame) -> pd.Series:
    ratio = 1.0 + c.utility_drop.astype(float)
    return ratio.where(np.isfinite(ratio) & (ratio > 0))


def fig_utility(summary: dict, curves: dict, path: Path) -> None:
    """ID-holdout perplexity ratio ppl_t / ppl_0 vs step, one panel per repetitions."""
    reps, kinds, per = _by_reps(summary, curves)
    fig, axes = _figure(len(reps))
    for ax, r in zip(axes[0], reps):
        many = len(per[r]) > len(kinds)
        ratios = []
        for g in per[r]:
            c = curves[g["request"]]
            ratio = _ppl_ratio(c)
            ratios.append(ratio)
            ax.plot(c.step, ratio, **_line_kw(g, many))
            s = g.get("steps_to_unlearn")
            if s is not None and not many and not g.get("nothing_to_forget") and (c.step == s).any():
                ax.plot([s], [ratio[c.step == s].iloc[0]], marker="*", ms=12, color=kind_color(g["kind"]),
                        mec="black", mew=0.6, ls="none")
        ax.axhline(1.0, color="black", lw=0.8)
        scale = _ratio_axis(ax, ratios, "y")
        ax.set_title(_reps_title(r))
        ax.set_ylabel(f"ID-holdout perplexity ppl_t / ppl_0 (ratio, {scale})")
        _step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3, which="both")
    extra = [Line2D([], [], color="grey", marker="*", ms=10, mec="black", ls="none", label="step it became unlearned")]
    fig.legend(handles=_legend_handles(kinds, reps, extra), loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle("Utility on the ID holdout during unlearning")
    _save(fig, path)


def fig_tradeoff(summary: dict, curves: dict, path: Path) -> None:
    """UQ against the ID-holdout perplexity ratio along each run, one panel per repetitions."""
    reps, kinds, per = _by_reps(summary, curves)
    fig, axes = _figure(len(reps))
    target = summary.get("uq_target")
    for ax, r in zip(axes[0], reps):
        many = len(per[r]) > len(kinds)
        ratios = []
        for g in per[r]:
            c = curves[g["request"]]
            ratio = _ppl_ratio(c)
            ratios.append(ratio)
            ax.plot(ratio, c.uq, **_line_kw(g, many))
            s = g.get("steps_to_unlearn")
            if s is not None and not many and not g.get("nothing_to_forget") and (c.step == s).any():
                ax.plot([ratio[c.step == s].iloc[0]], [c.uq[c.step == s].iloc[0]], marker="*", ms=12,
                        color=kind_color(g["kind"]), mec="black", mew=0.6, ls="none")
        if target is not None:
            ax.axhline(target, color="black", ls=":", lw=1)
        scale = _ratio_axis(ax, ratios, "x")
        ax.set_title(_reps_title(r))
        ax.set_xlabel(f"ID-holdout perplexity ppl_t / ppl_0 (ratio, {scale})")
        ax.set_ylabel("UQ (0 = as θ0, 1 = as θr)")
        ax.grid(alpha=0.3, which="both")
    extra = [Line2D([], [], color="grey", marker="*", ms=10, mec="black", ls="none", label="unlearned"),
             Line2D([], [], color="black", ls=":", label=f"UQ target {target}")]
    fig.legend(handles=_legend_handles(kinds, reps, extra), loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle("Trade-off: unlearning quality vs utility cost (up and left is better)")
    _save(fig, path)


def fig_steps_to_forget(summary: dict, examples: pd.DataFrame, variable: str, path: Path) -> None:
    """Steps to forget vs `variable` (memorization or difficulty) per example, Spearman ρ per kind in the legend."""
    xlabel = {"memorization": "memorization ℓθr(x) − ℓθ0(x) (nats/token)",
              "difficulty": "difficulty ℓθr(x) (nats/token)"}[variable]
    corr = {c["kind"]: {**c["pooled_spearman_descriptive"][variable], "n": c["n"]}
            for c in summary.get("findings", {}).get("F3", {}).get("kinds", [])}
    fig = Figure(figsize=(7.2, 6.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    kinds = sorted(set(examples.kind), key=_kind_key) if not examples.empty else []
    reps = sorted(set(int(r) for r in examples.repetitions)) if not examples.empty else []
    handles = []
    for k in kinds:
        sub = examples[examples.kind == k]
        for r in reps:
            s = sub[sub.repetitions == r]
            for censored, face in ((False, kind_color(k)), (True, "none")):
                part = s[s.censored == censored]
                if len(part):
                    ax.scatter(part[variable], part.steps_to_forget, marker=rep_marker(r), s=28, alpha=0.75,
                               facecolors=face, edgecolors=kind_color(k), linewidths=1)
        c = corr.get(k)
        rho = (f": ρ = {_num(c['rho'])} [{_num(c['lo'])}, {_num(c['hi'])}], n = {c['n']}" if c else "")
        handles.append(Line2D([], [], color=kind_color(k), marker="o", ls="none", label=KIND_LABELS.get(k, k) + rho))
    handles += [Line2D([], [], color="black", marker=rep_marker(r), ls="none", label=_reps_title(r))
                for r in reps]
    handles.append(Line2D([], [], color="black", marker="o", mfc="none", ls="none",
                          label="censored: not forgotten by its request's last evaluation"))
    _step_axis(ax, summary.get("max_steps"), axis="y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("steps to forget (optimizer steps, symlog)")
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=2,
               title="kind: pooled Spearman ρ(steps to forget, " + variable + ") [95% interval], descriptive only "
                     "(confounded by repetitions; F3 uses the Cox model)", title_fontsize=8)
    ax.set_title(f"Steps to forget vs {variable}")
    _save(fig, path)


def fig_survival(summary: dict, path: Path) -> None:
    """Kaplan-Meier curves of the fraction of examples not yet forgotten, one panel per repetitions."""
    curves = summary.get("survival", {}).get("kaplan_meier", [])
    reps = sorted({c["repetitions"] for c in curves})
    fig, axes = _figure(len(reps))
    for ax, r in zip(axes[0], reps):
        for c in sorted((c for c in curves if c["repetitions"] == r), key=lambda c: _kind_key(c["kind"])):
            km = c["curve"]
            ax.step(km["step"], km["survival"], where="post", color=kind_color(c["kind"]), lw=1.6,
                    label=f"{KIND_LABELS.get(c['kind'], c['kind'])} (n = {c['n']})")
            ax.fill_between(km["step"], km["lo"], km["hi"], step="post", color=kind_color(c["kind"]), alpha=0.15, lw=0)
        ax.set_title(_reps_title(r))
        ax.set_ylabel("fraction not yet forgotten")
        ax.set_ylim(-0.02, 1.02)
        _step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Example level: fraction of forget examples not yet forgotten (Kaplan-Meier, 95% band)")
    _save(fig, path)


def fig_effects(summary: dict, path: Path) -> None:
    """F1 and F2 per (repetitions, OOD kind): every replicate pair's difference and the mean with its interval."""
    findings = summary.get("findings", {})
    fig, axes = _figure(2, 5.2, 3.8)
    for ax, key, unit in ((axes[0][0], "F1", "OOD − ID steps to reach the target"),
                          (axes[0][1], "F2", "ID − OOD log(ppl_t / ppl_0) at the crossing")):
        cells = findings.get(key, {}).get("cells", [])
        for x, c in enumerate(cells):
            e = c["by_target"][c["main"]]
            for p in e.get("pairs", []):
                if p["difference"] is not None:
                    ax.plot([x + 0.12], [p["difference"]], marker="o", ms=5, ls="none",
                            mfc="none" if p.get("bound") else kind_color(c["ood_kind"]), mec=kind_color(c["ood_kind"]))
            if e["mean"] is not None:
                lo = e["lo"] if e["lo"] is not None and math.isfinite(e["lo"]) else e["mean"]
                hi = e["hi"] if e["hi"] is not None and math.isfinite(e["hi"]) else e["mean"]
                ax.errorbar([x - 0.12], [e["mean"]], yerr=[[e["mean"] - lo], [hi - e["mean"]]], marker="D",
                            color="black", capsize=4, ls="none")
            ax.annotate(c["verdict"], (x, 0), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(cells)), [f"r{c['repetitions']}\n{c['ood_kind']}" for c in cells], fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_title(f"{key} at UQ {summary.get('uq_target')}")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Effects over replicate pairs (dots) with mean and 95% t-interval (black)")
    _save(fig, path)


def attack_figures(run_dir: Path, att: dict, out_dir: Path) -> dict[str, Path]:
    """Exposure during relearning (ID vs OOD, oracle dashed), recovered share per request and attack, MIA AUC."""
    reqs = sorted(att.get("requests", []), key=lambda r: (_kind_key(r["kind"]), r["repetitions"], r["request"]))
    paths = {"relearning": out_dir / "relearning.png", "recovered": out_dir / "recovered.png",
             "mia_auc": out_dir / "mia_auc.png"}
    fig, axes = _figure(2, 5.0, 3.6)
    for ax, variant in zip(axes[0], ("forget_fraction", "retain")):
        for r in reqs:
            p = run_dir / "attacks" / r["request"] / "relearning.parquet"
            if not p.exists():
                continue
            c = pd.read_parquet(p)
            for start, ls in (("unlearned", "-"), ("oracle", "--")):
                part = c[(c.variant == variant) & (c.start == start)]
                ax.plot(part.step, part.exposure_mean, ls=ls, color=kind_color(r["kind"]), marker=rep_marker(r["repetitions"]),
                        ms=3, lw=1.2, alpha=0.8)
        ax.set_title({"forget_fraction": "relearning on part of the forget set", "retain": "relearning on retain data"}[variant],
                     fontsize=9)
        ax.set_xlabel("relearning step")
        ax.set_ylabel("mean exposure of the request (bits)")
        ax.grid(alpha=0.3)
    kinds = sorted({r["kind"] for r in reqs}, key=_kind_key)
    extra = [Line2D([], [], color="grey", ls="-", label="from the unlearned model"),
             Line2D([], [], color="grey", ls="--", label="from the oracle θr (yardstick)")]
    fig.legend(handles=_legend_handles(kinds, sorted({r["repetitions"] for r in reqs}), extra), loc="outside lower center",
               ncol=4, fontsize=8)
    fig.suptitle("Exposure during relearning: ID vs OOD, and the oracle picking up the same data")
    _save(fig, paths["relearning"])

    names = ["relearn_forget_fraction", "relearn_retain", "int8", "int4"]
    fig, axes = _figure(1, max(6.0, 0.5 * len(reqs) + 2), 3.8)
    ax = axes[0][0]
    for j, name in enumerate(names):
        for x, r in enumerate(reqs):
            d = r.get(name) or r.get("quantization", {}).get(name) or {}
            if d.get("recovered") is None:
                continue
            lo = d["lo"] if d.get("lo") is not None else d["recovered"]
            hi = d["hi"] if d.get("hi") is not None else d["recovered"]
            ax.errorbar([x + (j - 1.5) * 0.18], [d["recovered"]], yerr=[[d["recovered"] - lo], [hi - d["recovered"]]],
                        marker="osD^"[j], color=kind_color(r["kind"]), ms=4, capsize=2, ls="none")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(reqs)), [r["request"] for r in reqs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("recovered share of the exposure gap")
    ax.grid(alpha=0.3, axis="y")
    fig.legend(handles=[Line2D([], [], color="black", marker="osD^"[j], ls="none", label=n) for j, n in enumerate(names)],
               loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle("How much comes back after each attack (beyond the oracle attacked the same way), 95% intervals")
    _save(fig, paths["recovered"])

    fig, axes = _figure(1, max(6.0, 0.5 * len(reqs) + 2), 3.8)
    ax = axes[0][0]
    for j, model in enumerate(("original", "unlearned", "oracle")):
        for x, r in enumerate(reqs):
            v = r.get("mia", {}).get(model, {}).get("min_k_pp")
            if v is not None:
                ax.plot([x + (j - 1) * 0.2], [v], marker="o^s"[j], color=kind_color(r["kind"]), ls="none")
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xticks(range(len(reqs)), [r["request"] for r in reqs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("Min-K%++ AUC, members vs references")
    ax.grid(alpha=0.3, axis="y")
    fig.legend(handles=[Line2D([], [], color="black", marker="o^s"[j], ls="none", label=m)
                        for j, m in enumerate(("θ0 original", "θt unlearned", "θr oracle"))],
               loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("Membership inference before, after unlearning, and under the oracle (0.5 = chance)")
    _save(fig, paths["mia_auc"])
    return paths


def make_figures(run_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Render every report figure of a run into `out_dir`; returns name -> PNG path."""
    summary, curves, examples = load_run(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.png" for name in FIGURES if name not in ATTACK_FIGURES}
    fig_exposure(summary, curves, paths["exposure_trajectories"])
    fig_uq(summary, curves, paths["uq_vs_step"])
    fig_utility(summary, curves, paths["utility_vs_step"])
    fig_tradeoff(summary, curves, paths["uq_vs_utility"])
    for var in ("memorization", "difficulty"):
        fig_steps_to_forget(summary, examples, var, paths[f"steps_to_forget_vs_{var}"])
    fig_survival(summary, paths["survival"])
    fig_effects(summary, paths["finding_effects"])
    return paths


# ----------------------------------------------------------------------------------------------- markdown

def _outcomes(gs: list[dict]) -> str:
    """How the cell's requests ended: u unlearned, c censored, x collapsed, n nothing to forget."""
    counts = {"u": 0, "c": 0, "x": 0, "n": 0}
    for g in gs:
        o = "n" if g.get("nothing_to_forget") else {"unlearned": "u", "collapsed": "x"}.get(g.get("outcome"), "c")
        counts[o] += 1
    return " ".join(f"{v}{k}" for k, v in counts.items() if v) or "–"


def group_table(summary: dict) -> list[str]:
    """Markdown table per (kind, repetitions); cells with several requests show means."""
    lines = ["| kind | reps | requests | examples | outcomes | steps to unlearn | utility drop there | final UQ "
             "| max UQ | exposure θ0 (bits) | exposure θr (bits) | steps to forget | censored | memorization "
             "(nats/tok) | difficulty (nats/tok) | diverged | nothing to forget |", "|" + "---|" * 17]
    for kind, reps, gs in _cells(summary["groups"]):
        unlearned = [g for g in gs if g.get("steps_to_unlearn") is not None and not g.get("nothing_to_forget")]
        lines.append(
            f"| {kind} | {reps} | {len(gs)} | {sum(g['n_examples'] for g in gs)} | {_outcomes(gs)} | "
            f"{_num(_mean(g['steps_to_unlearn'] for g in unlearned), '{:.3g}')} | "
            f"{_num(_mean(g['utility_drop_at_unlearned'] for g in unlearned), '{:+.1%}')} | "
            f"{_num(_mean(g['uq_final'] for g in gs))} | {_num(_mean(g.get('uq_max') for g in gs))} | "
            f"{_num(_mean(g['exposure_original_mean'] for g in gs))} | "
            f"{_num(_mean(g['exposure_oracle_mean'] for g in gs))} | "
            f"{_num(_mean(g['steps_to_forget_mean'] for g in gs), '{:.1f}')} | "
            f"{_num(_mean(g.get('censored_fraction') for g in gs), '{:.0%}')} | "
            f"{_num(_mean(g['memorization_mean'] for g in gs), '{:.3f}')} | "
            f"{_num(_mean(g['difficulty_mean'] for g in gs), '{:.3f}')} | "
            f"{sum(bool(g.get('diverged')) for g in gs)} | {sum(bool(g.get('nothing_to_forget')) for g in gs)} |")
    return lines


def _interval(e: dict, fmt: str = "{:.3g}") -> str:
    return f"{_num(e.get('mean'), fmt)} [{_num(e.get('lo'), fmt)}, {_num(e.get('hi'), fmt)}]"


def finding_lines(findings: dict) -> list[str]:
    """F1-F3 with their verdicts, effects with intervals over replicates, outcome counts and stability."""
    if not findings:
        return ["No findings: the run has no (kind, repetitions) groups or no per-example results."]
    lines = []
    for key, f in findings.items():
        lines.append(f"- **{key}: {f['verdict']}** ({f['holds']} of {f['of']} cells reproduce it). {f['statement']}. "
                     f"Effect: {f['effect']}.")
        if f.get("cells"):
            targets = list(f["cells"][0]["by_target"])
            lines += ["", "  | reps | OOD kind | replicates | verdict | " + " | ".join(targets) + " | stable across targets |",
                      "  |" + "---|" * (len(targets) + 5)]
            for c in f["cells"]:
                cells = []
                for t in targets:
                    e = c["by_target"][t]
                    n = e["counts"]
                    cells.append(f"{_interval(e)} {e['verdict']} ({n['supports']}+/{n['against']}−/{n['tie']}="
                                 f"/{n['inconclusive']}?)")
                lines.append(f"  | {c['repetitions']} | {c['ood_kind']} | {c['replicates']} | **{c['verdict']}** | "
                             + " | ".join(cells) + f" | {'yes' if c['stable_across_targets'] else 'no: ' + c['across_targets']} |")
            lines.append("")
        for c in f.get("kinds", []):
            m, d = c["cox"]["memorization"], c["cox"]["difficulty"]
            desc = c["pooled_spearman_descriptive"]["memorization"]
            lines.append(f"  - {c['kind']}: **{c['verdict']}**; hazard ratio of forgetting per SD of memorization "
                         f"{_num(m['hr'], '{:.3g}')} [{_hr(m['lo'])}, {_hr(m['hi'])}] (p = {_num(m['p'], '{:.2g}')}), of "
                         f"difficulty {_num(d['hr'], '{:.3g}')} [{_hr(d['lo'])}, {_hr(d['hi'])}]; n = {c['n']} examples in "
                         f"{c['requests']} requests, {_num(c['censored_fraction'], '{:.0%}')} censored. Descriptive "
                         f"only (pooled over repetitions, confounded): Spearman ρ = {_num(desc['rho'])} "
                         f"[{_num(desc['lo'])}, {_num(desc['hi'])}]")
        if f.get("excluded_requests"):
            lines.append(f"  - left out (nothing to forget): {', '.join(f['excluded_requests'])}")
    lines += ["", "Each effect is the mean over replicate pairs with its 95% t-interval; the counts are pairs that "
              "support (+) or go against (−) the finding, ties (=) and pairs without evidence (?: a collapsed side, "
              "both censored, censoring before the other side's event, or nothing to forget). `uq_T`: interpolated "
              "steps to reach UQ T (F1) or log utility cost there (F2); `auc`: area under UQ against log(1+step). "
              "Verdicts are computed from these numbers (docs/findings.md)."]
    return lines


def _hr(coef) -> str:
    return _num(math.exp(coef) if coef is not None and math.isfinite(coef) else None, "{:.3g}")


def attack_lines(att: dict) -> list[str]:
    """Per attacked request: recovered share of the exposure gap after each attack (beyond the oracle attacked the
    same way), MIA AUC under θ₀ / unlearned / θᵣ; then F4."""
    lines = ["| request | relearn on forget part (held-out part) | relearn on retain | no attack | int8 | int4 | LOSS AUC "
             "θ0 / θt / θr | Min-K%++ AUC θ0 / θt / θr |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(att.get("requests", []), key=lambda r: (_kind_key(r["kind"]), r["repetitions"], r["request"])):
        ff, rt = r["relearn_forget_fraction"], r["relearn_retain"]
        held = ff.get("held_out") or {}
        q = r.get("quantization", {})
        mia = r.get("mia", {})

        def auc(att_name):
            return " / ".join(_num(mia.get(m, {}).get(att_name)) for m in ("original", "unlearned", "oracle"))
        lines.append(f"| {r['request']} | {_interval(_rec(ff))} ({_interval(_rec(held))}) | {_interval(_rec(rt))} | "
                     f"{_interval(_rec(q.get('none', {})))} | {_interval(_rec(q.get('int8', {})))} | {_interval(_rec(q.get('int4', {})))} | {auc('loss')} | "
                     f"{auc('min_k_pp')} |")
    errors = sorted({v["error"] for r in att.get("requests", []) for v in r.get("quantization", {}).values()
                     if "error" in v})
    lines += [""] + [f"- quantization unavailable: {e}" for e in errors]
    lines += ["", "Recovered = (ē attacked − ē oracle attacked the same way) / (ē θ0 − ē θr): the share of the original "
              "exposure gap that comes back beyond what an exactly-unlearned model picks up; [95% bootstrap interval "
              "over the request's examples]; \"no attack\": the unlearned model as saved, the level the reloads start from. AUC: "
              "forget examples (members) vs their references (non-members).", ""]
    if any(r.get("baseline") == "held_out_references" for r in att.get("requests", [])):
        lines += ["No oracle (`train.oracle=false`): θr was not attacked. \"ē oracle attacked\" is replaced by the "
                  "held-out-reference e_r (unattacked), and the AUC and PrivLeak under θr are not available (–).", ""]
    f4 = att.get("findings", {}).get("F4")
    if f4:
        lines.append(f"- **F4: {f4['verdict']}** ({f4['holds']} of {f4['of']} cells). {f4['statement']}. Effect: "
                     f"{f4['effect']}.")
        for c in f4["cells"]:
            parts = [f"{a}: {_interval(e)} {e['verdict']}" + (f" ({e['direction']})" if e.get("direction") else "")
                     for a, e in c["by_attack"].items()]
            lines.append(f"  - r{c['repetitions']} {c['ood_kind']} vs id ({c['replicates']} replicates): " + "; ".join(parts))
    return lines


def _rec(d: dict) -> dict:
    return {"mean": d.get("recovered"), "lo": d.get("lo"), "hi": d.get("hi")}


def cost_lines(summary: dict) -> list[str]:
    """Wall time, device-seconds, peak memory and estimated FLOPs (train: 6·N per trained token; score: 2·N per
    computed token slot) per stage; estimated FLOPs and device-seconds per request."""
    cost = summary["cost"]
    lines = ["| stage | wall s | device-s | peak memory MiB | est. FLOPs |", "|---|---|---|---|---|"]
    for stage, c in cost.get("stages", {}).items():
        lines.append(f"| {stage} | {_num(c.get('seconds'), '{:.1f}')} | {_num(c.get('device_seconds'), '{:.1f}')} | "
                     f"{_num(c.get('peak_memory_mib'), '{:.0f}')} | {_num(c.get('flops'), '{:.3g}')} |")
    lines += ["", "| request | outcome | steps | wall s | eval share | est. FLOPs | device-s |", "|---|---|---|---|---|---|---|"]
    for g in summary["groups"]:
        lines.append(f"| {g['request']} | {g.get('outcome')} | {g.get('steps_run')} | {_num(g.get('wall_seconds'), '{:.1f}')} | "
                     f"{_num(g.get('eval_share'), '{:.0%}')} | {_num(g.get('flops'), '{:.3g}')} | "
                     f"{_num(g.get('device_seconds'), '{:.1f}')} |")
    r = cost.get("unlearn_requests", {})
    lines += ["", f"All requests: {_num(r.get('flops'), '{:.3g}')} FLOPs (6·N per trained token, 2·N per scored "
              f"token), {_num(r.get('device_seconds'), '{:.0f}')} device-seconds."]
    return lines


def survival_lines(surv: dict) -> list[str]:
    """The example-level view: median steps to forget per cell and the log-rank tests OOD vs ID."""
    if not surv:
        return []
    lines = ["| kind | reps | examples | forgotten | median steps to forget |", "|---|---|---|---|---|"]
    for c in sorted(surv["kaplan_meier"], key=lambda c: (_kind_key(c["kind"]), c["repetitions"])):
        lines.append(f"| {c['kind']} | {c['repetitions']} | {c['n']} | {c['events']} | {_num(c['median_steps'], '{:.3g}')} |")
    lines += ["", "Log-rank test of the steps to forget, OOD vs ID at the same repetitions (example-level F1):", ""]
    for t in surv["logrank"]:
        lines.append(f"- {t['repetitions']} repetitions, {t['ood_kind']} vs id: median {_num(t['median_ood'], '{:.3g}')} "
                     f"vs {_num(t['median_id'], '{:.3g}')} steps, χ² = {_num(t['statistic'])}, p = {_num(t['p'], '{:.2g}')}")
    return lines


def e_r_line(summary: dict) -> str:
    """Which e_r the run's UQ, forgotten rule and gaps use (`e_r_source` in summary.json)."""
    if summary.get("e_r_source", "oracle") == "held_out_references":
        return ("**e_r source: held-out references (no oracle, `train.oracle=false`).** No θr was trained: e_r of each "
                "example is the mean exposure of its kind's held-out references under θ0, each against the other "
                "references (leave-one-out); the \"θr\" columns below hold that estimate, and memorization and "
                "difficulty (which need θr) are not available.")
    return "e_r source: the oracle θr (retrained without the forget sets)."


def render_markdown(summary: dict, figures: dict[str, str] | None = None, attack_summary: dict | None = None) -> str:
    """Markdown of a run's summary: per (kind, repetitions) table, F1-F3 with their numbers, then the figures."""
    lines = [f"# unlearnbench report: {summary['run']} (seed {summary['seed']})", "",
             f"Method `{summary['method']}`, lr {summary['lr']}, exposure `{summary['exposure']}`, "
             f"UQ target {summary['uq_target']}, max steps {summary['max_steps']}.", "",
             e_r_line(summary), "",
             "## Forget requests per kind and repetitions", ""]
    lines += group_table(summary)
    lines += ["", "Outcomes: u unlearned (UQ reached the target), c censored (the budget ran out first), x collapsed "
              "(diverged first), n nothing to forget. Steps to unlearn and the utility drop there (ppl_t / ppl_0 − 1 on "
              "the ID holdout) are means over the unlearned requests only: read them with the outcome counts.", "", "## Findings", ""]
    lines += finding_lines(summary.get("findings", {}))
    if summary.get("survival"):
        lines += ["", "## Example level: steps to forget", ""] + survival_lines(summary["survival"])
    if attack_summary:
        lines += ["", "## Does forgetting last? Relearning, quantization, membership inference", ""]
        lines += attack_lines(attack_summary)
    if summary.get("cost"):
        lines += ["", "## Cost", ""] + cost_lines(summary)
    if figures:
        lines += ["", "## Figures", ""]
        for name, file in figures.items():
            heading, caption = FIGURES.get(name, (name, ""))
            lines += [f"### {heading}", "", caption, "",
                      f"![{name}]({file})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _ci(d: dict | None, fmt: str = "{:.2f}") -> str:
    if not d or d.get("mean") is None:
        return "–"
    if d["n"] < 2 or d["lo"] == d["hi"]:
        return f"{fmt.format(d['mean'])} (n={d['n']})"
    return f"{fmt.format(d['mean'])} ± {fmt.format((d['hi'] - d['lo']) / 2)} (n={d['n']})"


# ----------------------------------------------------------------------------------------------- stage

def run(ctx: Context) -> None:
    """Write report/report.md and its PNG figures from summary.json and the unlearning curves; the figures and
    the findings' numbers also go to the tracker."""
    require(ctx, "unlearn")
    if not (ctx.run_dir / "summary.json").exists():
        raise UserError(f"No summary.json in {ctx.run_dir}: run the unlearn stage first.")
    out = ctx.run_dir / "report"
    trk = open_tracker(ctx, NAME)
    if ctx.is_main:
        summary = read_json(ctx.run_dir / "summary.json")
        attack_path = ctx.run_dir / "attacks" / "summary.json"
        attack_summary = read_json(attack_path) if attack_path.exists() else None
        with atomic_dir(out) as tmp:  # the report appears whole: markdown and figures of the same summary
            paths = make_figures(ctx.run_dir, tmp)
            if attack_summary:
                paths.update(attack_figures(ctx.run_dir, attack_summary, tmp))
            (tmp / "report.md").write_text(render_markdown(summary, {n: p.name for n, p in paths.items()},
                                                           attack_summary))
        trk.log_images({f"report/{name}": out / p.name for name, p in paths.items()})
        trk.summary(flatten_findings(summary))
    trk.finish()
    ctx.acc.wait_for_everyone()  # the main process has written the report (another node's would list it early)
    figures = sorted(p.name for p in out.glob("*.png"))
    if ctx.is_main:
        print(f"[report] wrote {out / 'report.md'} and {len(figures)} figures", flush=True)
    finish_stage(ctx, NAME, {"figures": figures})


# ----------------------------------------------------------------------------------------------- compare

def _seed_dirs(d: Path) -> list[Path]:
    """The single-seed run directories behind `d`: itself, or its seed_*/ sub-runs."""
    subs = sorted((p for p in d.glob("seed_*") if (p / "summary.json").exists()),
                  key=lambda p: (len(p.name), p.name))
    if subs:
        return subs
    if (d / "summary.json").exists() and "runs" not in read_json(d / "summary.json"):
        return [d]
    raise UserError(f"{d} has no summary.json (nor seed_*/summary.json); give run directories that finished the "
                    "unlearn stage.")


def _settings(first_seed_dir: Path, summaries: list[dict]) -> dict:
    """What distinguishes a run: seeds, method, model, backend (from summary.json and config.yaml)."""
    s0 = summaries[0]
    cfg_path = first_seed_dir / "config.yaml"
    doc = {}
    if cfg_path.exists():
        import yaml

        doc = yaml.safe_load(cfg_path.read_text()) or {}
    c, dist = doc.get("config", {}), doc.get("distributed", {}) or {}
    m = c.get("model", {})
    model = (m.get("name_or_path") or f"{m.get('arch', '?')} {m.get('n_layers', '?')}×{m.get('hidden_size', '?')}"
             if m else "–")
    backend = "–"
    if dist:
        backend = (f"{dist.get('distributed_type', '?')} ×{dist.get('num_processes', '?')} {dist.get('device', '')} "
                   f"{m.get('dtype', '')}" + (f" ZeRO-{dist['zero_stage']}" if dist.get("zero_stage") else ""))
    return {"seeds": ", ".join(str(s["seed"]) for s in summaries), "method": s0["method"], "lr": s0["lr"],
            "exposure": s0["exposure"], "max steps": s0["max_steps"], "model": model, "backend": backend.strip(),
            "git": (doc.get("git_revision") or "–")[:12]}


METRICS = (("steps_to_unlearn", "steps to unlearn", "{:.3g}"),
           ("utility_drop_at_unlearned", "utility drop when unlearned", "{:+.1%}"),
           ("uq_final", "final UQ", "{:.2f}"),
           ("steps_to_forget_mean", "mean steps to forget", "{:.1f}"),
           ("memorization_mean", "memorization (nats/token)", "{:.3f}"),
           ("difficulty_mean", "difficulty (nats/token)", "{:.3f}"))


def compare_runs(dirs: list[Path], out_dir: Path) -> None:
    """`<out_dir>/compare.md` and `compare.png`: runs side by side with mean ± 95% interval per (kind, repetitions).

    A run directory may be a multi-seed parent: its seed_*/ sub-runs are the seeds of that column.
    `out_dir` is replaced as a whole.
    """
    dirs = [Path(d) for d in dirs]
    out_dir = Path(out_dir)
    if not dirs:
        raise UserError("Give at least one run directory to compare: `unlearnbench report --compare DIR [DIR ...]`.")
    for d in dirs:
        if d.resolve() == out_dir.resolve() or out_dir.resolve() in d.resolve().parents:
            raise UserError(f"The comparison would be written over {d}; choose another run.dir for it.")
    runs = []
    for d in dirs:
        subs = _seed_dirs(d)
        summaries = [read_json(s / "summary.json") for s in subs]
        label = d.name if d.name not in [r["label"] for r in runs] else str(d)
        runs.append({"label": label, "dir": d, "summaries": summaries, "settings": _settings(subs[0], summaries)})
    cells = sorted({(g["kind"], int(g["repetitions"])) for r in runs for s in r["summaries"] for g in s["groups"]},
                   key=lambda c: (_kind_key(c[0]), c[1]))
    everything = [s for r in runs for s in r["summaries"]]

    columns = list(runs[0]["settings"])
    lines = ["# unlearnbench comparison", "", "## Runs", "",
             "| run | directory | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for r in runs:
        lines.append(f"| {r['label']} | `{r['dir']}` | " + " | ".join(str(v) for v in r["settings"].values()) + " |")
    lines += ["", "Each cell: mean ± half-width of the 95% t-interval across the run's seeds (n = seeds with a "
              "value); the last column pools every seed of every run. Steps to unlearn and the utility drop there "
              "count only seeds where the request became unlearned and had something to forget.", ""]
    stats = {}
    for col, title, fmt in METRICS:
        lines += [f"### {title[0].upper() + title[1:]}", "",
                  "| kind | reps | " + " | ".join(r["label"] for r in runs) + " | all runs |",
                  "|" + "---|" * (len(runs) + 3)]
        for kind, reps in cells:
            per = [mean_ci(group_values(r["summaries"], kind, reps, col)) for r in runs]
            pooled = mean_ci(group_values(everything, kind, reps, col))
            stats[(col, kind, reps)] = per
            lines.append(f"| {kind} | {reps} | " + " | ".join(_ci(p, fmt) for p in per) + f" | {_ci(pooled, fmt)} |")
        lines.append("")
    lines += ["## Findings", "", "| finding | " + " | ".join(r["label"] for r in runs) + " |",
              "|" + "---|" * (len(runs) + 1)]
    for key in ("F1", "F2", "F3"):
        cols = []
        for r in runs:
            v = [s["findings"][key]["verdict"] for s in r["summaries"] if key in s.get("findings", {})]
            n_rep = sum(x == "reproduced" for x in v)
            cols.append(f"{n_rep}/{len(v)} seeds reproduced ({', '.join(v)})" if v else "–")
        lines.append(f"| {key} | " + " | ".join(cols) + " |")
    lines += ["", "## Figure", "", "![compare](compare.png)", ""]

    with atomic_dir(out_dir) as tmp:
        _fig_compare(runs, cells, stats, tmp / "compare.png")
        (tmp / "compare.md").write_text("\n".join(lines))
    print(f"[report] wrote {out_dir / 'compare.md'} and {out_dir / 'compare.png'}")


RUN_MARKERS = ("o", "D", "s", "^", "v", "P", "X", "h")


def _fig_compare(runs: list[dict], cells: list[tuple[str, int]], stats: dict, path: Path) -> None:
    shown = METRICS[:3]
    fig = Figure(figsize=(max(6.0, 0.9 * len(cells) + 2), 3.0 * len(shown) + 1.0), dpi=100, layout="constrained")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    width = 0.7 / max(1, len(runs))
    for ax, (col, title, _) in zip(axes, shown):
        for j, r in enumerate(runs):
            for i, (kind, reps) in enumerate(cells):
                s = stats[(col, kind, reps)][j]
                if s["mean"] is None:
                    continue
                x = i - 0.35 + width * (j + 0.5)
                ax.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]],
                            marker=RUN_MARKERS[j % len(RUN_MARKERS)], color=kind_color(kind), ms=6, capsize=3,
                            ls="none")
        unit = {"steps_to_unlearn": " (steps)", "utility_drop_at_unlearned": " (ppl_t / ppl_0 − 1)",
                "uq_final": " (0 = as θ0, 1 = as θr)"}[col]
        ax.set_ylabel(title + unit, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[-1].set_xticks(range(len(cells)), [f"{k}\n{_reps_title(r)}" for k, r in cells], fontsize=8)
    axes[-1].set_xlabel("forget request (kind, repetitions)")
    kinds = sorted({k for k, _ in cells}, key=_kind_key)
    handles = [Line2D([], [], color=kind_color(k), lw=2.5, label=KIND_LABELS.get(k, k)) for k in kinds]
    handles += [Line2D([], [], color="black", marker=RUN_MARKERS[j % len(RUN_MARKERS)], ls="none", label=r["label"])
                for j, r in enumerate(runs)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle("Runs side by side: mean and 95% interval across seeds")
    fig.savefig(path, format="png")
