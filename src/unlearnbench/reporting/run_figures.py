"""The figures of one run's report, from its merged summary (`run_summary.merged_summary`), the requests' curves
and the forgetting table (each example's steps to forget): exposure trajectories, UQ, utility and the trade-off
against steps, steps to forget against memorization and difficulty, survival, and the F1/F2 effects
(`effects_figure`). Each is built as a Figure (`run_figures`, which tests inspect) and written as PNG
(`make_figures`). Headings and captions: `style.FIGURES`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from unlearnbench.reporting.effects_figure import fig_effects
from unlearnbench.reporting.style import (ATTACK_FIGURES, FIGURES, kind_color, kind_key, kind_labels, legend_handles,
                                          new_figure, num, ratio_axis, rep_handles, rep_marker, reps_title,
                                          request_cells, save, step_axis, suptitle)


def _by_reps(summary: dict, curves: dict) -> tuple[list[int], list[str], dict[int, list[dict]]]:
    requests = [g for g in summary["requests"] if g["request"] in curves]
    reps = sorted({int(g["repetitions"]) for g in requests})
    kinds = sorted({g["kind"] for g in requests}, key=kind_key)
    per = {r: sorted([g for g in requests if int(g["repetitions"]) == r], key=lambda g: kind_key(g["kind"]))
           for r in reps}
    return reps, kinds, per


def _line_kw(g: dict, many: bool) -> dict:
    """A request's curve: its kind's colour, thinner and lighter when the panel holds many (panels are per
    repetitions, so no marker)."""
    return {"color": kind_color(g["kind"]), "lw": 1.0 if many else 1.6, "alpha": 0.55 if many else 1.0}


def _legend(fig: Figure, handles: list, ncol: int = 5) -> None:
    fig.legend(handles=handles, loc="outside lower center", ncol=min(ncol, len(handles)), fontsize=8)


def fig_exposure(summary: dict, curves: dict, labels: dict) -> Figure:
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
    oracle = Line2D([], [], color="grey", ls="--", label="same request under oracle θr") if reps else None
    _legend(fig, legend_handles(kinds, labels, [oracle]), 4)
    suptitle(fig, f"Exposure trajectories during unlearning: ID vs OOD ({summary.get('exposure', '')} exposure)")
    return fig


BANDS_UP_TO = 3  # a panel with at most this many requests shows each one's bootstrap band and crossing


def fig_uq(summary: dict, curves: dict, labels: dict) -> Figure:
    """UQ vs step with the bootstrap band, one panel per (kind, repetitions)."""
    cells = [(k, r, [g for g in gs if g["request"] in curves]) for k, r, gs in request_cells(summary["requests"])]
    cells = [c for c in cells if c[2]]
    kinds = sorted({k for k, _, _ in cells}, key=kind_key)
    reps = sorted({r for _, r, _ in cells})
    fig, axes = new_figure(len(reps), 4.0, 2.8, rows=len(kinds))
    for ax in axes.flat:
        ax.set_visible(False)
    target = summary.get("uq_target")
    banded = crossed = False
    for k, r, gs in cells:
        ax = axes[kinds.index(k), reps.index(r)]
        ax.set_visible(True)
        few = len(gs) <= BANDS_UP_TO
        for g in gs:
            c = curves[g["request"]]
            if few and c.uq_lo.notna().any():
                ax.fill_between(c.step, c.uq_lo, c.uq_hi, color=kind_color(k), alpha=0.15, lw=0)
                banded = True
            ax.plot(c.step, c.uq, **_line_kw(g, not few))
            if g.get("steps_to_unlearn") is not None and few and not g.get("nothing_to_forget"):
                ax.axvline(g["steps_to_unlearn"], color=kind_color(k), ls=":", lw=1)
                crossed = True
        if target is not None:
            ax.axhline(target, color="black", ls=":", lw=1)
        note = " (nothing to forget)" if all(g.get("nothing_to_forget") for g in gs) else ""
        ax.set_title(f"{labels.get(k, k)}, {reps_title(r)}{note}", fontsize=9)
        ax.set_ylabel("UQ (0 = as θ0, 1 = as θr)")
        step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3)
    dotted = (f"UQ target {target}" if target is not None else "") + \
        ("; vertical: the step it was reached" if crossed else "")
    extra = [Patch(color="grey", alpha=0.3, label="95% bootstrap band of UQ") if banded else None,
             Line2D([], [], color="black", ls=":", label=dotted.lstrip("; ")) if dotted else None]
    _legend(fig, legend_handles(kinds, labels, extra), 5)
    suptitle(fig, "Unlearning quality vs step")
    return fig


def _ppl_ratio(c: pd.DataFrame) -> pd.Series:
    ratio = 1.0 + c.utility_drop.astype(float)
    return ratio.where(np.isfinite(ratio) & (ratio > 0))


def _ratio_lines(ax, gs: list[dict], curves: dict, many: bool, xy) -> tuple[list[pd.Series], bool]:
    """Each request's curve against its ID-holdout perplexity ratio, `xy(curve, ratio)` giving the plotted (x, y),
    with a star at the step it became unlearned; returns the ratios (the axis scale follows them) and whether a star
    was drawn."""
    ratios, starred = [], False
    for g in gs:
        c = curves[g["request"]]
        ratio = _ppl_ratio(c)
        ratios.append(ratio)
        x, y = xy(c, ratio)
        ax.plot(x, y, **_line_kw(g, many))
        s = g.get("steps_to_unlearn")
        if s is not None and not g.get("nothing_to_forget") and (c.step == s).any():
            at = c.step == s
            if np.isfinite(float(x[at].iloc[0])) and np.isfinite(float(y[at].iloc[0])):
                ax.plot([x[at].iloc[0]], [y[at].iloc[0]], marker="*", ms=9 if many else 12,
                        color=kind_color(g["kind"]), mec="black", mew=0.6, ls="none")
                starred = True
    return ratios, starred


STAR = "star: the step the request became unlearned"


def fig_utility(summary: dict, curves: dict, labels: dict) -> Figure:
    """ID-holdout perplexity ratio ppl_t / ppl_0 vs step, one panel per repetitions."""
    reps, kinds, per = _by_reps(summary, curves)
    fig, axes = new_figure(len(reps))
    starred = False
    for ax, r in zip(axes[0], reps):
        ratios, s = _ratio_lines(ax, per[r], curves, len(per[r]) > len(kinds), lambda c, ratio: (c.step, ratio))
        starred |= s
        ax.axhline(1.0, color="black", lw=0.8)
        scale = ratio_axis(ax, ratios, "y")
        ax.set_title(reps_title(r))
        ax.set_ylabel(f"ID-holdout perplexity ppl_t / ppl_0 (ratio, {scale})")
        step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3, which="both")
    star = Line2D([], [], color="grey", marker="*", ms=10, mec="black", ls="none", label=STAR) if starred else None
    _legend(fig, legend_handles(kinds, labels, [star]), 4)
    suptitle(fig, "Utility on the ID holdout during unlearning")
    return fig


def fig_tradeoff(summary: dict, curves: dict, labels: dict) -> Figure:
    """UQ against the ID-holdout perplexity ratio along each run, one panel per repetitions."""
    reps, kinds, per = _by_reps(summary, curves)
    fig, axes = new_figure(len(reps))
    target = summary.get("uq_target")
    starred = False
    for ax, r in zip(axes[0], reps):
        ratios, s = _ratio_lines(ax, per[r], curves, len(per[r]) > len(kinds), lambda c, ratio: (ratio, c.uq))
        starred |= s
        if target is not None:
            ax.axhline(target, color="black", ls=":", lw=1)
        scale = ratio_axis(ax, ratios, "x")
        ax.set_title(reps_title(r))
        ax.set_xlabel(f"ID-holdout perplexity ppl_t / ppl_0 (ratio, {scale})")
        ax.set_ylabel("UQ (0 = as θ0, 1 = as θr)")
        ax.grid(alpha=0.3, which="both")
    extra = [Line2D([], [], color="grey", marker="*", ms=10, mec="black", ls="none", label=STAR) if starred else None,
             Line2D([], [], color="black", ls=":", label=f"UQ target {target}")
             if target is not None and reps else None]
    _legend(fig, legend_handles(kinds, labels, extra), 5)
    suptitle(fig, "Trade-off: unlearning quality vs utility cost (up and left is better)")
    return fig


def fig_steps_to_forget(summary: dict, forgetting: pd.DataFrame, variable: str, labels: dict) -> Figure:
    """Steps to forget vs `variable` (memorization or difficulty) per example, Spearman ρ per kind in the legend."""
    xlabel = {"memorization": "memorization ℓθr(x) − ℓθ0(x) (nats/token)",
              "difficulty": "difficulty ℓθr(x) (nats/token)"}[variable]
    corr = {c["kind"]: {**c["pooled_spearman_descriptive"][variable], "n": c["n"]}
            for c in summary.get("findings", {}).get("F3", {}).get("kinds", []) if "pooled_spearman_descriptive" in c}
    fig = Figure(figsize=(7.2, 6.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    kinds = sorted(set(forgetting.kind), key=kind_key) if not forgetting.empty else []
    reps = sorted(set(int(r) for r in forgetting.repetitions)) if not forgetting.empty else []
    handles, any_censored = [], False
    for k in kinds:
        sub = forgetting[forgetting.kind == k]
        for r in reps:
            s = sub[sub.repetitions == r]
            for censored, face in ((False, kind_color(k)), (True, "none")):
                part = s[s.censored == censored]
                if len(part):
                    any_censored |= censored
                    ax.scatter(part[variable], part.steps_to_forget, marker=rep_marker(r), s=28, alpha=0.75,
                               facecolors=face, edgecolors=kind_color(k), linewidths=1)
        c = corr.get(k)
        rho = (f": ρ = {num(c['rho'])} [{num(c['lo'])}, {num(c['hi'])}], n = {c['n']}" if c else "")
        handles.append(Patch(color=kind_color(k), label=labels.get(k, k) + rho))
    handles += rep_handles(reps)
    if any_censored:
        handles.append(Line2D([], [], color="black", marker="o", mfc="none", ls="none",
                              label="hollow: censored (not forgotten by the last evaluation)"))
    step_axis(ax, summary.get("max_steps"), axis="y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("steps to forget (optimizer steps, symlog)")
    ax.grid(alpha=0.3)
    if handles:
        fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=2, title_fontsize=8,
                   title="kind: pooled Spearman ρ [95% interval], descriptive (F3 is the Cox model)")
    ax.set_title(f"Steps to forget vs {variable}")
    return fig


def fig_survival(summary: dict, labels: dict) -> Figure:
    """Kaplan-Meier curves of the fraction of examples not yet forgotten, one panel per repetitions."""
    curves = summary.get("survival", {}).get("kaplan_meier", [])
    reps = sorted({c["repetitions"] for c in curves})
    fig, axes = new_figure(len(reps))
    for ax, r in zip(axes[0], reps):
        for c in sorted((c for c in curves if c["repetitions"] == r), key=lambda c: kind_key(c["kind"])):
            km = c["curve"]
            ax.step(km["step"], km["survival"], where="post", color=kind_color(c["kind"]), lw=1.6,
                    label=f"{labels.get(c['kind'], c['kind'])} (n = {c['n']})")
            ax.fill_between(km["step"], km["lo"], km["hi"], step="post", color=kind_color(c["kind"]), alpha=0.15, lw=0)
        ax.set_title(reps_title(r))
        ax.set_ylabel("fraction not yet forgotten")
        ax.set_ylim(-0.02, 1.02)
        step_axis(ax, summary.get("max_steps"))
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + [Patch(color="grey", alpha=0.3, label="95% band")]
        ax.legend(handles=handles, fontsize=7)
    suptitle(fig, "Example level: fraction of forget examples not yet forgotten (Kaplan-Meier, 95% band)")
    return fig


def run_figures(summary: dict, curves: dict[str, pd.DataFrame], forgetting: pd.DataFrame,
                labels: dict[str, str] | None = None) -> dict[str, Figure]:
    """Every figure of a run's report but the attack figures, from its merged summary, the requests' curves and the
    forgetting table (`results.load_run`), the kinds named by `labels` (`style.kind_labels`); name -> Figure."""
    labels = labels or kind_labels()
    figs = {"exposure_trajectories": fig_exposure(summary, curves, labels),
            "uq_vs_step": fig_uq(summary, curves, labels),
            "utility_vs_step": fig_utility(summary, curves, labels),
            "uq_vs_utility": fig_tradeoff(summary, curves, labels)}
    for var in ("memorization", "difficulty"):
        figs[f"steps_to_forget_vs_{var}"] = fig_steps_to_forget(summary, forgetting, var, labels)
    figs["survival"] = fig_survival(summary, labels)
    figs["finding_effects"] = fig_effects(summary, labels)
    assert list(figs) == [n for n in FIGURES if n not in ATTACK_FIGURES]
    return figs


def make_figures(summary: dict, curves: dict[str, pd.DataFrame], forgetting: pd.DataFrame, out_dir: Path,
                 labels: dict[str, str] | None = None) -> dict[str, Path]:
    """Render every figure of `run_figures` into `out_dir` as PNG; returns name -> PNG path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: save(fig, out_dir / f"{name}.png")
            for name, fig in run_figures(summary, curves, forgetting, labels).items()}
