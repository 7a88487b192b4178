"""The figure checks (tests/figure_checks.py) themselves: each fails on a figure made to break it (a clipped title
or legend title, overlapping tick labels, an axis without tick labels, a legend entry for a mark nobody drew, a mark
without an entry) and passes on its repaired twin."""

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from figure_checks import legend_problems, overlapping_ticks, texts_outside, unlabelled_axes


def test_a_clipped_title_and_legend_title_are_caught():
    fig = Figure(figsize=(4, 3), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1])
    assert texts_outside(fig) == []
    fig.suptitle("How much comes back after each attack (beyond the oracle attacked the same way), 95% intervals")
    bad = texts_outside(fig)
    assert len(bad) == 1 and "How much comes back" in bad[0]
    fig = Figure(figsize=(4, 3), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], label="a")
    fig.legend(loc="outside lower center", title="kind: pooled Spearman ρ(steps to forget, memorization) [95% "
                                                 "interval], descriptive only")
    assert any("pooled Spearman" in b for b in texts_outside(fig))


def test_overlapping_tick_labels_are_caught():
    fig = Figure(figsize=(3, 2), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.set_xticks([1, 2, 3], ["1", "2", "3"])
    assert overlapping_ticks(fig) == []
    ax.set_xticks([1000, 3000, 10000, 30000, 100000], ["1000", "3000", "10000", "30000", "100000"])
    ax.set_xlim(1000, 100000)
    assert overlapping_ticks(fig)


def test_an_axis_without_tick_labels_is_caught():
    fig = Figure(figsize=(4, 3), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log")
    ax.set_xlim(1.0, 2.0)
    ax.set_xlabel("perplexity ratio (log)")
    assert unlabelled_axes(fig) == []
    ax.set_xticks([])
    assert unlabelled_axes(fig) and "perplexity ratio" in unlabelled_axes(fig)[0]


def test_legend_entries_and_drawn_marks_must_agree():
    def fig_with(extra_handles=(), band=False, marker=None):
        fig = Figure(figsize=(5, 3), dpi=100, layout="constrained")
        ax = fig.subplots()
        ax.plot([0, 1, 2], [0, 1, 0.5], color="#0072B2", marker=marker)
        if band:
            ax.fill_between([0, 1, 2], [0, 0.8, 0.3], [0.2, 1.2, 0.7], color="#0072B2", alpha=0.2)
        ax.axhline(0.9, color="black", ls=":")
        handles = [Line2D([], [], color="#0072B2", lw=2.5, label="ID"),
                   Line2D([], [], color="black", ls=":", label="UQ target")] + list(extra_handles)
        fig.legend(handles=handles, loc="outside lower center", ncol=3)
        return fig

    assert legend_problems(fig_with()) == []
    band = Line2D([], [], color="grey", lw=6, alpha=0.3, label="95% bootstrap interval")
    assert legend_problems(fig_with([band], band=True)) == []
    bad = legend_problems(fig_with([band]))  # the legend promises a band no panel draws
    assert len(bad) == 1 and "95% bootstrap interval" in bad[0]
    reps = Line2D([], [], color="black", marker="s", ls="none", label="4 repetitions")
    assert any("4 repetitions" in p for p in legend_problems(fig_with([reps])))  # no square drawn
    assert legend_problems(fig_with([reps], marker="s")) == []
    assert any("band" in p for p in legend_problems(fig_with(band=True)))  # a band drawn without its entry
    fig = fig_with()
    fig.axes[0].plot([0, 1], [1, 0], color="#D55E00")  # a second kind's colour, no entry for it
    assert any("no legend entry" in p for p in legend_problems(fig))
    fig = Figure(figsize=(5, 3), dpi=100, layout="constrained")  # scatter markers, hollow ones: by path and face
    ax = fig.subplots()
    ax.scatter([1, 2], [1, 2], marker="^", facecolors="none", edgecolors="#009E73")
    ax.legend(handles=[Patch(color="#009E73", label="domain"),
                       Line2D([], [], color="black", marker="^", mfc="none", ls="none", label="censored")])
    assert legend_problems(fig) == []
    ax.legend(handles=[Patch(color="#009E73", label="domain")])
    assert legend_problems(fig)
