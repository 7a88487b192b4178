"""The report's F1 and F2 figure, `finding_effects.png`: small multiples, one panel per cell (an OOD kind against ID at
one repetitions) and finding, each on scales of its own so a wide interval in one cell does not flatten the others.

A panel shows, left of its divider, every request's value on the cell's main target (`by_target[main]["values"]`:
log(1 + steps) to the UQ target for F1, read in steps; log(ppl_t / ppl_0) at the crossing for F2), jittered, censored
ones as hollow triangles (lower bounds), with each side's mean; right of it, on the panel's right-hand axis, the
contrast (F1: OOD − ID, F2: ID − OOD) with its 95% interval, each seed's contrast when the seed is the unit, and an
arrow where censoring left the interval open. Below the panel, the cell's verdict after Holm, in its colour.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

from unlearnbench.reporting.style import kind_color, kind_key, num, suptitle, verdict_colour, wrap_title

X_ID, X_OOD, X_EFFECT = 0.0, 1.0, 2.25
STEP_TICKS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
ROWS = {  # finding -> (row title, value axis label, effect tick label, effect axis label)
    "F1": ("F1 at UQ {t}: OOD − ID in log(1 + steps) to reach the target (> 0 supports F1; ×: the ratio of 1 + steps)",
           "steps to reach UQ {t} (log(1 + steps) scale)", "OOD − ID", "OOD − ID log(1 + steps)"),
    "F2": ("F2 at UQ {t}: ID − OOD in log(ppl_t / ppl_0) on the ID holdout at the crossing (> 0 supports F2)",
           "log(ppl_t / ppl_0) at the crossing", "ID − OOD", "ID − OOD log ppl ratio"),
}


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _steps_axis(ax, lo: float, hi: float) -> None:
    """A log(1 + steps) axis read in steps: round step counts as ticks, at least two of them."""
    ticks = [math.log1p(t) for t in STEP_TICKS]
    inside = [t for t in ticks if lo <= t <= hi]
    if len(inside) < 2:  # widen to the round step counts around the values
        below = [t for t in ticks if t < lo] or [ticks[0]]
        above = [t for t in ticks if t > hi] or [ticks[-1]]
        lo, hi = min(lo, below[-1]), max(hi, above[0])
        inside = [t for t in ticks if lo <= t <= hi]
    if len(inside) > 6:
        inside = inside[::math.ceil(len(inside) / 6)]
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(inside))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{math.expm1(v):.0f}"))


def _values(ax, key: str, c: dict, e: dict, drawn: set, rng) -> None:
    """Each side's per-request values, jittered (censored hollow), and the side's mean."""
    values = e.get("values") or {}
    pts = []
    for x, side, kind in ((X_ID, "id", "id"), (X_OOD, "ood", c["ood_kind"])):
        vals = [v for v in values.get(side, []) if _finite(v.get("value")) is not None]
        if not vals:
            continue
        col = kind_color(kind)
        xs = x + rng.uniform(-0.2, 0.2, len(vals))
        ys = np.array([float(v["value"]) for v in vals])
        cens = np.array([bool(v.get("censored")) for v in vals])
        if (~cens).any():
            ax.plot(xs[~cens], ys[~cens], marker="o", ms=4.5, color=col, alpha=0.8, ls="none")
            drawn.add("value")
        if cens.any():
            ax.plot(xs[cens], ys[cens], marker="^", ms=6, mfc="none", mec=col, mew=1.2, ls="none")
            drawn.add("censored")
        ax.plot([x - 0.32, x + 0.32], [ys.mean()] * 2, color=col, lw=2.2)
        drawn.add("mean")
        drawn.add(kind)
        pts += list(ys)
    if key == "F1":
        lo, hi = (min(pts), max(pts)) if pts else (0.0, math.log1p(10))
        pad = max(0.08 * (hi - lo), 0.15)
        _steps_axis(ax, max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(5))
        if pts:
            lo, hi = min(pts), max(pts)
            pad = max(0.08 * (hi - lo), 0.02 * max(abs(lo), abs(hi)), 0.01)
            ax.set_ylim(lo - pad, hi + pad)


def _effect(ax2, key: str, e: dict, drawn: set, rng) -> str:
    """The contrast with its interval on the panel's right-hand axis, scaled to it; returns its text."""
    mean = _finite(e.get("mean"))
    if mean is None:
        ax2.set_yticks([])
        ax2.text(X_EFFECT, 0.5, "no\ninterval", ha="center", va="center", fontsize=7, color="#555555")
        return "no interval"
    lo, hi = _finite(e.get("lo")), _finite(e.get("hi"))
    seeds = [float(s) for s in (e.get("seed_effects") or []) if _finite(s) is not None]
    pts = [mean, 0.0, *(v for v in (lo, hi) if v is not None), *seeds]
    span = (max(pts) - min(pts)) or max(abs(mean), 1.0)
    bottom, top = min(pts) - 0.1 * span, max(pts) + 0.1 * span
    if lo is None:
        bottom -= 0.15 * span
    if hi is None:
        top += 0.15 * span
    ax2.set_ylim(bottom, top)
    ax2.yaxis.set_major_locator(MaxNLocator(5))
    ax2.plot([X_EFFECT - 0.45, X_EFFECT + 0.45], [0, 0], color="black", ls=":", lw=1)
    drawn.add("zero")
    ax2.errorbar([X_EFFECT], [mean], yerr=[[mean - (lo if lo is not None else mean)],
                                           [(hi if hi is not None else mean) - mean]],
                 marker="D", ms=6, color="black", capsize=4, lw=1.5, ls="none")
    drawn.add("effect")
    for end, edge in ((lo, bottom), (hi, top)):
        if end is None:  # open: censoring left this direction without a bound
            ax2.annotate("", xy=(X_EFFECT, edge), xytext=(X_EFFECT, mean), annotation_clip=False,
                         arrowprops={"arrowstyle": "->", "color": "black", "lw": 1.5})
    if seeds:
        ax2.plot(X_EFFECT + 0.3 + rng.uniform(-0.06, 0.06, len(seeds)), seeds, marker="s", ms=4, color="grey",
                 ls="none")
        drawn.add("seed")
    text = f"{num(mean, '{:.3g}')} [{num(lo, '{:.3g}') if lo is not None else '−∞'}, " \
           f"{num(hi, '{:.3g}') if hi is not None else '∞'}]"
    if key == "F1" and _finite(e.get("ratio")) is not None:
        text += f" (×{num(e['ratio'], '{:.2f}')})"
    return text


