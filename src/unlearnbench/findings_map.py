"""The findings map: rerun unlearning over a grid of settings on a run's trained models, and show where each
finding holds and where it breaks (`unlearnbench map`).

Each setting of the grid is a sub-run `<run.dir>/map/<setting>/` whose `data/` and `models/` link to the parent's
(prepare and train are not repeated; their records are copied, so the fingerprints check that the setting really
shares them); the setting runs its own score stage (cheap; the exposure form can differ) and unlearn stage. Each
setting's findings are decided from its stored per-request results by the function the report stage decides them
with (`run_findings`); a setting writes no report of its own. The map is written to
`<run.dir>/map/findings_map.md`, `findings_map.csv` and `findings_map.png`.
"""

from __future__ import annotations

import dataclasses
from itertools import product
from pathlib import Path

import pandas as pd

from unlearnbench.config import Config, validate
from unlearnbench.errors import UserError
from unlearnbench.findings import run_findings
from unlearnbench.io import write_text
from unlearnbench.results import load_run
from unlearnbench.rundir import map_dir, map_setting_dir, record_path

DEFAULT_GRID = {"lr": [1e-4, 3e-4, 1e-3], "method": ["ga", "npo"], "exposure": ["extrapolated", "rank"]}


def setting_name(lr: float, method: str, exposure: str) -> str:
    """The sub-run directory name of one setting of the grid."""
    return f"lr{lr:g}_{method}_{exposure}"


def setting_configs(cfg: Config, grid: dict) -> list[tuple[str, Config]]:
    """One config per setting of the grid, pointed at its sub-run directory."""
    out = []
    for lr, method, exposure in product(grid["lr"], grid["method"], grid["exposure"]):
        name = setting_name(lr, method, exposure)
        sub = dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, dir=str(map_setting_dir(cfg.run.dir, name)),
                                         name=f"{cfg.run.name}-{name}"),
            unlearn=dataclasses.replace(cfg.unlearn, lr=float(lr), method=method),
            metrics=dataclasses.replace(cfg.metrics, exposure=exposure))
        validate(sub)
        out.append((name, sub))
    return out


def link_parent(parent: Path, setting_dir: Path, cfg: Config) -> None:
    """Give a setting the parent's prepared data and trained models (`records.share_stages`: links to the outputs,
    copies of the records, checked to share the cell's fingerprints)."""
    from unlearnbench.records import read_record, share_stages, stage_fingerprint

    for stage in ("prepare", "train"):
        if not record_path(parent, stage).exists():
            raise UserError(f"The findings map reuses the trained models of {parent}, but its '{stage}' stage has not "
                            f"finished. Run `unlearnbench train run.dir={parent}` (or `run`) with the same config first.")
    share_stages(parent, setting_dir, cfg, ("prepare", "train"))
    for stage in ("prepare", "train"):
        rec = read_record(setting_dir, stage)
        if rec is None or rec.get("fingerprint") != stage_fingerprint(cfg, stage):
            raise UserError(f"The findings map setting {setting_dir} cannot reuse the '{stage}' stage of {parent}: it was "
                            "computed under another config. Run the map with the config the run was made with.")


def setting_findings(cfg: Config) -> dict:
    """F1-F3 of one setting, decided from its stored per-request results as the report stage decides them (the
    setting runs no attack and no report: its findings are computed here, written nowhere but the map)."""
    run = load_run(Path(cfg.run.dir))
    return run_findings(cfg, run.requests, run.forgetting)


def map_rows(settings: list[tuple[str, Config]]) -> pd.DataFrame:
    """One row per (setting, finding, where: overall, a contrast or a kind): effect at the main target, interval and
    verdict."""
    rows = []
    for name, cfg in settings:
        base = {"setting": name, "lr": cfg.unlearn.lr, "method": cfg.unlearn.method, "exposure": cfg.metrics.exposure}
        for key, f in setting_findings(cfg).items():
            rows.append({**base, "finding": key, "where": "overall", "verdict": f["verdict"], "mean": None,
                         "lo": None, "hi": None})
            for c in f.get("contrasts", []):
                e = c["by_target"][c["main"]]
                rows.append({**base, "finding": key, "where": f"r{c['repetitions']} {c['ood_kind']}",
                             "verdict": c["family_verdict"], "unadjusted": c["verdict"], "mean": e["mean"],
                             "lo": e["lo"], "hi": e["hi"], "n_id": e["counts"]["id_used"],
                             "n_ood": e["counts"]["ood_used"], "stable_across_targets": c["stable_across_targets"]})
            for c in f.get("kinds", []):
                m = c["cox"]["memorization"]
                rows.append({**base, "finding": key, "where": c["kind"], "verdict": c["family_verdict"],
                             "unadjusted": c["verdict"], "mean": m["coef"], "lo": m["coef_lo"], "hi": m["coef_hi"]})
    return pd.DataFrame(rows)


