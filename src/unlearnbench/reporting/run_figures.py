"""The figures of one run's report, from its merged summary (`run_summary.merged_summary`), the requests' curves
and the forgetting table (each example's steps to forget): exposure trajectories, UQ, utility and the trade-off
against steps, steps to forget against memorization and difficulty, survival, and the F1/F2 effects.
Headings and captions: `style.FIGURES`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from unlearnbench.reporting.style import (ATTACK_FIGURES, FIGURES, KIND_LABELS, kind_color, kind_key, legend_handles,
                                          new_figure, num, ratio_axis, rep_marker, reps_title, request_cells, save,
                                          step_axis)


def _by_reps(summary: dict, curves: dict) -> tuple[list[int], list[str], dict[int, list[dict]]]:
    requests = [g for g in summary["requests"] if g["request"] in curves]
    reps = sorted({int(g["repetitions"]) for g in requests})
    kinds = sorted({g["kind"] for g in requests}, key=kind_key)
    per = {r: sorted([g for g in requests if int(g["repetitions"]) == r], key=lambda g: kind_key(g["kind"]))
           for r in reps}
    return reps, kinds, per


def _line_kw(g: dict, many: bool) -> dict:
    return {"color": kind_color(g["kind"]), "marker": None if many else rep_marker(g["repetitions"]),
            "ms": 4, "lw": 0.8 if many else 1.6, "alpha": 0.35 if many else 1.0}


def fig_exposure(summary: dict, curves: dict, path: Path) -> None:
    """Mean exposure (bits) vs step per request, one panel per repetitions; oracle level dashed."""
    reps, kinds, per = _by_reps(summary, curves)
    fig, axes = new_figure(len(reps))
    for ax, r in zip(axes[0], reps):
        many = len(per[r]) > len(kinds)
        for g in per[r]:
            c = curves[g["request"]]
            ax.plot(c.step, c.exposure_mean, **_line_kw(g, many))
            ax.axhline(float(c.exposure_oracle_mean.iloc[0]), color=kind_color(g["kind"]), ls="--", lw=1,
                       alpha=0.4 if many else 0.9)
        ax.set_title(reps_title(r))
        ax.set_ylabel("mean exposure of the request (bits)")
        step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="grey", ls="--", label="same request under oracle θr")]
    fig.legend(handles=legend_handles(kinds, reps, extra), loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(f"Exposure trajectories during unlearning: ID vs OOD ({summary.get('exposure', '')} exposure)")
    save(fig, path)


def fig_uq(summary: dict, curves: dict, path: Path) -> None:
    """UQ vs step with the bootstrap band, one panel per (kind, repetitions)."""
    cells = [(k, r, [g for g in gs if g["request"] in curves]) for k, r, gs in request_cells(summary["requests"])]
    cells = [c for c in cells if c[2]]
    kinds = sorted({k for k, _, _ in cells}, key=kind_key)
    reps = sorted({r for _, r, _ in cells})
    fig, axes = new_figure(len(reps), 4.0, 2.8, rows=len(kinds))
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
        ax.set_title(f"{KIND_LABELS.get(k, k)}, {reps_title(r)}{note}", fontsize=9)
        ax.set_ylabel("UQ (0 = as θ0, 1 = as θr)")
        step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="grey", lw=6, alpha=0.3, label="95% bootstrap interval"),
             Line2D([], [], color="black", ls=":", label=f"UQ target {target}")]
    fig.legend(handles=legend_handles(kinds, reps, extra), loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle("Unlearning quality vs step")
    save(fig, path)


def _ppl_ratio(c: pd.DataFrame) -> pd.Series:
    ratio = 1.0 + c.utility_drop.astype(float)
    return ratio.where(np.isfinite(ratio) & (ratio > 0))


def _ratio_lines(ax, gs: list[dict], curves: dict, many: bool, xy) -> list[pd.Series]:
    """Each request's curve against its ID-holdout perplexity ratio, `xy(curve, ratio)` giving the plotted (x, y),
    with a star at the step it became unlearned; returns the ratios (the axis scale follows them)."""
    ratios = []
    for g in gs:
        c = curves[g["request"]]
        ratio = _ppl_ratio(c)
        ratios.append(ratio)
        x, y = xy(c, ratio)
        ax.plot(x, y, **_line_kw(g, many))
        s = g.get("steps_to_unlearn")
        if s is not None and not many and not g.get("nothing_to_forget") and (c.step == s).any():
            at = c.step == s
            ax.plot([x[at].iloc[0]], [y[at].iloc[0]], marker="*", ms=12, color=kind_color(g["kind"]),
                    mec="black", mew=0.6, ls="none")
    return ratios


def fig_utility(summary: dict, curves: dict, path: Path) -> None:
    """ID-holdout perplexity ratio ppl_t / ppl_0 vs step, one panel per repetitions."""
    reps, kinds, per = _by_reps(summary, curves)
    fig, axes = new_figure(len(reps))
    for ax, r in zip(axes[0], reps):
        ratios = _ratio_lines(ax, per[r], curves, len(per[r]) > len(kinds), lambda c, ratio: (c.step, ratio))
        ax.axhline(1.0, color="black", lw=0.8)
        scale = ratio_axis(ax, ratios, "y")
        ax.set_title(reps_title(r))
        ax.set_ylabel(f"ID-holdout perplexity ppl_t / ppl_0 (ratio, {scale})")
        step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3, which="both")
    extra = [Line2D([], [], color="grey", marker="*", ms=10, mec="black", ls="none", label="step it became unlearned")]
    fig.legend(handles=legend_handles(kinds, reps, extra), loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle("Utility on the ID holdout during unlearning")
    save(fig, path)


def fig_tradeoff(summary: dict, curves: dict, path: Path) -> None:
    """UQ against the ID-holdout perplexity ratio along each run, one panel per repetitions."""
    reps, kinds, per = _by_reps(summary, curves)
    fig, axes = new_figure(len(reps))
    target = summary.get("uq_target")
    for ax, r in zip(axes[0], reps):
        ratios = _ratio_lines(ax, per[r], curves, len(per[r]) > len(kinds), lambda c, ratio: (ratio, c.uq))
        if target is not None:
            ax.axhline(target, color="black", ls=":", lw=1)
        scale = ratio_axis(ax, ratios, "x")
        ax.set_title(reps_title(r))
        ax.set_xlabel(f"ID-holdout perplexity ppl_t / ppl_0 (ratio, {scale})")
        ax.set_ylabel("UQ (0 = as θ0, 1 = as θr)")
        ax.grid(alpha=0.3, which="both")
    extra = [Line2D([], [], color="grey", marker="*", ms=10, mec="black", ls="none", label="unlearned"),
             Line2D([], [], color="black", ls=":", label=f"UQ target {target}")]
    fig.legend(handles=legend_handles(kinds, reps, extra), loc="outside lower center", ncol=5, fontsize=8)
    fig.suptitle("Trade-off: unlearning quality vs utility cost (up and left is better)")
    save(fig, path)


def fig_steps_to_forget(summary: dict, forgetting: pd.DataFrame, variable: str, path: Path) -> None:
    """Steps to forget vs `variable` (memorization or difficulty) per example, Spearman ρ per kind in the legend."""
    xlabel = {"memorization": "memorization ℓθr(x) − ℓθ0(x) (nats/token)",
              "difficulty": "difficulty ℓθr(x) (nats/token)"}[variable]
    corr = {c["kind"]: {**c["pooled_spearman_descriptive"][variable], "n": c["n"]}
            for c in summary.get("findings", {}).get("F3", {}).get("kinds", [])}
    fig = Figure(figsize=(7.2, 6.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    kinds = sorted(set(forgetting.kind), key=kind_key) if not forgetting.empty else []
    reps = sorted(set(int(r) for r in forgetting.repetitions)) if not forgetting.empty else []
    handles = []
    for k in kinds:
        sub = forgetting[forgetting.kind == k]
        for r in reps:
            s = sub[sub.repetitions == r]
            for censored, face in ((False, kind_color(k)), (True, "none")):
                part = s[s.censored == censored]
                if len(part):
                    ax.scatter(part[variable], part.steps_to_forget, marker=rep_marker(r), s=28, alpha=0.75,
                               facecolors=face, edgecolors=kind_color(k), linewidths=1)
        c = corr.get(k)
        rho = (f": ρ = {num(c['rho'])} [{num(c['lo'])}, {num(c['hi'])}], n = {c['n']}" if c else "")
        handles.append(Line2D([], [], color=kind_color(k), marker="o", ls="none", label=KIND_LABELS.get(k, k) + rho))
    handles += [Line2D([], [], color="black", marker=rep_marker(r), ls="none", label=reps_title(r))
                for r in reps]
    handles.append(Line2D([], [], color="black", marker="o", mfc="none", ls="none",
                          label="censored: not forgotten by its request's last evaluation"))
    step_axis(ax, summary.get("max_steps"), axis="y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("steps to forget (optimizer steps, symlog)")
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=2,
               title="kind: pooled Spearman ρ(steps to forget, " + variable + ") [95% interval], descriptive only "
                     "(confounded by repetitions; F3 uses the Cox model)", title_fontsize=8)
    ax.set_title(f"Steps to forget vs {variable}")
    save(fig, path)


def fig_survival(summary: dict, path: Path) -> None:
    """Kaplan-Meier curves of the fraction of examples not yet forgotten, one panel per repetitions."""
    curves = summary.get("survival", {}).get("kaplan_meier", [])
    reps = sorted({c["repetitions"] for c in curves})
    fig, axes = new_figure(len(reps))
    for ax, r in zip(axes[0], reps):
        for c in sorted((c for c in curves if c["repetitions"] == r), key=lambda c: kind_key(c["kind"])):
            km = c["curve"]
            ax.step(km["step"], km["survival"], where="post", color=kind_color(c["kind"]), lw=1.6,
                    label=f"{KIND_LABELS.get(c['kind'], c['kind'])} (n = {c['n']})")
            ax.fill_between(km["step"], km["lo"], km["hi"], step="post", color=kind_color(c["kind"]), alpha=0.15, lw=0)
        ax.set_title(reps_title(r))
        ax.set_ylabel("fraction not yet forgotten")
        ax.set_ylim(-0.02, 1.02)
        step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Example level: fraction of forget examples not yet forgotten (Kaplan-Meier, 95% band)")
    save(fig, path)


def fig_effects(summary: dict, path: Path) -> None:
    """F1 and F2 per contrast (an OOD kind against ID at one repetitions): every replicate pair's difference and the
    mean with its interval."""
    findings = summary.get("findings", {})
    fig, axes = new_figure(2, 5.2, 3.8)
    for ax, key, unit in ((axes[0][0], "F1", "OOD − ID steps to reach the target"),
                          (axes[0][1], "F2", "ID − OOD log(ppl_t / ppl_0) at the crossing")):
        contrasts = findings.get(key, {}).get("contrasts", [])
        for x, c in enumerate(contrasts):
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
        ax.set_xticks(range(len(contrasts)), [f"r{c['repetitions']}\n{c['ood_kind']}" for c in contrasts], fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_title(f"{key} at UQ {summary.get('uq_target')}")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Effects over replicate pairs (dots) with mean and 95% t-interval (black)")
    save(fig, path)


def make_figures(summary: dict, curves: dict[str, pd.DataFrame], forgetting: pd.DataFrame,
                 out_dir: Path) -> dict[str, Path]:
    """Render every figure of a run's report but the attack figures into `out_dir`, from its merged summary, the
    requests' curves and the forgetting table (`results.load_run`); returns name -> PNG path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.png" for name in FIGURES if name not in ATTACK_FIGURES}
    fig_exposure(summary, curves, paths["exposure_trajectories"])
    fig_uq(summary, curves, paths["uq_vs_step"])
    fig_utility(summary, curves, paths["utility_vs_step"])
    fig_tradeoff(summary, curves, paths["uq_vs_utility"])
    for var in ("memorization", "difficulty"):
        fig_steps_to_forget(summary, forgetting, var, paths[f"steps_to_forget_vs_{var}"])
    fig_survival(summary, paths["survival"])
    fig_effects(summary, paths["finding_effects"])
    return paths
