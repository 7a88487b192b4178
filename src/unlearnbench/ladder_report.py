"""The ladder's outputs: one row per (point, finding, where) from each point's stored summary, the points' data facts
(parameters, forget share, epochs) and cost, written as ladder.json, ladder.md, ladder.csv and one figure per
finding (`ladder_<F>.png`): each cell's effect with its interval against each axis (docs/ladder.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from unlearnbench.config import to_dict
from unlearnbench.io import read_json, write_json, write_text
from unlearnbench.reporting.style import VERDICT_COLOURS, num, verdict_colour

G3 = "{:.3g}"  # effects and bounds in the table
Spec = Point = Any  # unlearnbench.ladder's Spec and Point (the ladder imports this module, not the reverse)



def point_facts(run_dir: Path) -> dict:
    """What a point trained: parameters, training sequences, forget share of them, epochs over the unique
    sequences, and what it cost (wall seconds, device-seconds and FLOPs summed over its stage records; a shared
    stage costs this point nothing and is listed under `shared`)."""
    run_dir = Path(run_dir)
    sub = sorted(run_dir.glob("seed_*")) or [run_dir]
    first = sub[0]
    man = read_json(first / "data" / "manifest.json")
    mix = man["training_mixture"]
    train = read_json(first / "stages" / "train.json")["info"]
    models = train.get("models") or {}
    orig = models.get("original", {})
    seqs = mix["original"]["sequences"]
    forget_seqs = seqs - mix["oracle"]["sequences"]
    cost = {"seconds": 0.0, "device_seconds": 0.0, "flops": 0.0}
    shared = []
    for d in sub:
        for rec_path in sorted((d / "stages").glob("*.json")):
            rec = read_json(rec_path)
            if rec.get("shared_from"):
                shared.append(f"{rec_path.stem} ({rec['shared_from']})")
                continue
            info = rec.get("info") or {}
            for k in cost:
                cost[k] += float(info.get(k) or 0.0)
    return {"params": orig.get("params"), "train_steps": orig.get("steps"), "batch_size": orig.get("batch_size"),
            "sequences": seqs, "forget_sequences": forget_seqs, "forget_share": forget_seqs / seqs if seqs else None,
            "epochs": (orig["steps"] * orig["batch_size"] / seqs) if orig and seqs else None,
            "seeds": len(sub), "corpora": man.get("corpora"), "cost": cost, "shared": shared}


def _f(x) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def finding_rows(summary: dict) -> list[dict]:
    """Every finding's overall verdict and each of its cells (the contrast or kind it is decided in): the cell's
    verdict within the finding's family (after Holm), its own unadjusted verdict, and the effect with its interval
    at the main target (F4: the main attack; F3: the Cox log hazard ratio of memorization), from a run's (or a
    multi-seed parent's) summary."""
    rows = []
    findings = {**(summary.get("findings") or {}), **((summary.get("attacks") or {}).get("findings") or {})}
    for key, f in findings.items():
        if not isinstance(f, dict) or "verdict" not in f:  # e.g. replicate_spread: a measurement, not a finding
            continue
        rows.append({"finding": key, "where": "overall", "verdict": f.get("verdict"), "unadjusted": None,
                     "effect": None, "lo": None, "hi": None, "n": None, "unit": f.get("unit"),
                     "measure": f"log {f['effect']}" if "kinds" in f and f.get("effect") else f.get("effect")})
        for c in f.get("contrasts", []):
            e = c["by_target"][c["main"]]
            rows.append({"finding": key, "where": c["cell"], "verdict": c.get("family_verdict", c["verdict"]),
                         "unadjusted": c["verdict"], "effect": _f(e.get("mean")), "lo": _f(e.get("lo")),
                         "hi": _f(e.get("hi")), "n": e.get("n_informative"), "unit": f.get("unit")})
        for c in f.get("kinds", []):
            m = c["cox"]["memorization"]
            rows.append({"finding": key, "where": c["kind"], "verdict": c.get("family_verdict", c["verdict"]),
                         "unadjusted": c["verdict"], "effect": _f(m.get("coef")), "lo": _f(m.get("coef_lo")),
                         "hi": _f(m.get("coef_hi")), "n": c.get("n"), "unit": f.get("unit")})
    return rows


