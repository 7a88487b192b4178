"""Checks of a rendered matplotlib Figure, by its artists' window extents after an Agg draw (what a reader of the
saved PNG sees), not by eye:

- `texts_outside`: every visible text (titles, axis labels, drawn tick labels, legend entries and titles,
  annotations, figure texts) lies inside the canvas (1 px tolerance);
- `overlapping_ticks`: no two drawn tick labels of one axis overlap;
- `unlabelled_axes`: an axis that has a label draws at least two tick labels (its scale can be read);
- `legend_problems`: every legend entry has a drawn artist showing what the entry shows, and every feature a drawn
  artist shows (a colour, a marker, a dashed or dotted line, a hollow marker, a shaded band) has a legend entry that
  shows it.

Features, for the legend check. A Line2D shows its colours (line colour where it has a line, face and edge colours
where it has markers), its marker, its line style when dashed or dotted, "hollow" when its markers have no face,
and its form ("line" and/or "marker"). A scatter (PathCollection) shows its colours, its marker (recognised by its
path), "hollow" when unfilled and the form "marker"; a filled area (PolyCollection) its colour and "band"; an error
bar (LineCollection) its colour. Neutral colours (greys, black, white) count as no colour: a legend entry drawn in
black or grey stands for "any colour" (the markers per repetitions, "dashed: the oracle", ...). A legend entry
matches a drawn artist when the artist shows every feature of the entry; a Rectangle entry (a colour swatch) shows
its colour only, or "band" when it is translucent. Error-bar caps (markers "_" and "|") are part of their bar.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PathCollection, PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.markers import MarkerStyle
from matplotlib.patches import Patch, Rectangle
from matplotlib.text import Text

CAPS = {"_", "|"}
MARKERS = ("o", "s", "^", "v", "<", ">", "D", "d", "P", "X", "*", "h", "H", "p", "8", "+", "x")


def render(fig: Figure):
    """Draw `fig` with Agg (as savefig does, constrained layout included); returns the renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def drawn_tick_labels(axis: Axis) -> list[Text]:
    """The tick labels `axis` draws (ticks inside its view), non-empty and visible."""
    out = []
    for tick in axis._update_ticks():  # the ticks Axis.draw draws
        for lab in (tick.label1, tick.label2):
            if lab.get_visible() and lab.get_text().strip():
                out.append(lab)
    return out


def visible_texts(fig: Figure) -> list[Text]:
    """Every text the saved figure shows: tick labels only of the ticks drawn, no empty strings, nothing of a hidden
    axes."""
    ticks_all, ticks_drawn = set(), []
    for axis in fig.findobj(Axis):
        for t in axis.majorTicks + axis.minorTicks:
            ticks_all.update((id(t.label1), id(t.label2)))
        if axis.axes.get_visible():
            ticks_drawn += drawn_tick_labels(axis)
    out = [t for t in fig.findobj(Text) if id(t) not in ticks_all and t.get_visible() and t.get_text().strip()
           and (t.axes is None or t.axes.get_visible())]
    return out + ticks_drawn


def texts_outside(fig: Figure, tol: float = 1.0) -> list[str]:
    """The texts whose extent leaves the canvas, as "'text' [x0, y0, x1, y1] outside [W x H]"."""
    r = render(fig)
    w, h = fig.bbox.width, fig.bbox.height
    bad = []
    for t in visible_texts(fig):
        b = t.get_window_extent(r)
        if b.x0 < -tol or b.y0 < -tol or b.x1 > w + tol or b.y1 > h + tol:
            bad.append(f"{t.get_text()!r} [{b.x0:.0f}, {b.y0:.0f}, {b.x1:.0f}, {b.y1:.0f}] outside [{w:.0f} x {h:.0f}]")
    return bad


def overlapping_ticks(fig: Figure, tol: float = 0.5) -> list[str]:
    """Pairs of drawn tick labels of one axis whose extents overlap (by more than `tol` px each way)."""
    r = render(fig)
    bad = []
    for axis in fig.findobj(Axis):
        if not axis.axes.get_visible():
            continue
        boxes = [(t.get_text(), t.get_window_extent(r)) for t in drawn_tick_labels(axis)]
        for i, (ta, a) in enumerate(boxes):
            for tb, b in boxes[i + 1:]:
                if min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol:
                    bad.append(f"{axis.axes.get_title() or axis.axes.get_label()!r} {axis.axis_name}: "
                               f"{ta!r} overlaps {tb!r}")
    return bad


# ---------------------------------------------------------------------------------------------- legends


def _colour(c) -> tuple | None:
    """A colour as a feature: None for neutral (grey, black, white) or fully transparent ones."""
    if c is None or (isinstance(c, str) and c.lower() == "none"):
        return None
    r, g, b, a = to_rgba(c)
    if a == 0 or max(r, g, b) - min(r, g, b) < 0.02:
        return None
    return ("colour", round(r, 3), round(g, 3), round(b, 3))


def _collection_marker(coll) -> str | None:
    paths = coll.get_paths()
    if not paths:
        return None
    v = paths[0].vertices
    for m in MARKERS:
        ms = MarkerStyle(m)
        p = ms.get_path().transformed(ms.get_transform())
        if p.vertices.shape == v.shape and np.allclose(p.vertices, v):
            return m
    return "?"


