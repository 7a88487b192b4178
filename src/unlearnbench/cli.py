"""Command line: `unlearnbench <stage> [--preset NAME] [--config FILE] [--force] [--debug] [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from unlearnbench.errors import UserError


def commands() -> tuple[str, ...]:
    """Every stage of the STAGES table, `run` (all of them in order), `map` (the findings map over a grid of
    unlearning settings on the run's trained models) and `config` (print the resolved config)."""
    from unlearnbench.stages import STAGES

    return (*STAGES, "run", "map", "config")


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error format: one paragraph, exit 2 (not usage plus a message)."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"unlearnbench: error: {message}. Run `unlearnbench --help` for the commands and options.\n")


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = _Parser(
        prog="unlearnbench",
        description="Machine unlearning of in- vs out-of-distribution data in causal LMs. Stages: prepare -> train -> "
                    "score -> unlearn -> report; `run` chains them; `config` prints the resolved config.")
    p.add_argument("stage", choices=commands(), help="the stage to run")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.steps=200")
    p.add_argument("--preset", default="default", help="smoke | default | paper (default: default)")
    p.add_argument("--config", default=None, help="a YAML file merged over the preset")
    p.add_argument("--force", action="store_true", help="recompute stages that already finished")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--lr", nargs="+", type=float, default=None, metavar="LR", help="map: unlearning learning rates "
                   "(default 1e-4 3e-4 1e-3)")
    p.add_argument("--methods", nargs="+", default=None, metavar="M", help="map: methods (default ga npo)")
    p.add_argument("--exposures", nargs="+", default=None, metavar="E", help="map: exposure forms (default "
                   "extrapolated rank)")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR", help="report: put these run directories side by side")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m unlearnbench`."""
    from unlearnbench import interrupt

    args = parser().parse_intermixed_args(argv)
    try:
        try:
            _main(args, argv)
            from unlearnbench.distributed import leave_process_group

            leave_process_group()
        finally:  # a stage that raised (a stop, an error) did not reach its tracker's finish()
            from unlearnbench.tracking import finish_open

            finish_open()
    except interrupt.Interrupted as exc:  # SIGINT / SIGTERM: stopped at a safe point (checkpoint written) or at once
        if not exc.reported and (exc.local or os.environ.get("RANK", "0") in ("", "0")):
            print(f"unlearnbench: {exc.message()}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)  # 130 (SIGINT) or 143 (SIGTERM)
    except UserError as exc:
        print(f"unlearnbench: error: {_one_paragraph(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("unlearnbench: interrupted; rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if interrupt.requested() and not args.debug:
            # after a stop request, a collective broken by a rank that already stopped (its peer gone) is the stop
            sig = interrupt.requested()
            print(f"unlearnbench: {interrupt.Interrupted(sig).message()} (this process: {type(exc).__name__})",
                  file=sys.stderr, flush=True)
            sys.exit(interrupt.EXIT_CODES.get(sig, 128 + sig))
        if args.debug:
            raise
        print(f"unlearnbench: internal error: {type(exc).__name__}: {exc}\nRerun with --debug for the traceback.",
              file=sys.stderr)
        sys.exit(1)


def _one_paragraph(exc: BaseException) -> str:
    """A message on one line: line breaks that came from a quoted value or a library become spaces."""
    return " ".join(str(exc).split())


def _load(args: argparse.Namespace):
    """The resolved, checked config. Errors of the config library that its own checks let through (an
    interpolation that does not resolve, a value it cannot convert) are the user's input too: exit 2."""
    from omegaconf.errors import OmegaConfBaseException

    from unlearnbench.config import load_config
    from unlearnbench.rundir import resolve_run
    from unlearnbench.study import check_config

    try:
        cfg = resolve_run(load_config(args.preset, args.config, args.overrides))
    except OmegaConfBaseException as exc:
        raise UserError(f"The configuration cannot be resolved: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. Check the overrides and --config file "
                        "(values with ${...} are interpolations; quote them as plain strings).") from None
    except RecursionError:
        raise UserError("The configuration cannot be resolved: an interpolation refers to itself. Check the "
                        "overrides and --config file for ${...} values.") from None
    except TypeError as exc:
        if not _raised_in(exc, "omegaconf"):
            raise
        where = _culprit(args)
        raise UserError(f"{where} does not fit the config's structure ({exc}): its key path goes through a value "
                        "that holds no keys (a list or a number), e.g. data.kinds.x=... . Give the key of a value, "
                        "like data.kinds=[id,canary] or train.steps=200.") from None
    check_config(cfg)
    return cfg


def _raised_in(exc: BaseException, package: str) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}{package}{os.sep}" in tb.tb_frame.f_code.co_filename


def _culprit(args: argparse.Namespace) -> str:
    """The first override (or the --config file) that the config library cannot merge, for the message."""
    from unlearnbench.config import load_config

    for item in args.overrides:
        try:
            load_config(args.preset, None, [item])
        except TypeError:
            return f"The override '{item}'"
        except Exception:
            continue
    return f"The config file '{args.config}'" if args.config else "An override"


def _skip_tempdir_probe() -> None:
    """Python's first `tempfile.gettempdir()` writes and deletes a probe file in $TMPDIR (torch's import of dill
    asks, before the run's temporary directory is set up): name the directory instead, when it is usable."""
    import tempfile

    if tempfile.tempdir is None:
        for cand in (os.environ.get("TMPDIR"), "/tmp"):
            if cand and os.path.isdir(cand) and os.access(cand, os.W_OK | os.X_OK):
                tempfile.tempdir = cand
                return


def _main(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    _skip_tempdir_probe()
    cfg = _load(args)
    if args.stage == "config":
        import yaml

        from unlearnbench.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
        return
    from unlearnbench.rundir import check_run_dir, contain_writes

    run_dir = Path(cfg.run.dir)
    check_run_dir(run_dir)  # before anything reads the environment or writes: a file here is a clear error
    contain_writes(run_dir)  # before torch, matplotlib and W&B are imported: they read these variables then
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from unlearnbench.distributed import make_accelerator
    from unlearnbench.lock import hold_run_lock
    from unlearnbench.rundir import contained_tmp

    acc = make_accelerator(cfg.run.num_processes)
    command = shlex.join(["unlearnbench", *(sys.argv[1:] if argv is None else argv)])
    with hold_run_lock(run_dir, acc, command=command, cfg=cfg), contained_tmp(run_dir):
        if args.stage == "report" and args.compare:
            from unlearnbench.rundir import on_main_or_fail
            from unlearnbench.reporting.compare import compare_runs

            on_main_or_fail(acc, lambda: compare_runs([Path(d) for d in args.compare], run_dir / "compare"))
            return
        if args.stage == "map":
            from unlearnbench.findings_map import run_map

            grid = {k: v for k, v in (("lr", args.lr), ("method", args.methods), ("exposure", args.exposures)) if v}
            run_map(cfg, grid, acc=acc)
            return
        from unlearnbench.study import run_study

        run_study(cfg, args.stage, force=args.force, acc=acc)
