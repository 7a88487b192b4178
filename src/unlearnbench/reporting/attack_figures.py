"""The figures of the attack stage's results in a run's report: exposure during relearning, the recovered share
after each attack, membership-inference AUC. Each is built as a Figure (`build_attack_figures`, which tests inspect)
and written as PNG (`attack_figures`). Headings and captions: `style.FIGURES`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from unlearnbench.reporting.style import (ATTACK_FIGURES, kind_color, kind_key, kind_labels, legend_handles, new_figure,
                                          rep_handles, rep_marker, save, suptitle)

RECOVERED = ("relearn_forget_fraction", "relearn_retain", "int8", "int4")


def build_attack_figures(run_dir: Path, results: list[dict], labels: dict[str, str] | None = None) -> dict[str, Figure]:
    """Exposure during relearning (ID vs OOD, oracle dashed), recovered share per request and attack, MIA AUC, from
    the attacked requests' results, the kinds named by `labels` (`style.kind_labels`); name -> Figure."""
    labels = labels or kind_labels()
    reqs = sorted(results, key=lambda r: (kind_key(r["kind"]), r["repetitions"], r["request"]))
    figs = {"relearning": fig_relearning(Path(run_dir), reqs, labels), "recovered": fig_recovered(reqs, labels),
            "mia_auc": fig_mia_auc(reqs, labels)}
    assert tuple(figs) == ATTACK_FIGURES
    return figs


def attack_figures(run_dir: Path, results: list[dict], out_dir: Path,
                   labels: dict[str, str] | None = None) -> dict[str, Path]:
    """The figures of `build_attack_figures` written into `out_dir` as PNG; returns name -> PNG path."""
    return {name: save(fig, Path(out_dir) / f"{name}.png")
            for name, fig in build_attack_figures(run_dir, results, labels).items()}


def _kind_swatches(reqs: list[dict], labels: dict) -> list[Patch]:
    return [Patch(color=kind_color(k), label=labels.get(k, k)) for k in sorted({r["kind"] for r in reqs}, key=kind_key)]


def fig_relearning(run_dir: Path, reqs: list[dict], labels: dict) -> Figure:
    """Mean exposure of each attacked request over relearning steps, from the unlearned model and from θr."""
    fig, axes = new_figure(2, 5.0, 3.6)
    drawn = []
    for ax, variant in zip(axes[0], ("forget_fraction", "retain")):
        for r in reqs:
            p = run_dir / "attacks" / r["request"] / "relearning.parquet"
            if not p.exists():
                continue
            c = pd.read_parquet(p)
            drawn.append(r)
            for start, ls in (("unlearned", "-"), ("oracle", "--")):
                part = c[(c.variant == variant) & (c.start == start)]
                ax.plot(part.step, part.exposure_mean, ls=ls, color=kind_color(r["kind"]),
                        marker=rep_marker(r["repetitions"]), ms=3, lw=1.2, alpha=0.8)
        ax.set_title({"forget_fraction": "relearning on part of the forget set",
                      "retain": "relearning on retain data"}[variant], fontsize=9)
        ax.set_xlabel("relearning step")
        ax.set_ylabel("mean exposure of the request (bits)")
        ax.grid(alpha=0.3)
    kinds = sorted({r["kind"] for r in drawn}, key=kind_key)
    extra = rep_handles(sorted({r["repetitions"] for r in drawn}))
    if drawn:
        extra += [Line2D([], [], color="grey", ls="-", label="from the unlearned model"),
                  Line2D([], [], color="grey", ls="--", label="from the oracle θr (yardstick)")]
    handles = legend_handles(kinds, labels, extra)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)
    suptitle(fig, "Exposure during relearning: ID vs OOD, and the oracle picking up the same data")
    return fig


def fig_recovered(reqs: list[dict], labels: dict) -> Figure:
    """The recovered share of each request after each attack, with its interval."""
    fig, axes = new_figure(1, max(7.0, 0.5 * len(reqs) + 2), 3.8)
    ax = axes[0][0]
    used = set()
    for j, name in enumerate(RECOVERED):
        for x, r in enumerate(reqs):
            d = r.get(name) or r.get("quantization", {}).get(name) or {}
            if d.get("recovered") is None:
                continue
            lo = d["lo"] if d.get("lo") is not None else d["recovered"]
            hi = d["hi"] if d.get("hi") is not None else d["recovered"]
            ax.errorbar([x + (j - 1.5) * 0.18], [d["recovered"]], yerr=[[d["recovered"] - lo], [hi - d["recovered"]]],
                        marker="osD^"[j], color=kind_color(r["kind"]), ms=4, capsize=2, ls="none")
            used.add(j)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(reqs)), [r["request"] for r in reqs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("recovered share of the exposure gap")
    ax.grid(alpha=0.3, axis="y")
    handles = _kind_swatches(reqs, labels) + [Line2D([], [], color="black", marker="osD^"[j], ls="none", label=n)
                                              for j, n in enumerate(RECOVERED) if j in used]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles) or 1), fontsize=8)
    suptitle(fig, "How much comes back after each attack, beyond the oracle attacked the same way (95% intervals)")
    return fig


def fig_mia_auc(reqs: list[dict], labels: dict) -> Figure:
    """Min-K%++ AUC of each request's examples against its references under θ0, the unlearned model and θr."""
    fig, axes = new_figure(1, max(7.0, 0.5 * len(reqs) + 2), 3.8)
    ax = axes[0][0]
    used = set()
    for j, model in enumerate(("original", "unlearned", "oracle")):
        for x, r in enumerate(reqs):
            v = r.get("mia", {}).get(model, {}).get("min_k_pp")
            if v is not None:
                ax.plot([x + (j - 1) * 0.2], [v], marker="o^s"[j], color=kind_color(r["kind"]), ls="none")
                used.add(j)
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xticks(range(len(reqs)), [r["request"] for r in reqs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("Min-K%++ AUC, members vs references")
    ax.grid(alpha=0.3, axis="y")
    handles = _kind_swatches(reqs, labels)
    handles += [Line2D([], [], color="black", marker="o^s"[j], ls="none", label=m)
                for j, m in enumerate(("θ0 original", "θt unlearned", "θr oracle")) if j in used]
    handles.append(Line2D([], [], color="black", ls=":", lw=0.8, label="0.5: chance"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8)
    suptitle(fig, "Membership inference before unlearning, after it, and under the oracle")
    return fig