def render(rows: pd.DataFrame, out_dir: Path) -> None:
    """findings_map.md (one table per finding), findings_map.csv and the heatmap findings_map.png."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from unlearnbench.reporting.style import verdict_colour

    rows.to_csv(out_dir / "findings_map.csv", index=False)
    lines = ["# Findings map", "", "Each entry: the verdict, and the effect with its 95% interval at the main UQ "
             "target "
             "(F1: OOD − ID log(1 + steps); F2: ID − OOD log perplexity ratio; F3: Cox coefficient of memorization per "
             "within-request SD, < 0 means more memorized examples take longer); for F1 and F2 also how many ID and "
             "OOD groups the two-sample interval rests on. A contrast's or kind's verdict is the family-wise one "
             "(Holm over the finding's cells); each setting is decided on its own, not corrected across settings. "
             "Settings in rows, where the finding is tested in columns.", ""]
    for key, part in rows.groupby("finding", sort=True):
        wheres = list(dict.fromkeys(part["where"]))
        lines += [f"## {key}", "", "| setting | " + " | ".join(wheres) + " |", "|" + "---|" * (len(wheres) + 1)]
        for setting, g in part.groupby("setting", sort=False):
            by = g.set_index("where")
            vals = []
            for w in wheres:
                r = by.loc[w]
                eff = "" if r["mean"] is None or pd.isna(r["mean"]) else (
                    f" {r['mean']:.3g} [{_n(r['lo'])}, {_n(r['hi'])}]{_pairs(r)}")
                vals.append(f"{r['verdict']}{eff}")
            lines.append(f"| {setting} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["![findings map](findings_map.png)", ""]
    write_text(out_dir / "findings_map.md", "\n".join(lines))
    keys = sorted(rows.finding.unique())
    fig = Figure(figsize=(4.5 * len(keys), 0.45 * rows.setting.nunique() + 2.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        part = rows[rows.finding == key]
        wheres = list(dict.fromkeys(part["where"]))
        settings = list(dict.fromkeys(part["setting"]))
        for i, setting in enumerate(settings):
            for j, w in enumerate(wheres):
                r = part[(part.setting == setting) & (part["where"] == w)].iloc[0]
                ax.add_patch(_rect(j, i, verdict_colour(r["verdict"])))
                if r["mean"] is not None and not pd.isna(r["mean"]):
                    ax.text(j + 0.5, i + 0.5, f"{r['mean']:.2g}", ha="center", va="center", fontsize=7)
        ax.set_xlim(0, len(wheres))
        ax.set_ylim(len(settings), 0)
        ax.set_xticks([j + 0.5 for j in range(len(wheres))], wheres, rotation=45, ha="right", fontsize=7)
        ax.set_yticks([i + 0.5 for i in range(len(settings))], settings, fontsize=7)
        ax.set_title(key)
    shown = list(dict.fromkeys(rows.verdict))
    fig.legend(handles=[Patch(color=verdict_colour(v), label=v) for v in shown], loc="outside lower center",
               ncol=5, fontsize=8)
    fig.suptitle("Findings map: verdict (colour) and effect (number) per setting")
    fig.savefig(out_dir / "findings_map.png", format="png")


def _rect(x: int, y: int, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="white")


def _pairs(r) -> str:
    """", 3 vs 3 groups" for an F1/F2 contrast: how many ID and OOD groups its two-sample interval rests on (a
    collapsed or nothing-to-forget group is left out)."""
    n_id, n_ood = r.get("n_id"), r.get("n_ood")
    return "" if n_id is None or n_ood is None or pd.isna(n_id) or pd.isna(n_ood) else \
        f", {int(n_id)} vs {int(n_ood)} groups"


def _n(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{x:.3g}"


def run_map(cfg: Config, grid: dict | None = None, acc=None) -> Path:
    """Unlearn every setting of the grid on the run's trained models, then write the map, holding the run directory's
    lock (which covers the settings' sub-runs) for the call; returns the map's directory. (The CLI takes the lock
    itself and calls `map_settings`.)"""
    from unlearnbench.distributed import make_accelerator
    from unlearnbench.study import invocation

    acc = acc or make_accelerator(cfg.run.num_processes)
    with invocation(cfg, acc):
        return map_settings(cfg, grid, acc)


def map_settings(cfg: Config, grid: dict | None, acc) -> Path:
    """`run_map`'s work, for a caller that holds the run directory (`study.invocation`)."""
    from unlearnbench.study import check_config, run_stages

    grid = {**DEFAULT_GRID, **(grid or {})}
    parent = Path(cfg.run.dir)
    settings = setting_configs(cfg, grid)
    for _, sub in settings:
        check_config(sub)
    for name, sub in settings:
        if acc.is_main_process:
            link_parent(parent, Path(sub.run.dir), sub)
        acc.wait_for_everyone()
        acc.print(f"[map] {name}")
        run_stages(sub, "score", False, acc)
        run_stages(sub, "unlearn", False, acc)
    out = map_dir(parent)
    if acc.is_main_process:
        render(map_rows(settings), out)
        acc.print(f"[map] wrote {out / 'findings_map.md'}, findings_map.csv and findings_map.png "
                  f"({len(settings)} settings)")
    acc.wait_for_everyone()
    return out