def collect(spec: Spec, pts: list[Point]) -> tuple[pd.DataFrame, list[dict]]:
    """The finding rows of every finished point (with its axes and levels), and every point's facts."""
    rows, facts = [], []
    for p in pts:
        d = Path(p.cfg.run.dir)
        if not (d / "summary.json").exists():
            facts.append({"point": p.name, "finished": False})
            continue
        fact = {"point": p.name, "finished": True, **point_facts(d)}
        facts.append(fact)
        summary = read_json(d / "summary.json")
        for r in finding_rows(summary):
            rows.append({"point": p.name, "params": fact["params"], "forget_share": fact["forget_share"],
                         "epochs": fact["epochs"], **r})
    return pd.DataFrame(rows), facts


def write_outputs(spec: Spec, pts: list[Point], out: Path) -> None:
    """ladder.json, ladder.csv, ladder.md and the figures."""
    rows, facts = collect(spec, pts)
    axes = [{"name": a.name, "title": a.title, "x": a.x,
             "levels": [{"name": n, "set": s, "note": note, "point": _point_of(pts, a.name, n)}
                        for n, s, note in a.levels]} for a in spec.axes]
    write_json(out / "ladder.json", {"ladder": spec.name, "title": spec.title, "preset": spec.preset,
                                     "overrides": spec.overrides, "axes": axes, "points": describe_points(spec, pts),
                                     "facts": facts, "findings": rows.to_dict(orient="records")})
    rows.to_csv(out / "ladder.csv", index=False)
    write_text(out / "ladder.md", markdown(spec, pts, rows, facts))
    if not rows.empty:
        for key in sorted(rows.finding.unique()):
            figure(spec, pts, rows[rows.finding == key], key, out / f"ladder_{key}.png")


def describe_points(spec: Spec, pts: list[Point]) -> list[dict]:
    """Every point with its levels, its own overrides and its resolved config (for ladder.json)."""
    return [{"point": p.name, "levels": [{"axis": a, "level": lv} for a, lv in p.levels], "overrides": p.overrides,
             "config": {k: v for k, v in to_dict(p.cfg).items() if k != "run"} | {
                 "run": {k: v for k, v in to_dict(p.cfg)["run"].items() if k != "dir"}}} for p in pts]


def _point_of(pts: list[Point], axis: str, level: str) -> str:
    return next(p.name for p in pts if (axis, level) in p.levels)


