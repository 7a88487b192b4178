"""Several runs side by side (`unlearnbench report --compare`, and a multi-seed parent's own report): `compare.md`
and `compare.png` with mean ± 95% interval per (kind, repetitions) across each run's seeds. A run directory may be a
multi-seed parent; its seed_*/ sub-runs are the seeds of that column. Reads each run's merged summary.json.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from unlearnbench.errors import UserError
from unlearnbench.findings import cell_interval
from unlearnbench.io import atomic_dir, read_json
from unlearnbench.records import check_layout
from unlearnbench.reporting.style import KIND_LABELS, kind_color, kind_key, reps_title


def _ci(d: dict | None, fmt: str = "{:.2f}") -> str:
    if not d or d.get("mean") is None:
        return "–"
    if d["n"] < 2 or d["lo"] == d["hi"]:
        return f"{fmt.format(d['mean'])} (n={d['n']})"
    return f"{fmt.format(d['mean'])} ± {fmt.format((d['hi'] - d['lo']) / 2)} (n={d['n']} {d.get('n_unit', '')})".replace(" )", ")")


def _seed_dirs(d: Path) -> list[Path]:
    """The single-seed run directories behind `d`: itself, or its seed_*/ sub-runs."""
    subs = sorted((p for p in d.glob("seed_*") if (p / "summary.json").exists()),
                  key=lambda p: (len(p.name), p.name))
    if subs:
        return subs
    if (d / "summary.json").exists() and "runs" not in read_json(d / "summary.json"):
        return [d]
    raise UserError(f"{d} has no summary.json (nor seed_*/summary.json); give run directories that finished the "
                    f"report stage (`unlearnbench report run.dir={d}` writes it from the unlearn and attack results).")


def _settings(first_seed_dir: Path, summaries: list[dict]) -> dict:
    """What distinguishes a run: seeds, method, model, backend (from summary.json and config.yaml)."""
    s0 = summaries[0]
    cfg_path = first_seed_dir / "config.yaml"
    doc = {}
    if cfg_path.exists():
        import yaml

        doc = yaml.safe_load(cfg_path.read_text()) or {}
    c, dist = doc.get("config", {}), doc.get("distributed", {}) or {}
    m = c.get("model", {})
    model = (m.get("name_or_path") or f"{m.get('arch', '?')} {m.get('n_layers', '?')}×{m.get('hidden_size', '?')}"
             if m else "–")
    backend = "–"
    if dist:
        backend = (f"{dist.get('distributed_type', '?')} ×{dist.get('num_processes', '?')} {dist.get('device', '')} "
                   f"{m.get('dtype', '')}" + (f" ZeRO-{dist['zero_stage']}" if dist.get("zero_stage") else ""))
    return {"seeds": ", ".join(str(s["seed"]) for s in summaries), "method": s0["method"], "lr": s0["lr"],
            "exposure": s0["exposure"], "max steps": s0["max_steps"], "model": model, "backend": backend.strip(),
            "git": (doc.get("git_revision") or "–")[:12]}


METRICS = (("steps_to_unlearn", "steps to unlearn", "{:.3g}"),
           ("utility_drop_at_unlearned", "utility drop when unlearned", "{:+.1%}"),
           ("uq_final", "final UQ", "{:.2f}"),
           ("steps_to_forget_mean", "mean steps to forget", "{:.1f}"),
           ("memorization_mean", "memorization (nats/token)", "{:.3f}"),
           ("difficulty_mean", "difficulty (nats/token)", "{:.3f}"))


def compare_runs(dirs: list[Path], out_dir: Path) -> None:
    """`<out_dir>/compare.md` and `compare.png`: runs side by side with mean ± 95% interval per (kind, repetitions).

    A run directory may be a multi-seed parent: its seed_*/ sub-runs are the seeds of that column.
    `out_dir` is replaced as a whole.
    """
    dirs = [Path(d) for d in dirs]
    out_dir = Path(out_dir)
    if not dirs:
        raise UserError("Give at least one run directory to compare: `unlearnbench report --compare DIR [DIR ...]`.")
    for d in dirs:
        if d.resolve() == out_dir.resolve() or out_dir.resolve() in d.resolve().parents:
            raise UserError(f"The comparison would be written over {d}; choose another run.dir for it.")
    runs = []
    for d in dirs:
        subs = _seed_dirs(d)
        for s in subs:  # a summary.json of an older layout names its keys otherwise: refused, never half read
            check_layout(s, ["report"])
        summaries = [read_json(s / "summary.json") for s in subs]
        label = d.name if d.name not in [r["label"] for r in runs] else str(d)
        parent = read_json(d / "summary.json") if len(subs) > 1 and (d / "summary.json").exists() else None
        runs.append({"label": label, "dir": d, "summaries": summaries, "settings": _settings(subs[0], summaries),
                     "findings": (parent or summaries[0]).get("findings", {}) if len(subs) == 1 or parent else {}})
    cells = sorted({(g["kind"], int(g["repetitions"])) for r in runs for s in r["summaries"] for g in s["requests"]},
                   key=lambda c: (kind_key(c[0]), c[1]))
    everything = [s for r in runs for s in r["summaries"]]

    columns = list(runs[0]["settings"])
    lines = ["# unlearnbench comparison", "", "## Runs", "",
             "| run | directory | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for r in runs:
        lines.append(f"| {r['label']} | `{r['dir']}` | " + " | ".join(str(v) for v in r["settings"].values()) + " |")
    lines += ["", "Each cell: mean ± half-width of the 95% t-interval. For a run of several seeds the seed is the unit: "
              "each seed's mean over its forget groups, then the interval over seeds (n = seeds); for a run of one "
              "seed the interval is over its groups (n = groups: a statement about that trained pair). The last "
              "column pools every seed of every run (n = seeds). Steps to unlearn and the utility drop there count "
              "only requests that became unlearned and had something to forget.", ""]
    stats = {}
    for col, title, fmt in METRICS:
        lines += [f"### {title[0].upper() + title[1:]}", "",
                  "| kind | reps | " + " | ".join(r["label"] for r in runs) + " | all runs |",
                  "|" + "---|" * (len(runs) + 3)]
        for kind, reps in cells:
            per = [cell_interval(r["summaries"], kind, reps, col) for r in runs]
            pooled = cell_interval(everything, kind, reps, col)
            stats[(col, kind, reps)] = per
            lines.append(f"| {kind} | {reps} | " + " | ".join(_ci(p, fmt) for p in per) + f" | {_ci(pooled, fmt)} |")
        lines.append("")
    lines += ["## Findings", "", "| finding | " + " | ".join(r["label"] for r in runs) + " |",
              "|" + "---|" * (len(runs) + 1)]
    for key in ("F1", "F2", "F3"):
        cols = []
        for r in runs:  # one verdict per run, decided from all its seeds' requests (never a vote over seeds)
            f = r["findings"].get(key)
            cols.append(f"{f['verdict']}" + (f" ({f['detail']})" if f.get("detail") else "")
                        + f", n = {f.get('unit', '–')}" if f else "–")
        lines.append(f"| {key} | " + " | ".join(cols) + " |")
    lines += ["", "## Figure", "", "![compare](compare.png)", ""]

    with atomic_dir(out_dir) as tmp:
        _fig_compare(runs, cells, stats, tmp / "compare.png")
        (tmp / "compare.md").write_text("\n".join(lines))
    print(f"[report] wrote {out_dir / 'compare.md'} and {out_dir / 'compare.png'}")


RUN_MARKERS = ("o", "D", "s", "^", "v", "P", "X", "h")


def _fig_compare(runs: list[dict], cells: list[tuple[str, int]], stats: dict, path: Path) -> None:
    shown = METRICS[:3]
    fig = Figure(figsize=(max(6.0, 0.9 * len(cells) + 2), 3.0 * len(shown) + 1.0), dpi=100, layout="constrained")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    width = 0.7 / max(1, len(runs))
    for ax, (col, title, _) in zip(axes, shown):
        for j, r in enumerate(runs):
            for i, (kind, reps) in enumerate(cells):
                s = stats[(col, kind, reps)][j]
                if s["mean"] is None:
                    continue
                x = i - 0.35 + width * (j + 0.5)
                ax.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]],
                            marker=RUN_MARKERS[j % len(RUN_MARKERS)], color=kind_color(kind), ms=6, capsize=3,
                            ls="none")
        unit = {"steps_to_unlearn": " (steps)", "utility_drop_at_unlearned": " (ppl_t / ppl_0 − 1)",
                "uq_final": " (0 = as θ0, 1 = as θr)"}[col]
        ax.set_ylabel(title + unit, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[-1].set_xticks(range(len(cells)), [f"{k}\n{reps_title(r)}" for k, r in cells], fontsize=8)
    axes[-1].set_xlabel("forget request (kind, repetitions)")
    kinds = sorted({k for k, _ in cells}, key=kind_key)
    handles = [Line2D([], [], color=kind_color(k), lw=2.5, label=KIND_LABELS.get(k, k)) for k in kinds]
    handles += [Line2D([], [], color="black", marker=RUN_MARKERS[j % len(RUN_MARKERS)], ls="none", label=r["label"])
                for j, r in enumerate(runs)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle("Runs side by side: mean and 95% interval across seeds")
    fig.savefig(path, format="png")
