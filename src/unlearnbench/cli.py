"""Command line: `unlearnbench <stage> [--preset NAME] [--config FILE] [--force] [--debug] [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from unlearnbench.errors import UserError


def commands() -> tuple[str, ...]:
    """Every stage of the STAGES table, `run` (all of them in order) and `config` (print the resolved config)."""
    from unlearnbench.stages import STAGES

    return (*STAGES, "run", "config")


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="unlearnbench",
        description="Machine unlearning of in- vs out-of-distribution data in causal LMs. Stages: prepare -> train -> "
                    "score -> unlearn -> report; `run` chains them; `config` prints the resolved config.")
    p.add_argument("stage", choices=commands(), help="the stage to run")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.steps=200")
    p.add_argument("--preset", default="default", help="smoke | default | paper (default: default)")
    p.add_argument("--config", default=None, help="a YAML file merged over the preset")
    p.add_argument("--force", action="store_true", help="recompute stages that already finished")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR", help="report: put these run directories side by side")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m unlearnbench`."""
    args = parser().parse_intermixed_args(argv)
    try:
        _main(args)
    except UserError as exc:
        print(f"unlearnbench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("unlearnbench: interrupted; rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if args.debug:
            raise
        print(f"unlearnbench: internal error: {type(exc).__name__}: {exc}\nRerun with --debug for the traceback.",
              file=sys.stderr)
        sys.exit(1)


def _main(args: argparse.Namespace) -> None:
    from unlearnbench.config import load_config
    from unlearnbench.rundir import resolve_run
    from unlearnbench.study import check_config

    cfg = resolve_run(load_config(args.preset, args.config, args.overrides))
    check_config(cfg)
    if args.stage == "config":
        import yaml

        from unlearnbench.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return
    if args.stage == "report" and args.compare:
        from unlearnbench.rundir import contain_writes
        from unlearnbench.stages.report import compare_runs

        contain_writes(Path(cfg.run.dir))

        compare_runs([Path(d) for d in args.compare], Path(cfg.run.dir) / "compare")
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from unlearnbench.study import run_study

    run_study(cfg, args.stage, force=args.force)
