"""The figures of the attack stage's results in a run's report: exposure during relearning, the recovered share
after each attack, membership-inference AUC. Headings and captions: `style.FIGURES`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D

from unlearnbench.reporting.style import kind_color, kind_key, legend_handles, new_figure, rep_marker, save

RECOVERED = ("relearn_forget_fraction", "relearn_retain", "int8", "int4")


def attack_figures(run_dir: Path, results: list[dict], out_dir: Path) -> dict[str, Path]:
    """Exposure during relearning (ID vs OOD, oracle dashed), recovered share per request and attack, MIA AUC, from
    the attacked requests' results; returns name -> PNG path."""
    reqs = sorted(results, key=lambda r: (kind_key(r["kind"]), r["repetitions"], r["request"]))
    paths = {"relearning": out_dir / "relearning.png", "recovered": out_dir / "recovered.png",
             "mia_auc": out_dir / "mia_auc.png"}
    fig_relearning(Path(run_dir), reqs, paths["relearning"])
    fig_recovered(reqs, paths["recovered"])
    fig_mia_auc(reqs, paths["mia_auc"])
    return paths


def fig_relearning(run_dir: Path, reqs: list[dict], path: Path) -> None:
    """Mean exposure of each attacked request over relearning steps, from the unlearned model and from θr."""
    fig, axes = new_figure(2, 5.0, 3.6)
    for ax, variant in zip(axes[0], ("forget_fraction", "retain")):
        for r in reqs:
            p = run_dir / "attacks" / r["request"] / "relearning.parquet"
            if not p.exists():
                continue
            c = pd.read_parquet(p)
            for start, ls in (("unlearned", "-"), ("oracle", "--")):
                part = c[(c.variant == variant) & (c.start == start)]
                ax.plot(part.step, part.exposure_mean, ls=ls, color=kind_color(r["kind"]),
                        marker=rep_marker(r["repetitions"]), ms=3, lw=1.2, alpha=0.8)
        ax.set_title({"forget_fraction": "relearning on part of the forget set",
                      "retain": "relearning on retain data"}[variant], fontsize=9)
        ax.set_xlabel("relearning step")
        ax.set_ylabel("mean exposure of the request (bits)")
        ax.grid(alpha=0.3)
    kinds = sorted({r["kind"] for r in reqs}, key=kind_key)
    extra = [Line2D([], [], color="grey", ls="-", label="from the unlearned model"),
             Line2D([], [], color="grey", ls="--", label="from the oracle θr (yardstick)")]
    fig.legend(handles=legend_handles(kinds, sorted({r["repetitions"] for r in reqs}), extra),
               loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle("Exposure during relearning: ID vs OOD, and the oracle picking up the same data")
    save(fig, path)


def fig_recovered(reqs: list[dict], path: Path) -> None:
    """The recovered share of each request after each attack, with its interval."""
    fig, axes = new_figure(1, max(6.0, 0.5 * len(reqs) + 2), 3.8)
    ax = axes[0][0]
    for j, name in enumerate(RECOVERED):
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
    fig.legend(handles=[Line2D([], [], color="black", marker="osD^"[j], ls="none", label=n)
                        for j, n in enumerate(RECOVERED)], loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle("How much comes back after each attack (beyond the oracle attacked the same way), 95% intervals")
    save(fig, path)


def fig_mia_auc(reqs: list[dict], path: Path) -> None:
    """Min-K%++ AUC of each request's examples against its references under θ0, the unlearned model and θr."""
    fig, axes = new_figure(1, max(6.0, 0.5 * len(reqs) + 2), 3.8)
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
    save(fig, path)
