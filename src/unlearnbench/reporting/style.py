"""The look shared by every figure and table of the reports: one colour per kind (ID blue, canary vermillion, domain
green: Okabe-Ito, colour-blind safe), one marker per repetitions, the study's order of kinds, number formatting,
and the axes (symlog steps, perplexity ratios). Figures use matplotlib's object API (no pyplot, so no global
backend state).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

KIND_ORDER = ("id", "canary", "domain")
KIND_COLORS = {"id": "#0072B2", "canary": "#D55E00", "domain": "#009E73"}  # Okabe-Ito: colour-blind safe
KIND_LABELS = {"id": "ID (KJV)", "canary": "OOD canary", "domain": "OOD domain"}
REP_MARKERS = {1: "o", 4: "s", 16: "^"}
OTHER_MARKERS = ("D", "v", "P", "X", "h", "<", ">")
STEP_LABEL = "unlearning step (optimizer steps, symlog)"
# One colour per verdict (overall, family-wise and unadjusted; F4 names its two directions), everywhere.
VERDICT_COLOURS = {"reproduced": "#1a9850", "partly reproduced": "#a6d96a", "not reproduced": "#fdae61",
                   "not significant": "#fdae61", "reversed": "#d73027", "partly reversed": "#f46d43",
                   "mixed": "#762a83", "OOD recovers more": "#2166ac", "ID recovers more": "#67a9cf",
                   "inconclusive": "#d9d9d9"}


def verdict_colour(verdict: str) -> str:
    """The colour of a verdict; an unadjusted F4 reading "reproduced (OOD recovers more)" takes its direction's."""
    v = str(verdict)
    if v not in VERDICT_COLOURS and v.endswith(")") and "(" in v:
        v = v[v.index("(") + 1:-1]
    return VERDICT_COLOURS.get(v, "#ffffff")
ATTACK_FIGURES = ("relearning", "recovered", "mia_auc")  # only when the attack stage ran
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


def num(x, fmt: str = "{:.2f}") -> str:
    """A number for a table or a printed line; "–" for a missing or non-finite one."""
    if x is None or not math.isfinite(float(x)):
        return "–"
    return fmt.format(x)


def kind_color(kind: str) -> str:
    """The colour of a forget kind in every figure (grey for kinds outside the study's three)."""
    return KIND_COLORS.get(kind, "#666666")


def rep_marker(reps: int) -> str:
    """The marker of a repetitions count in every figure."""
    return REP_MARKERS.get(int(reps), OTHER_MARKERS[abs(int(reps)) % len(OTHER_MARKERS)])


def kind_key(kind: str) -> tuple:
    """Sort key: the study's kinds in their order (ID, canary, domain), any other after them by name."""
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def request_cells(requests: list[dict]) -> list[tuple[str, int, list[dict]]]:
    """Request rows grouped by cell, (kind, repetitions), in the study's order."""
    by: dict[tuple[str, int], list[dict]] = {}
    for g in requests:
        by.setdefault((g["kind"], int(g["repetitions"])), []).append(g)
    return [(k, r, by[(k, r)]) for k, r in sorted(by, key=lambda c: (kind_key(c[0]), c[1]))]


def mean(values) -> float | None:
    """Mean of the finite values; None when there is none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def reps_title(reps: int) -> str:
    """"1 repetition", "4 repetitions"."""
    return f"{reps} repetition" + ("" if reps == 1 else "s")


def step_axis(ax, max_steps: int | None, axis: str = "x") -> None:
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


def ratio_axis(ax, curves: list[pd.Series], axis: str) -> str:
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


def legend_handles(kinds: list[str], reps: list[int], extra: list[Line2D] = ()) -> list[Line2D]:
    """Legend entries: a line per kind (its colour), a marker per repetitions, then `extra`."""
    h = [Line2D([], [], color=kind_color(k), lw=2.5, label=KIND_LABELS.get(k, k)) for k in kinds]
    h += [Line2D([], [], color="black", marker=rep_marker(r), ls="none", label=reps_title(r)) for r in reps]
    return h + list(extra)


def new_figure(n_panels: int, width: float = 4.6, height: float = 3.6, rows: int = 1) -> tuple[Figure, np.ndarray]:
    """A figure of `rows` x `n_panels` panels (2-D array of axes), room below for the legend."""
    n_panels, rows = max(1, n_panels), max(1, rows)  # a run without curves still gets a (blank) figure
    fig = Figure(figsize=(width * n_panels, height * rows + 0.9), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, n_panels, squeeze=False))
    return fig, axes


def save(fig: Figure, path: Path) -> None:
    """Write the figure as PNG."""
    fig.savefig(path, format="png")
