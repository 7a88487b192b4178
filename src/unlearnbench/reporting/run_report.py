"""The report of one run, `report/report.md` and its PNG figures, from the run's merged summary and its stored
per-request results (`results.load_run`); written whole (markdown and figures of the same summary)."""

from __future__ import annotations

from pathlib import Path

from unlearnbench.io import atomic_dir
from unlearnbench.reporting.attack_figures import attack_figures
from unlearnbench.reporting.markdown import render_markdown
from unlearnbench.reporting.run_figures import make_figures
from unlearnbench.results import RunResults, load_curves


def write_report(run: RunResults, summary: dict, out: Path) -> dict[str, Path]:
    """`out`/report.md and every figure (the attack figures once the attack stage ran); returns name -> PNG path
    under `out`."""
    with atomic_dir(out) as tmp:
        paths = make_figures(summary, load_curves(run.run_dir, run.requests), run.forgetting, tmp)
        if summary.get("attacks") is not None:
            paths.update(attack_figures(run.run_dir, run.attack_results, tmp))
        (tmp / "report.md").write_text(render_markdown(summary, {n: p.name for n, p in paths.items()},
                                                       run.attack_results))
    return {name: Path(out) / p.name for name, p in paths.items()}
