"""The ladder: the whole study over training-side axes (model size, training regime, corpus roles, repetitions), to
ask which findings hold beyond one trained setup (`unlearnbench ladder`; docs/ladder.md).

A ladder spec (YAML, `ladders/<name>.yaml` in the package or a file) names a base preset and its axes; each axis has
levels, each a list of `key=value` overrides. Every (axis, level) is a **point**: a full study in
`<run.dir>/points/<point>/`. Points whose resolved configs are equal are one point (the base level of every axis is
the `base` point). Before a point runs, every stage whose fingerprint (and every earlier stage's) equals a finished
stage of another point is shared from it (links to its outputs, copies of its records: `records.share_stages`): the
prepared data when only the model changes, the trained pair when only unlearning changes. A killed ladder resumes
point by point (each point resumes stage by stage). The verdicts come from each point's stored per-request results
through the report stage, so `--findings-only` re-decides every stored point under the rules of the installed
version without training or unlearning anything.

Writes `<run.dir>/ladder.json` (points, their configs, data facts, cost and every finding row), `ladder.md`,
`ladder.csv` and one figure per finding, `ladder_<F>.png`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from unlearnbench.config import Config, load_config, to_dict
from unlearnbench.errors import UserError

LADDERS = "ladders"  # package folder of the shipped specs
SPEC_KEYS = {"title", "preset", "overrides", "axes"}
AXIS_KEYS = {"name", "title", "x", "levels"}
LEVEL_KEYS = {"name", "set", "note"}
FIXED_KEYS = ("run.dir", "run.name")  # a point's place and name are the ladder's


@dataclass
class Axis:
    """One axis of the ladder: its name, title, what the figure's x shows (`params`: parameter count, log scale;
    `level`: the levels in order) and its levels as (name, overrides, note)."""

    name: str
    title: str
    x: str
    levels: list[tuple[str, list[str], str]]


@dataclass
class Spec:
    """A parsed ladder spec."""

    name: str
    title: str
    preset: str
    overrides: list[str]
    axes: list[Axis]


@dataclass
class Point:
    """One study of the ladder: its directory name, resolved config and the (axis, level) pairs it stands for."""

    name: str
    cfg: Config
    levels: list[tuple[str, str]] = field(default_factory=list)  # (axis name, level name)
    overrides: list[str] = field(default_factory=list)


def shipped() -> list[str]:
    """Names of the ladder specs shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("unlearnbench").joinpath(LADDERS).iterdir()
                  if p.name.endswith(".yaml"))


def load_spec(which: str) -> Spec:
    """A ladder spec by shipped name (`cpu`, `gpu`) or path to a YAML file, checked."""
    path = Path(which)
    if which in shipped():
        text, name = resources.files("unlearnbench").joinpath(LADDERS, f"{which}.yaml").read_text(), which
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        text, name = path.read_text(encoding="utf-8"), path.stem
    else:
        raise UserError(f"Unknown ladder '{which}': give a shipped ladder ({', '.join(shipped())}) or an existing "
                        ".yaml file (docs/ladder.md shows the format).")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"The ladder spec '{which}' is not valid YAML ({' '.join(str(exc).split())[:200]}). Fix "
                        "the file (docs/ladder.md shows the format).") from None
    return _parse(doc, name, which)


def _parse(doc: Any, name: str, where: str) -> Spec:
    def bad(msg: str) -> UserError:
        return UserError(f"The ladder spec '{where}' {msg}. See docs/ladder.md for the format.")

    if not isinstance(doc, dict) or not isinstance(doc.get("axes"), list) or not doc["axes"]:
        raise bad("needs a mapping with a non-empty list `axes`")
    if set(doc) - SPEC_KEYS:
        raise bad(f"has unknown keys {sorted(set(doc) - SPEC_KEYS)} (allowed: {sorted(SPEC_KEYS)})")
    axes, seen = [], set()
    for a in doc["axes"]:
        if not isinstance(a, dict) or not a.get("name") or not isinstance(a.get("levels"), list) or not a["levels"]:
            raise bad("has an axis without a `name` or a non-empty list of `levels`")
        if set(a) - AXIS_KEYS:
            raise bad(f"axis '{a['name']}' has unknown keys {sorted(set(a) - AXIS_KEYS)}")
        if a["name"] in seen:
            raise bad(f"names the axis '{a['name']}' twice")
        seen.add(a["name"])
        if a.get("x", "level") not in ("level", "params"):
            raise bad(f"axis '{a['name']}' has x={a.get('x')!r}; use x: level or x: params")
        levels, names = [], set()
        for lv in a["levels"]:
            if not isinstance(lv, dict) or not lv.get("name") or set(lv) - LEVEL_KEYS:
                raise bad(f"axis '{a['name']}' has a level that is not {{name, set, note}}: {lv!r}")
            sets = [str(s) for s in (lv.get("set") or [])]
            if any("=" not in s for s in sets) or str(lv["name"]) in names:
                raise bad(f"axis '{a['name']}' level '{lv['name']}' needs unique names and key=value overrides")
            if any(s.split("=", 1)[0].strip() in FIXED_KEYS for s in sets):
                raise bad(f"sets {', '.join(FIXED_KEYS)} in level '{lv['name']}': the ladder places its points")
            names.add(str(lv["name"]))
            levels.append((str(lv["name"]), sets, str(lv.get("note") or "")))
        axes.append(Axis(str(a["name"]), str(a.get("title") or a["name"]), str(a.get("x", "level")), levels))
    return Spec(name, str(doc.get("title") or name), str(doc.get("preset") or "default"),
                [str(s) for s in (doc.get("overrides") or [])], axes)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "level"


