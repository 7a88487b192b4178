"""The report of one run, `report/report.md` and its PNG figures, from the run's merged summary and its stored
per-request results (`results.load_run`); written whole (markdown and figures of the same summary)."""

from __future__ import annotations

from pathlib import Path

from unlearnbench.io import atomic_dir, read_json
from unlearnbench.reporting.attack_figures import attack_figures
from unlearnbench.reporting.markdown import render_markdown
from unlearnbench.reporting.run_figures import make_figures
from unlearnbench.reporting.style import kind_labels
from unlearnbench.results import RunResults, load_curves


def run_kind_labels(run_dir: Path) -> dict[str, str]:
    """The kinds' labels naming the run's corpora, from data/manifest.json (the bare labels when it is missing)."""
    manifest = Path(run_dir) / "data" / "manifest.json"
    return kind_labels(read_json(manifest).get("corpora") if manifest.exists() else None)


def write_report(run: RunResults, summary: dict, out: Path) -> dict[str, Path]:
    """`out`/report.md and every figure (the attack figures once the attack stage ran); returns name -> PNG path
    under `out`."""
    labels = run_kind_labels(run.run_dir)
    with atomic_dir(out) as tmp:
        paths = make_figures(summary, load_curves(run.run_dir, run.requests), run.forgetting, tmp, labels)
        if summary.get("attacks") is not None:
            paths.update(attack_figures(run.run_dir, run.attack_results, tmp, labels))
        (tmp / "report.md").write_text(render_markdown(summary, {n: p.name for n, p in paths.items()},
                                                       run.attack_results))
    return {name: Path(out) / p.name for name, p in paths.items()}
