"""The report stage: report/report.md with the group table and the findings of a run."""

from __future__ import annotations

from pathlib import Path

from unlearnbench.errors import UserError
from unlearnbench.io import read_json, write_text
from unlearnbench.runner import Context, finish_stage, require


def _num(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def render_markdown(summary: dict) -> str:
    """Markdown of a run's summary: per (kind, repetitions) table, then F1-F3 with their numbers."""
    lines = [f"# unlearnbench report: {summary['run']} (seed {summary['seed']})", "",
             f"Method `{summary['method']}`, lr {summary['lr']}, exposure `{summary['exposure']}`, "
             f"UQ target {summary['uq_target']}, max steps {summary['max_steps']}.", "",
             "| kind | reps | n | status | steps to unlearn | utility drop there | final UQ | exposure θ0 | exposure θr "
             "| mean steps to forget | memorization | difficulty |", "|" + "---|" * 12]
    for g in summary["groups"]:
        lines.append(f"| {g['kind']} | {g['repetitions']} | {g['n_examples']} | {g['status']} | "
                     f"{_num(g['steps_to_unlearn'], '{}')} | {_num(g['utility_drop_at_unlearned'], '{:+.1%}')} | "
                     f"{_num(g['uq_final'])} | {_num(g['exposure_original_mean'])} | {_num(g['exposure_oracle_mean'])} | "
                     f"{_num(g['steps_to_forget_mean'], '{:.1f}')} | {_num(g['memorization_mean'], '{:.3f}')} | "
                     f"{_num(g['difficulty_mean'], '{:.3f}')} |")
    lines += ["", "## Findings", ""]
    for key, f in summary.get("findings", {}).items():
        lines.append(f"- **{key}** ({f['verdict']}, {f['holds']} of {f['of']}): {f['statement']}.")
        for c in f.get("comparisons", []):
            lines.append("  - " + ", ".join(f"{k}={_num(v, '{:.3g}') if isinstance(v, float) else v}"
                                            for k, v in c.items()))
        for c in f.get("correlations", []):
            lines.append(f"  - {c['kind']} / {c['variable']}: ρ={_num(c['rho'])} [{_num(c['lo'])}, {_num(c['hi'])}], "
                         f"n={c['n']}, censored {c['censored_fraction']:.0%}")
    return "\n".join(lines) + "\n"


def run_report(ctx: Context) -> None:
    """Write report/report.md from summary.json."""
    require(ctx, "unlearn")
    path = ctx.run_dir / "summary.json"
    if not path.exists():
        raise UserError(f"No summary.json in {ctx.run_dir}: run the unlearn stage first.")
    if ctx.is_main:
        write_text(ctx.run_dir / "report" / "report.md", render_markdown(read_json(path)))
    ctx.acc.print(f"[report] wrote {ctx.run_dir / 'report' / 'report.md'}")
    finish_stage(ctx, "report", {})


def compare_runs(dirs: list[Path], out_dir: Path) -> None:
    """Side-by-side markdown of several runs' summaries."""
    parts = []
    for d in dirs:
        p = Path(d) / "summary.json"
        if not p.exists():
            raise UserError(f"{d} has no summary.json; give run directories that finished the unlearn stage.")
        parts.append(f"## {d}\n\n" + render_markdown(read_json(p)))
    write_text(Path(out_dir) / "compare.md", "\n".join(parts))
    print(f"[report] wrote {Path(out_dir) / 'compare.md'}")