def points(spec: Spec, root: Path, cli_overrides: list[str], config_file: str | None = None) -> list[Point]:
    """Every distinct point of the spec, the base first. Overrides apply in the order: the preset, the spec's
    `overrides`, the command line's, then the level's own (a point's axis setting wins over the command line)."""
    from unlearnbench.rundir import ladder_point_dir, resolve_run

    def make(name: str, level: list[str]) -> Config:
        cfg = load_config(spec.preset, config_file, [*spec.overrides, *cli_overrides, *level,
                                                     f"run.dir={ladder_point_dir(root, name)}",
                                                     f"run.name={spec.name}-{name}"])
        return resolve_run(cfg)

    base = Point("base", make("base", []), [], [])
    out = [base]
    key_of = {_identity(base.cfg): base}
    for axis in spec.axes:
        for level, sets, _ in axis.levels:
            name = f"{_slug(axis.name)}-{_slug(level)}"
            cfg = make(name, sets)
            found = key_of.get(_identity(cfg))
            if found is None:
                found = Point(name, cfg, [], sets)
                key_of[_identity(cfg)] = found
                out.append(found)
            found.levels.append((axis.name, level))
    return out


def _identity(cfg: Config) -> str:
    """What makes two points the same study: the resolved config without its place and name."""
    d = to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("dir", "name")}
    return yaml.safe_dump(d, sort_keys=True)


# ----------------------------------------------------------------------------------------------- running


def share_from_finished(point: Point, finished: list[Point]) -> dict[str, str]:
    """Share with each run of this point (one per seed) every stage that a run of another finished point computed
    under the same fingerprints (that stage and all before it: `records.share_stages`); {stage (seed): point}."""
    from unlearnbench.records import share_stages
    from unlearnbench.study import seed_configs

    shared: dict[str, str] = {}
    for sub in seed_configs(point.cfg):
        dst = Path(sub.run.dir)
        dst.mkdir(parents=True, exist_ok=True)
        for other in finished:
            for src in seed_configs(other.cfg):
                got = share_stages(Path(src.run.dir), dst, sub)
                where = f" ({dst.name})" if point.cfg.run.seeds else ""
                shared.update({f"{s}{where}": other.name for s in got})
    return shared


def run_ladder(spec: Spec, root: Path, cli_overrides: list[str], only: list[str] | None = None,
               findings_only: bool = False, config_file: str | None = None, acc=None) -> Path:
    """Run (or, with `findings_only`, re-decide) every point of the ladder in `root`, then write its table and
    figures. The caller holds `root`'s lock (`study.invocation`), which covers the points."""
    from unlearnbench.distributed import make_accelerator, on_main_or_fail
    from unlearnbench.ladder_report import write_outputs
    from unlearnbench.study import check_config, run_stages

    pts = points(spec, root, cli_overrides, config_file)
    names = [p.name for p in pts]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise UserError(f"--points names {', '.join(unknown)}, which this ladder does not have. Its points: "
                        f"{', '.join(names)}.")
    todo = [p for p in pts if not only or p.name in only]
    for p in todo:
        check_config(p.cfg)
    acc = acc or make_accelerator(pts[0].cfg.run.num_processes)
    finished = [p for p in pts if _done(p)]
    for p in todo:
        if findings_only:
            if p in finished:
                acc.print(f"[ladder] {p.name}: re-deciding the findings from its stored results")
                run_stages(p.cfg, "report", True, acc)
            else:
                acc.print(f"[ladder] {p.name}: not finished; --findings-only re-decides finished points only")
            continue
        shared = on_main_or_fail(acc, lambda p=p: share_from_finished(p, [f for f in finished if f is not p]))
        acc.print(f"[ladder] {p.name} ({', '.join(f'{a}={lv}' for a, lv in p.levels) or 'base'})"
                  + (f": sharing {', '.join(f'{s} of {o}' for s, o in shared.items())}" if shared else ""))
        run_stages(p.cfg, "run", False, acc)
        if p not in finished:
            finished.append(p)
    if acc.is_main_process:
        write_outputs(spec, pts, root)
        acc.print(f"[ladder] wrote {root / 'ladder.md'}, ladder.json, ladder.csv and the figures ({len(pts)} points)")
    acc.wait_for_everyone()
    return root


def _done(p: Point) -> bool:
    """Whether every stage of the point (every seed) finished: its merged summary exists and the report stage's
    record is there."""
    from unlearnbench.records import read_record
    from unlearnbench.study import seed_configs

    return all((rec := read_record(Path(s.run.dir), "report")) is not None and not rec.get("invalid")
               for s in seed_configs(p.cfg)) and (Path(p.cfg.run.dir) / "summary.json").exists()
