"""The command line (issue 28): key=value overrides wherever they stand, list options that take only their own values,
an option given to a command that does not read it refused with the commands it belongs to; `--help` and the
README's usage block list every command and preset. In-process through `cli.parse_args` (no torch import), plus two
subprocesses for the exit codes of the real entry point."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from unlearnbench import cli
from unlearnbench.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]

# Each list option's words on a command line and the values it must read from them.
LIST_VALUES = {
    "--lr": (["3e-4", "1e-3"], [3e-4, 1e-3]),
    "--methods": (["ga", "npo"], ["ga", "npo"]),
    "--exposures": (["extrapolated"], ["extrapolated"]),
    "--compare": (["runs/a", "runs/b"], ["runs/a", "runs/b"]),
    "--points": (["base", "size-5M"], ["base", "size-5M"]),
}
LIST_OPTIONS = [flag for flag, kw in cli.OPTIONS.items() if kw.get("nargs") == "+"]
OVERRIDES = ["metrics.uq_target=0.8", "unlearn.lr=0.002"]
USES = [(c.name, flag) for c in cli.command_table().values() for flag in LIST_OPTIONS if flag in c.options]
MISUSES = [(c.name, flag) for c in cli.command_table().values() for flag in LIST_OPTIONS if flag not in c.options]


def test_every_list_option_is_covered():
    assert sorted(LIST_VALUES) == sorted(LIST_OPTIONS) == ["--compare", "--exposures", "--lr", "--methods", "--points"]
    assert ("map", "--lr") in USES and ("report", "--compare") in USES and ("config", "--exposures") in MISUSES
    assert ("ladder", "--points") in USES and ("run", "--points") in MISUSES
    assert len(USES) == 5 and len(USES) + len(MISUSES) == 5 * len(cli.commands())


def _resolved(args) -> dict:
    return to_dict(load_config(args.preset, args.config, args.overrides))


@pytest.mark.parametrize("command, flag", USES, ids=[f"{c} {f}" for c, f in USES])
def test_override_after_a_list_option_is_an_override(tmp_path, command, flag):
    words, values = LIST_VALUES[flag]
    run_dir = f"run.dir={tmp_path / 'run'}"
    after = cli.parse_args([command, "--preset", "smoke", flag, *words, *OVERRIDES, run_dir])
    before = cli.parse_args([command, "--preset", "smoke", *OVERRIDES, run_dir, flag, *words])
    among = cli.parse_args([command, flag, words[0], OVERRIDES[0], *words[1:], "--preset", "smoke", OVERRIDES[1],
                            run_dir])
    for args in (after, before, among):
        assert args.stage == command and getattr(args, flag[2:]) == values
        assert args.overrides == [*OVERRIDES, run_dir]
    assert vars(after) == vars(before) == vars(among)
    cfg = _resolved(after)
    assert cfg == _resolved(before) == _resolved(among)
    assert cfg["metrics"]["uq_target"] == 0.8 and cfg["unlearn"]["lr"] == 0.002  # the smoke preset has 0.9 and 3e-4


def test_the_issues_example_reads_one_exposure_and_the_run_dir():
    args = cli.parse_args(["map", "--preset", "smoke", "--lr", "3e-4", "1e-3", "--methods", "ga", "npo",
                           "--exposures", "extrapolated", "run.dir=runs/mapsmoke"])
    assert (args.lr, args.methods, args.exposures) == ([3e-4, 1e-3], ["ga", "npo"], ["extrapolated"])
    assert args.overrides == ["run.dir=runs/mapsmoke"] and args.preset == "smoke"


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("unlearnbench: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command, flag", MISUSES, ids=[f"{c} {f}" for c, f in MISUSES])
def test_a_list_option_on_a_command_that_does_not_read_it_is_refused(capsys, command, flag):
    words, _ = LIST_VALUES[flag]
    err = _refused(capsys, [command, "--preset", "smoke", flag, *words, "metrics.uq_target=0.8"])
    owners = {"--lr": "map", "--methods": "map", "--exposures": "map", "--compare": "report", "--points": "ladder"}[flag]
    assert f"{flag} is not an option of `{command}`" in err and f"{flag} belongs to {owners})." in err


def test_force_belongs_to_the_stages_and_run(capsys):
    stages = ["prepare", "train", "score", "unlearn", "attack", "report"]
    for command in [*stages, "run"]:
        assert cli.parse_args([command, "--force"]).force is True
    for command in ("map", "config"):
        err = _refused(capsys, [command, "--force"])
        assert f"--force belongs to {', '.join(stages)}, run)." in err
    err = _refused(capsys, ["config", "--lr", "1", "--force"])
    assert "--force and --lr are not options of `config`" in err and "--lr belongs to map)." in err


def test_which_words_are_overrides():
    split = cli.split_overrides
    assert split(["config", "--config", "a=b.yaml", "x=1"]) == (["config", "--config", "a=b.yaml"], ["x=1"])
    assert split(["run", "-x=1", "--lr=1e-3", "--preset=smoke", "=", "a.b=c=d"]) == (
        ["run", "-x=1", "--lr=1e-3", "--preset=smoke"], ["=", "a.b=c=d"])
    assert split(["map", "--preset", "smoke", "--lr", "1", "k=v", "2"]) == (
        ["map", "--preset", "smoke", "--lr", "1", "2"], ["k=v"])
    # a word without `=` after the values is still refused by name (by load_config, with the key=value form)
    assert cli.parse_args(["config", "train.steps"]).overrides == ["train.steps"]


def test_help_lists_every_command_with_its_line_and_every_preset():
    from unlearnbench.stages import STAGES

    text = cli.parser().format_help()
    names = [*STAGES, "run", "map", "ladder", "config"]
    assert list(cli.commands()) == names and {"attack", "map", "ladder"} <= set(names)
    listed = re.findall(r"^  ([a-z]+) +(\S.*)$", text.split("commands:\n", 1)[1].split("\n\n", 1)[0], re.M)
    assert [n for n, _ in listed] == names
    assert all(summary == cli.command_table()[n].summary for n, summary in listed)
    presets = sorted(p.stem for p in (ROOT / "src" / "unlearnbench" / "presets").glob("*.yaml"))
    assert "study" in presets and f"--preset {'|'.join(presets)}" in text
    flat = " ".join(text.split())
    assert "--lr LR [LR ...] map:" in flat and "--compare DIR [DIR ...] report:" in flat
    assert f"--force {', '.join(STAGES)}, run:" in flat and "--preset NAME every command:" in flat


def test_help_states_the_maps_default_grid():
    from unlearnbench.findings_map import DEFAULT_GRID

    flat = " ".join(cli.parser().format_help().split())
    for flag, key, kind in (("--lr", "lr", float), ("--methods", "method", str), ("--exposures", "exposure", str)):
        stated = re.search(rf"{flag} \S+ \[\S+ \.\.\.\] map: [^(]*\(default ([^)]*)\)", flat).group(1)
        assert [kind(x) for x in stated.split()] == DEFAULT_GRID[key], flag


def _readme_command_lines(readme: str) -> list[str]:
    """Every unlearnbench command line of the README: in code blocks (comments cut) and in inline code."""
    lines = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", readme, re.S):
        lines += [ln.split("  #")[0].strip() for ln in block.splitlines()]
    lines += re.findall(r"`([^`\n]*unlearnbench [^`\n]+)`", readme)
    out = []
    for ln in lines:
        m = re.search(r"(?:^|-m )unlearnbench (.+)$", ln)
        if m and not m.group(1).startswith("COMMAND"):
            out.append(m.group(1))
    return out


def test_readme_usage_block_and_command_lines_agree_with_the_parser():
    readme = (ROOT / "README.md").read_text()
    usage_block = readme.split(cli.usage() + "\n", 1)
    assert len(usage_block) == 2, "the README's usage block starts with the help's usage line"
    block = usage_block[1].split("```", 1)[0]
    for name in cli.commands():
        assert re.search(rf"\b{name}\b", block), name
    lines = _readme_command_lines(readme)
    assert len(lines) >= 10 and any(ln.startswith("map ") and "--lr" in ln for ln in lines)
    for ln in lines:
        if ln == "--help":
            continue  # the help itself: test_entry_point_help_exits_0_with_every_command
        cli.parse_args(shlex.split(ln))  # exits 2 on a command or option the parser does not know


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unlearnbench", *argv], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})


def test_entry_point_refuses_an_option_its_command_does_not_read(tmp_path):
    res = _cli("config", "--preset", "smoke", "--exposures", "rank", "metrics.uq_target=0.8",
               f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
    assert "--exposures is not an option of `config` (--exposures belongs to map)" in res.stderr
    assert not (tmp_path / "run").exists()


def test_entry_point_help_exits_0_with_every_command(tmp_path):
    res = _cli("--help", cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == ""
    assert all(re.search(rf"^  {name} ", res.stdout, re.M) for name in cli.commands())