def _panel(ax, key: str, c: dict, labels: dict, drawn: set, first: bool, last: bool, target) -> None:
    rng = np.random.default_rng(0)  # the same jitter on every redraw
    e = c["by_target"][c["main"]]
    _values(ax, key, c, e, drawn, rng)
    ax.axvline((X_OOD + X_EFFECT) / 2 + 0.05, color="#999999", lw=0.6)
    ax2 = ax.twinx()
    ax2.set_label(f"{key} {c['cell']} effect")
    ax.set_label(f"{key} {c['cell']} values")
    text = _effect(ax2, key, e, drawn, rng)
    ax.set_xlim(-0.55, X_EFFECT + 0.55)
    ax.set_xticks([X_ID, X_OOD, X_EFFECT], ["ID", c["ood_kind"], ROWS[key][2]], fontsize=7.5)
    ax.tick_params(axis="y", labelsize=7.5)
    ax2.tick_params(axis="y", labelsize=7.5)
    ax.grid(alpha=0.25, axis="y")
    if first:
        ax.set_ylabel(ROWS[key][1].format(t=target), fontsize=8)
    if last and e.get("mean") is not None:
        ax2.set_ylabel(ROWS[key][3], fontsize=8)
    fv = c.get("family_verdict", c.get("verdict", ""))
    ax.set_xlabel(f"{fv} (Holm)", fontsize=8,
                  bbox={"boxstyle": "round,pad=0.3", "fc": verdict_colour(fv), "ec": "none"})
    head = f"r{c['repetitions']} {labels.get(c['ood_kind'], c['ood_kind'])}"
    ax.set_title(wrap_title(head, 2.3, 8.5) + "\n" + text, fontsize=8.5)


def fig_effects(summary: dict, labels: dict) -> Figure:
    """F1 and F2 per cell: every request's value, the contrast with its interval, the verdict after Holm; a row per
    finding, a panel per cell, each on its own scales."""
    findings = summary.get("findings", {})
    target = summary.get("uq_target")
    rows = [(key, findings.get(key, {}).get("contrasts", [])) for key in ROWS]
    ncols = max([1] + [len(cs) for _, cs in rows])
    width = max(8.0, 2.45 * ncols + 0.9)
    fig = Figure(figsize=(width, 2 * 3.6 + 1.3), dpi=100, layout="constrained")
    subs = fig.subfigures(len(rows), 1)
    drawn: set = set()
    for sub, (key, contrasts) in zip(subs, rows):
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        for ax in axes[len(contrasts):]:
            ax.set_visible(False)
        for i, (ax, c) in enumerate(zip(axes, contrasts)):
            _panel(ax, key, c, labels, drawn, i == 0, i == len(contrasts) - 1, target)
        title = ROWS[key][0].format(t=target) if contrasts else f"{key}: no cell with both ID and an OOD kind"
        sub.suptitle(wrap_title(title, width - 0.3, 10), fontsize=10)
    kinds = sorted((k for k in drawn if k in labels or k in ("id", "canary", "domain")), key=kind_key)
    handles = [Patch(color=kind_color(k), label=labels.get(k, k)) for k in kinds]
    marks = (("value", Line2D([], [], color="black", marker="o", ms=4.5, ls="none", label="one request (jittered)")),
             ("censored", Line2D([], [], color="black", marker="^", mfc="none", ls="none",
                                 label="hollow: censored, a lower bound")),
             ("mean", Line2D([], [], color="black", lw=2.2, label="mean of a side")),
             ("effect", Line2D([], [], color="black", marker="D", ls="none", label="contrast, 95% interval")),
             ("seed", Line2D([], [], color="grey", marker="s", ms=4, ls="none", label="one seed's contrast")),
             ("zero", Line2D([], [], color="black", ls=":", label="0: no difference")))
    handles += [h for name, h in marks if name in drawn]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), max(2, int(width // 2.2))),
                   fontsize=8)
    suptitle(fig, "F1 and F2 per cell: each request's value (left), the contrast with its 95% interval (right-hand "
                  "axis), the verdict after Holm (below)")
    return fig
