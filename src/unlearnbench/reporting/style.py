"""The look shared by every figure and table of the reports: one colour per kind (ID blue, canary vermillion, domain
green: Okabe-Ito, colour-blind safe), one marker per repetitions, the kinds' labels (naming the run's corpora), the
study's order of kinds, number formatting, the axes (symlog steps, perplexity ratios) and titles wrapped to their
figure's width. Figures use matplotlib's object API (no pyplot, so no global backend state).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from unlearnbench.data.corpora import LOCAL_FORMATS

KIND_ORDER = ("id", "canary", "domain")
KIND_COLORS = {"id": "#0072B2", "canary": "#D55E00", "domain": "#009E73"}  # Okabe-Ito: colour-blind safe
KIND_LABELS = {"id": "ID", "canary": "OOD canary", "domain": "OOD domain"}  # without the corpora: `kind_labels`
CORPUS_NAMES = {"kjv": "KJV", "pydoc": "pydoc", "pystdlib": "pystdlib"}  # the built-in corpora
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
                   "UQ of each request; a panel of at most three requests shows each one's 95% bootstrap band and, "
                   "dotted vertical, the step it reached the UQ target (dotted horizontal)."),
    "utility_vs_step": ("Utility vs step",
                        "ID-holdout perplexity relative to θ0 (utility drop = ratio − 1); star: the step the "
                        "request became unlearned."),
    "uq_vs_utility": ("Trade-off: unlearning quality vs utility",
                      "UQ against the utility cost along each unlearning run; star: the step it became unlearned."),
    "steps_to_forget_vs_memorization": ("Steps to forget vs memorization",
                                        "Per example; hollow markers: censored (not forgotten by the request's last "
                                        "evaluation). The pooled ρ is descriptive: F3 is the Cox model within "
                                        "requests."),
    "steps_to_forget_vs_difficulty": ("Steps to forget vs difficulty",
                                      "Per example; hollow markers: censored (not forgotten by the request's last "
                                      "evaluation). The pooled ρ is descriptive."),
    "survival": ("Fraction not yet forgotten (Kaplan-Meier)",
                 "Per kind and repetitions, pooled over the replicate groups, with the 95% band; the log-rank test "
                 "OOD vs ID per repetitions is in the text."),
    "relearning": ("Exposure during relearning", "Mean exposure of each attacked request over relearning steps; "
                   "dashed: the oracle θr given the same steps on the same data."),
    "recovered": ("Recovered share after each attack", "Per request and attack, with the 95% bootstrap interval; 0 = "
                  "no more than the oracle picks up."),
    "mia_auc": ("Membership inference AUC", "Min-K%++ AUC of the request's examples against its references under θ0, "
                "the unlearned model and θr."),
    "finding_effects": ("F1 and F2 per cell",
                        "A panel per cell and finding, each on scales of its own. Left: every request's value on the "
                        "main target (F1: steps to reach the UQ target, on a log(1 + steps) scale; F2: log(ppl_t / "
                        "ppl_0) at the crossing), jittered, hollow triangles censored (lower bounds), bars the side "
                        "means. Right-hand axis: the contrast (F1: OOD − ID log(1 + steps), × its ratio of 1 + steps; "
                        "F2: ID − OOD; > 0 supports the finding) with its 95% interval, grey squares each seed's "
                        "contrast when the seed is the unit, an arrow where censoring leaves the interval open. Below "
                        "each panel its verdict after Holm, in its colour."),
}


def corpus_name(corpus: str) -> str:
    """A corpus as a label: a built-in one by its name, a local file by its stem, a hub data set by its name."""
    c = str(corpus)
    if c in CORPUS_NAMES:
        return CORPUS_NAMES[c]
    return Path(c).stem if Path(c).suffix.lower() in LOCAL_FORMATS else c


def kind_labels(corpora: dict | None = None) -> dict[str, str]:
    """The kinds' labels for one run, naming its corpora (data/manifest.json's `corpora`: {"id": ..., "domain":
    ...}): "ID (KJV)", "OOD canary", "OOD domain (pydoc)"; without them, the bare `KIND_LABELS`."""
    labels = dict(KIND_LABELS)
    for kind in ("id", "domain"):
        if (corpora or {}).get(kind):
            labels[kind] = f"{KIND_LABELS[kind]} ({corpus_name(corpora[kind])})"
    return labels


def wrap_title(text: str, width_in: float, fontsize: float = 12.0) -> str:
    """`text` broken into lines that fit a figure (or panel) `width_in` inches wide at `fontsize` points."""
    chars = max(20, int(width_in * 72 / (0.52 * fontsize)))  # DejaVu Sans averages about half an em a character
    return "\n".join(textwrap.wrap(text, chars))


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


def log_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """At most `most` round ticks (1-2-5 within a decade, fewer per decade as the span grows) covering [lo, hi] of a
    log axis, at least two."""
    lo, hi = max(lo, 1e-12), max(hi, lo * 1.0001)
    for subs in ((1, 1.2, 1.5, 2, 3, 5, 7), (1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in subs if lo <= m * 10.0 ** e <= hi]
        if len(ticks) <= most:
            break
    else:  # more decades than `most`: every k-th decade
        decades = [10.0 ** e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
        ticks = decades[::math.ceil(len(decades) / most)]
    if len(ticks) < 2:  # a narrow span: its ends
        ticks = sorted({float(f"{lo:.2g}"), float(f"{hi:.2g}")})
    return ticks


def _tick_text(v: float) -> str:
    return f"{v:g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")


def ratio_axis(ax, curves: list[pd.Series], axis: str) -> str:
    """Log scale for a perplexity ratio when it spans more than 3x, else linear; at most six plain-number ticks."""
    vals = pd.concat(curves).dropna() if curves else pd.Series(dtype=float)
    vals = vals[np.isfinite(vals) & (vals > 0)]
    log = bool(len(vals)) and vals.max() / vals.min() > 3
    a = ax.xaxis if axis == "x" else ax.yaxis
    if log:
        lo, hi = float(vals.min()), float(vals.max())
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        (ax.set_xlim if axis == "x" else ax.set_ylim)(lo / 1.15, hi * 1.15)
        a.set_major_locator(FixedLocator(log_ticks(lo / 1.15, hi * 1.15)))
        a.set_minor_locator(NullLocator())
        a.set_major_formatter(FuncFormatter(lambda v, _: _tick_text(v)))
    return "log" if log else "linear"


def legend_handles(kinds: list[str], labels: dict[str, str], extra: list = ()) -> list[Line2D]:
    """Legend entries: a line per kind (its colour, its label from `kind_labels`), then `extra`."""
    h = [Line2D([], [], color=kind_color(k), lw=2.5, label=labels.get(k, k)) for k in kinds]
    return h + [e for e in extra if e is not None]


def rep_handles(reps: list[int]) -> list[Line2D]:
    """Legend entries: a black marker per repetitions (for figures whose marks take `rep_marker`)."""
    return [Line2D([], [], color="black", marker=rep_marker(r), ls="none", label=reps_title(r)) for r in reps]


def new_figure(n_panels: int, width: float = 4.6, height: float = 3.6, rows: int = 1) -> tuple[Figure, np.ndarray]:
    """A figure of `rows` x `n_panels` panels (2-D array of axes), room below for the legend."""
    n_panels, rows = max(1, n_panels), max(1, rows)  # a run without curves still gets a (blank) figure
    fig = Figure(figsize=(width * n_panels, height * rows + 0.9), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, n_panels, squeeze=False))
    return fig, axes


def suptitle(fig: Figure, text: str, fontsize: float = 12.0) -> None:
    """The figure's title, wrapped to its width."""
    fig.suptitle(wrap_title(text, fig.get_figwidth() - 0.3, fontsize), fontsize=fontsize)


def save(fig: Figure, path: Path) -> Path:
    """Write the figure as PNG; returns `path`."""
    fig.savefig(path, format="png")
    return Path(path)