def markdown(spec: Spec, pts: list[Point], rows: pd.DataFrame, facts: list[dict]) -> str:
    """The ladder table: the points with their facts and cost, then per finding one row per point."""
    lines = [f"# {spec.title}", "", f"Ladder `{spec.name}` on preset `{spec.preset}`: one full study per point "
             "(docs/ladder.md). Each cell: its verdict within the finding (after Holm over the cells), effect [95% "
             "interval] at the main target.", "",
             "| point | levels | parameters | training sequences | forget share | epochs | seeds | hours | PFLOP |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {f["point"]: f for f in facts}
    for p in pts:
        f = by[p.name]
        lv = ", ".join(f"{a}={v}" for a, v in p.levels) or "base"
        if not f.get("finished"):
            lines.append(f"| {p.name} | {lv} | not finished | | | | | | |")
            continue
        lines.append(f"| {p.name} | {lv} | {num(f['params'], '{:,}')} | {num(f['sequences'], '{:,}')} | "
                     f"{num(f['forget_share'], '{:.1%}')} | {num(f['epochs'], '{:.2f}')} | {f['seeds']} | "
                     f"{f['cost']['seconds'] / 3600:.2f} | {f['cost']['flops'] / 1e15:.3g} |")
    for key, part in (rows.groupby("finding", sort=True) if not rows.empty else []):
        wheres = list(dict.fromkeys(part["where"]))
        lines += ["", f"## {key}", "", "| point | " + " | ".join(wheres) + " |", "|" + "---|" * (len(wheres) + 1)]
        for name, g in part.groupby("point", sort=False):
            by_where = {r["where"]: r for r in g.to_dict(orient="records")}
            cells = []
            for w in wheres:
                r = by_where.get(w)
                if r is None:
                    cells.append("")
                    continue
                eff = "" if r["effect"] is None or pd.isna(r["effect"]) else (
                    f" {num(r['effect'], G3)} [{num(r['lo'], G3)}, {num(r['hi'], G3)}]")
                cells.append(f"{r['verdict']}{eff}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(spec: Spec, pts: list[Point], rows: pd.DataFrame, key: str, path: Path):
    """One finding: a panel per (cell, axis), the effect and interval of each of the axis' finished points,
    coloured by the cell's verdict within the finding; a cell without an interval (inconclusive) is an open mark
    at 0. x is the parameter count (log scale, a tick per point) for a `params` axis, the levels in order
    otherwise. A panel whose axis has no point with that cell is left blank with a note. Returns the figure."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    wheres = [w for w in dict.fromkeys(rows["where"]) if w != "overall"]
    if not wheres:
        return None
    fig = Figure(figsize=(3.2 * len(spec.axes), 2.1 * len(wheres) + 1.2), dpi=100, layout="constrained")
    axs = fig.subplots(len(wheres), len(spec.axes), squeeze=False)
    drawn = {}
    for j, axis in enumerate(spec.axes):
        levels = [(lv, _point_of(pts, axis.name, lv)) for lv, _, _ in axis.levels]
        for i, w in enumerate(wheres):
            ax = axs[i][j]
            if i == 0:
                ax.set_title(axis.title, fontsize=9)
            if j == 0:
                ax.set_ylabel(w, fontsize=8)
            xs, labels = [], []
            for k, (lv, pname) in enumerate(levels):
                r = rows[(rows.point == pname) & (rows["where"] == w)]
                if r.empty:  # not finished, or no such cell at this point: no mark, no tick
                    continue
                params = r.params.iloc[0]
                x = float(params) if axis.x == "params" and params and not pd.isna(params) else float(k)
                xs.append(x)
                labels.append(lv)
                e, lo, hi, v = (r[c].iloc[0] for c in ("effect", "lo", "hi", "verdict"))
                colour = verdict_colour(v)
                drawn[v] = "o" if e is not None and not pd.isna(e) else "x"
                if drawn[v] == "x":
                    ax.plot([x], [0.0], "x", color="#7f7f7f", ms=7)
                    continue
                has_lo, has_hi = (b is not None and not pd.isna(b) for b in (lo, hi))
                if has_lo or has_hi:  # an open side (censored requests bound it on one side only): a triangle
                    ax.plot([x, x], [lo if has_lo else e, hi if has_hi else e], color=colour, lw=2)
                if has_lo != has_hi:
                    ax.plot([x], [e], "^" if has_lo else "v", color=colour, ms=8)
                    drawn["open"] = "^"
                ax.plot([x], [e], "o", color=colour, ms=6)
            if not xs:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{w}:\nno point of this axis\nhas this cell", ha="center", va="center", fontsize=7,
                        color="#7f7f7f", transform=ax.transAxes)
                continue
            ax.axhline(0.0, color="#444444", lw=0.8, ls=":")
            if axis.x == "params" and min(xs) > 0:
                ax.set_xscale("log")
                ax.set_xlim(min(xs) / 2, max(xs) * 2)
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.set_xticks(xs, labels, fontsize=7)
            ax.tick_params(labelsize=7)
    open_side = drawn.pop("open", None)
    handles = [Line2D([], [], color=verdict_colour(v) if m == "o" else "#7f7f7f", marker=m, ls="none",
                      label=v if m == "o" else f"{v} (no interval)")
               for v, m in sorted(drawn.items(), key=lambda t: list(VERDICT_COLOURS).index(t[0])
                                  if t[0] in VERDICT_COLOURS else 99)]
    if open_side:
        handles.append(Line2D([], [], color="#444444", marker="^", ls="none", label="interval open on this side"))
    handles.append(Line2D([], [], color="#444444", lw=0.8, ls=":", label="0: no difference"))
    fig.legend(handles=handles, loc="outside lower center", ncol=max(1, min(len(handles), len(spec.axes) + 1)),
               fontsize=8)
    measure = next((m for m in rows.get("measure", pd.Series(dtype=object)) if isinstance(m, str)), None)
    fig.suptitle(f"{key} across the ladder: effect and 95% interval per cell (colour: verdict after Holm)"
                 + (f"\neffect: {measure}" if measure else ""), fontsize=10)
    fig.savefig(path, format="png")
    return fig
