"""The report stage: the run's merged view `summary.json` (the request table with the attack columns, F1-F4 decided
from the stored per-request results, the survival view, the cost), whose one writer it is, and `report/report.md`
with its PNG figures (the `reporting` package). Rerunning it re-decides every finding from the stored results
without rerunning unlearn or attack.
"""

from __future__ import annotations

from unlearnbench.distributed import on_main_or_fail
from unlearnbench.findings import flatten_findings
from unlearnbench.io import read_json, write_json
from unlearnbench.records import finish_stage, require
from unlearnbench.reporting.markdown import format_findings
from unlearnbench.reporting.run_report import write_report
from unlearnbench.results import load_run
from unlearnbench.rundir import Context
from unlearnbench.run_summary import merged_summary
from unlearnbench.tracking import open_tracker

NAME = "report"


def run(ctx: Context) -> None:
    """Decide the findings from the stored results into summary.json, then write report/report.md and its figures;
    the figures and the findings' numbers also go to the tracker."""
    require(ctx, "unlearn")
    out = ctx.run_dir / "report"
    trk = open_tracker(ctx, NAME)

    def write() -> None:
        run_results = load_run(ctx.run_dir)  # refuses an old run directory, saying what to rerun
        if run_results.note:
            print(f"[report] {run_results.note}", flush=True)
        write_json(ctx.run_dir / "summary.json", merged_summary(ctx.cfg, run_results))
        summary = read_json(ctx.run_dir / "summary.json")  # the report shows the file as written (NaN as null)
        paths = write_report(run_results, summary, out)
        trk.log_images({f"report/{name}": p for name, p in paths.items()})
        trk.summary(flatten_findings(summary))
        print(format_findings(summary), flush=True)

    try:
        on_main_or_fail(ctx.acc, write)  # only the main process writes; an error there stops every process
    finally:
        trk.finish()
    ctx.acc.wait_for_everyone()  # the main process has written the report (another node's would list it early)
    figures = sorted(p.name for p in out.glob("*.png"))
    if ctx.is_main:
        print(f"[report] wrote {ctx.run_dir / 'summary.json'}, {out / 'report.md'} and {len(figures)} figures",
              flush=True)
    finish_stage(ctx, NAME, {"figures": figures})
