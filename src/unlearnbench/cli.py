"""Command line: `unlearnbench COMMAND [--preset NAME] [--config FILE] [--debug] [OPTIONS] [key=value ...]`.

Which commands there are and which options each reads is data (`OPTIONS`, `command_table`); `parse_args` reads a
command line with `key=value` words as overrides wherever they stand, and refuses an option its command does not use.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from unlearnbench.errors import UserError

# Every option and how argparse reads it. `--lr`, `--methods`, `--exposures` and `--compare` take a list: the words
# after them up to the next option, key=value words excepted (those are overrides wherever they stand).
OPTIONS: dict[str, dict] = {
    "--preset": dict(default="default", metavar="NAME", help="the preset: {presets} (default: default)"),
    "--config": dict(default=None, metavar="FILE", help="a YAML file merged over the preset"),
    "--debug": dict(action="store_true", help="show tracebacks"),
    "--force": dict(action="store_true", help="recompute stages that already finished"),
    "--compare": dict(nargs="+", default=None, metavar="DIR", help="put these run directories side by side "
                      "(in run.dir/compare)"),
    "--lr": dict(nargs="+", type=float, default=None, metavar="LR", help="the grid's unlearning learning rates "
                 "(default 1e-4 3e-4 1e-3)"),
    "--methods": dict(nargs="+", default=None, metavar="M", help="the grid's methods (default ga npo)"),
    "--exposures": dict(nargs="+", default=None, metavar="E", help="the grid's exposure forms (default extrapolated "
                        "rank)"),
    "--ladder": dict(default="cpu", metavar="NAME|FILE", help="the ladder spec: a shipped one ({ladders}) or a .yaml "
                     "file (default: cpu; docs/ladder.md)"),
    "--points": dict(nargs="+", default=None, metavar="POINT", help="run only these points of the ladder (the others "
                     "are read when finished)"),
    "--findings-only": dict(action="store_true", help="re-decide every finished point from its stored results; train "
                            "and unlearn nothing"),
}
COMMON = ("--preset", "--config", "--debug")  # every command reads these

STAGE_OPTIONS = {"report": ("--force", "--compare")}  # a stage's options besides COMMON (default: --force)


@dataclass(frozen=True)
class Command:
    """A command: its name, what it does (one line) and the options it reads besides COMMON."""

    name: str
    summary: str
    options: tuple[str, ...] = ()


def command_table() -> dict[str, Command]:
    """Every command: the stages of the STAGES table, then `run`, `map` and `config`."""
    from unlearnbench.stages import STAGES

    rows = [Command(name, s.summary, STAGE_OPTIONS.get(name, ("--force",))) for name, s in STAGES.items()]
    rows += [
        Command("run", f"every stage in order ({', '.join(STAGES)}), for each seed of run.seeds", ("--force",)),
        Command("map", "the findings map: score and unlearn over a grid of --lr x --methods x --exposures on a run's "
                       "trained models", ("--lr", "--methods", "--exposures")),
        Command("ladder", "the whole study at every point of a ladder over training-side axes (model size, training "
                          "regime, corpus roles, repetitions), then its table and figures", ("--ladder", "--points",
                                                                                            "--findings-only")),
        Command("config", "print the resolved config (preset < --config file < key=value overrides) and exit"),
    ]
    return {c.name: c for c in rows}


def commands() -> tuple[str, ...]:
    """The names of every command, in the order `--help` lists them."""
    return tuple(command_table())


def option_users(flag: str) -> list[str]:
    """The commands that read option `flag`."""
    return [c.name for c in command_table().values() if flag in COMMON or flag in c.options]


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error format: one paragraph, exit 2 (not usage plus a message)."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"unlearnbench: error: {message}. Run `unlearnbench --help` for the commands and options.\n")


def usage() -> str:
    """The usage line (the README's usage block starts with it)."""
    from unlearnbench.config import preset_names

    return (f"unlearnbench COMMAND [--preset {'|'.join(preset_names())}] [--config FILE] [--debug] [OPTIONS] "
            "[key=value ...]")


def parser() -> argparse.ArgumentParser:
    """The argument parser; its help lists every command and which commands read each option."""
    from unlearnbench.config import preset_names
    from unlearnbench.ladder import shipped

    table = command_table()
    width = max(map(len, table)) + 2
    lines = [f"  {c.name:<{width}}{c.summary}" for c in table.values()]
    p = _Parser(
        prog="unlearnbench", usage=usage(), allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Machine unlearning of in- vs out-of-distribution data in causal LMs.\n\ncommands:\n"
                    + "\n".join(lines),
        epilog="Overrides: any config key as key=value, anywhere on the line (e.g. train.steps=200 run.dir=runs/x).\n"
               f"A list option ({', '.join(f for f, kw in OPTIONS.items() if 'nargs' in kw)}) takes the words after "
               "it up to the next option,\nbut never a key=value word. An option the command does not read is an "
               "error.")
    p.add_argument("stage", metavar="COMMAND", choices=tuple(table), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    for flag, kwargs in OPTIONS.items():
        users = option_users(flag)
        who = "every command" if len(users) == len(table) else ", ".join(users)
        text = kwargs["help"].format(presets=", ".join(preset_names()), ladders=", ".join(shipped()))
        p.add_argument(flag, **{**kwargs, "help": f"{who}: {text}"})
    return p


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the words for argparse, the key=value overrides): a word with `=` that is not an option (`-x=1`, `--lr=1`)
    nor the value of a one-value option (`--config a=b.yaml`) is an override, wherever it stands."""
    one_value = {flag for flag, kw in OPTIONS.items() if "nargs" not in kw and "action" not in kw}
    words, overrides, value_next = [], [], False
    for word in argv:
        if not value_next and "=" in word and not word.startswith("-"):
            overrides.append(word)
        else:
            words.append(word)
        value_next = not value_next and word in one_value
    return words, overrides


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line read: `stage` (the command), `overrides` (the key=value words in their order on the line)
    and each option; exit 2 with one paragraph when an option is given to a command that does not read it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    words, overrides = split_overrides(argv)
    args = p.parse_intermixed_args(words)
    # positional words without `=` go first: load_config refuses the first of them by name (not key=value)
    args.overrides = [*args.overrides, *overrides]
    args.preset_given = any(w == "--preset" or w.startswith("--preset=") for w in words)
    command = command_table()[args.stage]
    unread = [flag for flag in OPTIONS if flag not in COMMON + command.options
              and getattr(args, _dest(flag)) != p.get_default(_dest(flag))]
    if unread:
        where = "; ".join(f"{flag} belongs to {', '.join(option_users(flag))}" for flag in unread)
        p.error(f"{' and '.join(unread)} {'is not an option' if len(unread) == 1 else 'are not options'} of "
                f"`{command.name}` ({where}). Drop {'it' if len(unread) == 1 else 'them'}, or give "
                f"{'it' if len(unread) == 1 else 'each'} to a command that reads it")
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m unlearnbench`."""
    from unlearnbench import interrupt

    args = parse_args(argv)
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


def _load(args: argparse.Namespace, preset: str | None = None, first: tuple[str, ...] = ()):
    """The resolved, checked config (`preset` instead of --preset, `first` overrides before the command line's).
    Errors of the config library that its own checks let through (an interpolation that does not resolve, a value
    it cannot convert) are the user's input too: exit 2."""
    from omegaconf.errors import OmegaConfBaseException

    from unlearnbench.config import load_config
    from unlearnbench.rundir import resolve_run
    from unlearnbench.study import check_config

    try:
        cfg = resolve_run(load_config(preset or args.preset, args.config, [*first, *args.overrides]))
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
    spec = None
    if args.stage == "ladder":  # the spec names the base preset (--preset replaces it) and the root's default name
        import dataclasses

        from unlearnbench.ladder import load_spec

        spec = load_spec(args.ladder)
        spec = dataclasses.replace(spec, preset=args.preset) if args.preset_given else spec
        cfg = _load(args, spec.preset, (*spec.overrides, f"run.name=ladder_{spec.name}"))
    else:
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

    from unlearnbench.distributed import make_accelerator, on_main_or_fail
    from unlearnbench.rundir import contained_tmp
    from unlearnbench.study import invocation

    acc = make_accelerator(cfg.run.num_processes)
    command = shlex.join(["unlearnbench", *(sys.argv[1:] if argv is None else argv)])
    # the run directory's lock, taken once for the whole command (the functions below do not take it again)
    with invocation(cfg, acc, command=command), contained_tmp(run_dir):
        if args.stage == "report" and args.compare:
            from unlearnbench.reporting.compare import compare_runs

            on_main_or_fail(acc, lambda: compare_runs([Path(d) for d in args.compare], run_dir / "compare"))
            return
        if spec is not None:
            from unlearnbench.ladder import run_ladder

            run_ladder(spec, run_dir, args.overrides, args.points, args.findings_only, args.config, acc)
            return
        if args.stage == "map":
            from unlearnbench.findings_map import map_settings

            grid = {k: v for k, v in (("lr", args.lr), ("method", args.methods), ("exposure", args.exposures)) if v}
            map_settings(cfg, grid, acc)
            return
        from unlearnbench.study import run_stages

        run_stages(cfg, args.stage, args.force, acc)