def _hollow(face) -> bool:
    if isinstance(face, str):
        return face.lower() == "none"
    arr = np.asarray(face, dtype=float)
    return arr.size == 0 or bool(np.all(arr.reshape(-1, 4)[:, 3] == 0))


def _line_features(ln: Line2D) -> set:
    f = set()
    ls, marker = ln.get_linestyle(), ln.get_marker()
    has_line = ls not in ("None", "none", "", " ")
    has_marker = marker not in (None, "None", "none", "", " ") and marker not in CAPS
    if has_line:
        f.add(("form", "line"))
        f.add(_colour(ln.get_color()))
        if ls != "-":
            f.add(("ls", ls))
    if has_marker:
        f |= {("form", "marker"), ("marker", str(marker)), _colour(ln.get_markeredgecolor())}
        if _hollow(ln.get_markerfacecolor()):
            f.add(("hollow",))
        else:
            f.add(_colour(ln.get_markerfacecolor()))
    if marker in CAPS:
        f.add(_colour(ln.get_markeredgecolor()))
    return f - {None}


def features(a) -> set:
    """What a drawn artist (or a legend entry) shows, as a set of feature tuples (module docstring)."""
    if isinstance(a, Line2D):
        if (a.get_alpha() or 1) < 1 and a.get_linewidth() >= 4 and a.get_marker() in (None, "None", "none", ""):
            return {("band",)}  # the usual proxy of a shaded band: a thick translucent line
        return _line_features(a)
    if isinstance(a, Rectangle):  # a legend swatch
        face = a.get_facecolor()
        return {("band",)} if face[3] < 1 or (a.get_alpha() or 1) < 1 else {_colour(face)} - {None}
    if isinstance(a, PathCollection):
        f = {("form", "marker"), ("marker", _collection_marker(a))}
        f |= {_colour(c) for c in a.get_edgecolor()}
        if _hollow(a.get_facecolor()):
            f.add(("hollow",))
        else:
            f |= {_colour(c) for c in a.get_facecolor()}
        return f - {None}
    if isinstance(a, LineCollection):
        return {_colour(c) for c in a.get_color()} - {None}
    if isinstance(a, PolyCollection):
        return ({("band",)} | {_colour(c) for c in a.get_facecolor()}) - {None}
    if isinstance(a, Patch):
        return {_colour(a.get_facecolor())} - {None}
    return set()


def _has_data(a) -> bool:
    if isinstance(a, Line2D):
        x, y = (np.asarray(v, dtype=float) for v in a.get_data())
        return bool(np.isfinite(x).any() and np.isfinite(y).any()) if x.size and y.size else False
    if isinstance(a, PathCollection):
        return len(a.get_offsets()) > 0
    if hasattr(a, "get_paths"):
        return len(a.get_paths()) > 0
    return True


def drawn_artists(ax: Axes) -> list:
    """The marks an axes draws: its lines, collections and patches that are visible and hold data."""
    return [a for a in (*ax.lines, *ax.collections, *ax.patches) if a.get_visible() and _has_data(a)]


def _scope(legend: Legend, fig: Figure) -> list[Axes]:
    parent = legend.parent
    if isinstance(parent, Axes):
        return [a for a in fig.axes if a is parent or a in parent._twinned_axes.get_siblings(parent)]
    return [a for a in parent.findobj(Axes) if a.figure is not None]


def legend_problems(fig: Figure) -> list[str]:
    """Legend entries without a drawn artist showing them, and drawn features without a legend entry."""
    render(fig)
    problems = []
    legends = [lg for lg in fig.findobj(Legend) if lg.get_visible()]
    covering: dict[int, set] = {}  # id(axes) -> features the legends over it show
    for lg in legends:
        axes = [a for a in _scope(lg, fig) if a.get_visible()]
        drawn = [features(a) for ax in axes for a in drawn_artists(ax)]
        shown = set()
        for handle, text in zip(lg.legend_handles, lg.get_texts()):
            f = features(handle)
            shown |= f
            if not any(f <= d for d in drawn):
                problems.append(f"legend entry {text.get_text()!r} ({sorted(f)}): nothing drawn shows it")
        for ax in axes:
            covering.setdefault(id(ax), set()).update(shown)
    for ax in fig.findobj(Axes):
        if not ax.get_visible():
            continue
        shown = covering.get(id(ax), set())
        for a in drawn_artists(ax):
            missing = {f for f in features(a) if f[0] != "form"} - shown
            if missing:
                problems.append(f"{type(a).__name__} in {ax.get_title() or ax.get_label()!r} shows {sorted(missing)} "
                                f"that no legend entry shows")
    return sorted(set(problems))


def unlabelled_axes(fig: Figure) -> list[str]:
    """Axes with an axis label but fewer than two drawn tick labels on that axis (a reader cannot read its scale)."""
    render(fig)
    bad = []
    for ax in fig.findobj(Axes):
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if axis.label.get_text().strip() and axis.get_visible() and len(drawn_tick_labels(axis)) < 2:
                bad.append(f"{ax.get_title() or ax.get_label()!r} {axis.axis_name}-axis "
                           f"{axis.label.get_text()!r}: fewer than two tick labels")
    return bad


def figure_problems(fig: Figure) -> list[str]:
    """Every check."""
    return texts_outside(fig) + overlapping_ticks(fig) + unlabelled_axes(fig) + legend_problems(fig)


__all__ = ["render", "visible_texts", "texts_outside", "overlapping_ticks", "legend_problems", "unlabelled_axes",
           "features", "figure_problems"]
