"""docs/outputs.md against what a run writes, both ways: the files and folders of the smoke study's run directory
against the page's tree, and the keys (columns) of each file the page gives a `key` (`column`) table against that
table. The page's format (its first paragraphs say it): a tree in the first code block under "## The run directory"
(`├── name[, name ...]   description`), and under a heading naming files in backticks, a table whose first header
cell is `key` or `column` with the names in backticks in its first cell; a description that starts with "only"
marks something a run holds under some settings only; `<...>` stands for any name."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT

DOC = ROOT / "docs" / "outputs.md"
# The files the page must describe with a key or column table (the run's summaries, results and stage records, and
# the per-example tables): a heading for each, matched in the smoke study.
MUST_CHECK = ("summary.json", "unlearn/summary.json", "attacks/summary.json", "unlearn/<request>/result.json",
              "attacks/<request>/result.json", "stages/<stage>.json", "config.yaml", "scores/forget.parquet",
              "scores/original.parquet", "unlearn/<request>/curve.parquet", "unlearn/<request>/trajectory.parquet",
              "unlearn/<request>/forgetting.parquet", "attacks/<request>/relearning.parquet", "data/examples")


@dataclass(frozen=True)
class Entry:
    """One name of the page: a path (tree) or a key (table), as a pattern, and whether a run may lack it."""

    name: str
    optional: bool
    is_dir: bool = False
    listed: bool = False  # a folder whose contents the tree lists (else: opaque, covers everything under it)

    def pattern(self, one_level: bool = True) -> re.Pattern:
        """The name as a regular expression, `<...>` standing for any name (one path level when `one_level`)."""
        any_name = r"[^/]+" if one_level else r".+"
        parts = re.split(r"(<[^>]+>)", self.name.rstrip("/"))
        return re.compile("".join(any_name if p.startswith("<") else re.escape(p) for p in parts))

    def matches(self, name: str) -> bool:
        """Whether a run's path or key is this entry."""
        return self.pattern().fullmatch(name) is not None


# ----------------------------------------------------------------------------------------------- the page


def tree_entries(text: str) -> list[Entry]:
    """The run directory's tree: every file and folder the page lists, with its path from the run directory."""
    block = text.split("## The run directory", 1)[1].split("```", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.strip()][1:]  # below the root, `runs/<name>/`
    out: list[Entry] = []
    stack: list[tuple[int, str]] = []  # (depth, folder path)
    for i, line in enumerate(lines):
        m = re.match(r"^((?:│   |    )*)[├└]── (.*)$", line)
        assert m, f"docs/outputs.md tree line not understood: {line!r}"
        depth, rest = len(m.group(1)) // 4, m.group(2)
        names, desc = (re.split(r"\s{2,}", rest.strip(), maxsplit=1) + [""])[:2]  # two spaces end the names
        stack = [(d, p) for d, p in stack if d < depth]
        parent = stack[-1][1] if stack else ""
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        has_children = bool(re.match(r"^" + r"(?:│   |    )" * (depth + 1) + r"[├└]── ", nxt))
        for name in (n.strip() for n in names.split(", ")):
            path = parent + name
            is_dir = name.endswith("/")
            out.append(Entry(path.rstrip("/"), desc.strip().startswith("only"), is_dir, is_dir and has_children))
            if is_dir:
                stack.append((depth, path))
    return out


def key_tables(text: str) -> dict[str, tuple[str, list[Entry]]]:
    """{file named in a heading: (the table's kind, `key` or `column`; its names)} for every heading with a table."""
    out: dict[str, tuple[str, list[Entry]]] = {}
    for section in re.split(r"\n(?=#{2,4} )", text):
        heading, _, body = section.partition("\n")
        files = re.findall(r"`([^`]+)`", heading) if heading.startswith("#") else []
        rows = [ln for ln in body.splitlines() if ln.startswith("|")]
        if not files or not rows:
            continue
        kind = rows[0].strip("|").split("|")[0].strip()
        if kind not in ("key", "column"):
            continue
        entries = []
        for row in rows[2:]:
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            entries += [Entry(n, cells[1].startswith("only")) for n in re.findall(r"`([^`]+)`", cells[0])]
        for f in files:
            out[f] = (kind, entries)
    return out


# ----------------------------------------------------------------------------------------------- the run


def run_paths(run: Path) -> tuple[list[str], list[str]]:
    """(files, folders) of the run directory, as paths from it."""
    files, dirs = [], []
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        (dirs if p.is_dir() and not p.is_symlink() else files).append(rel)
    return files, dirs


def names_in(path: Path) -> set[str]:
    """A file's top-level keys (a JSON object or YAML mapping; the union over rows of a JSON list) or columns (a
    parquet table; a `datasets` table folder)."""
    if path.is_dir():
        return set(json.loads((path / "dataset_info.json").read_text())["features"])
    if path.suffix == ".parquet":
        return set(pd.read_parquet(path).columns)
    doc = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    rows = doc if isinstance(doc, list) else [doc]
    return {k for r in rows for k in r}


def undocumented_paths(entries: list[Entry], files: list[str], dirs: list[str]) -> list[str]:
    """The run's files and folders that no entry of the tree describes (a folder listed without its contents covers
    everything under it)."""
    opaque = [e for e in entries if e.is_dir and not e.listed]
    out = []
    for rel in files + dirs:
        ancestors = ["/".join(rel.split("/")[:k]) for k in range(1, rel.count("/") + 1)]
        if any(e.matches(a) for e in opaque for a in ancestors):
            continue
        is_dir = rel in dirs
        if not any(e.matches(rel) and e.is_dir == is_dir for e in entries):
            out.append(rel)
    return out


def missing_paths(entries: list[Entry], files: list[str], dirs: list[str]) -> list[str]:
    """The tree's entries (not marked *only*) that the run lacks."""
    return [e.name for e in entries if not e.optional and not any(e.matches(r) for r in (dirs if e.is_dir else files))]


def compare_names(entries: list[Entry], names: set[str]) -> tuple[list[str], list[str]]:
    """(names the file has that the table lacks, names the table requires that the file lacks)."""
    extra = sorted(n for n in names if not any(e.matches(n) for e in entries))
    missing = sorted(e.name for e in entries if not e.optional and not any(e.matches(n) for n in names))
    return extra, missing


# ----------------------------------------------------------------------------------------------- the tests


def test_the_run_directory_holds_what_the_tree_lists_and_nothing_else(smoke_study):
    _, run = smoke_study
    entries = tree_entries(DOC.read_text())
    files, dirs = run_paths(run)
    assert not undocumented_paths(entries, files, dirs), "files or folders of the run that docs/outputs.md omits"
    assert not missing_paths(entries, files, dirs), "files or folders docs/outputs.md lists that the run lacks"


def test_every_file_has_the_keys_its_table_lists_and_no_other(smoke_study):
    _, run = smoke_study
    tables = key_tables(DOC.read_text())
    assert set(MUST_CHECK) <= set(tables), f"docs/outputs.md has no key table for {set(MUST_CHECK) - set(tables)}"
    files, dirs = run_paths(run)
    checked = set()
    for doc_path, (kind, entries) in tables.items():
        where = Entry(doc_path, False)
        found = [r for r in files + dirs if where.matches(r)]
        assert found or doc_path not in MUST_CHECK, f"the smoke study has no {doc_path}"
        for rel in found:
            extra, missing = compare_names(entries, names_in(run / rel))
            assert not extra, f"{rel} has {kind}s docs/outputs.md does not list: {extra}"
            assert not missing, f"docs/outputs.md lists {kind}s {rel} lacks: {missing}"
            checked.add(doc_path)
    assert set(MUST_CHECK) <= checked


def test_the_parser_sees_a_tree_and_tables_it_was_given(tmp_path):
    """The comparison itself: a crafted page and run directory, with one undocumented file, one missing file, one
    undocumented key and one missing key, each found; optional entries, placeholders and opaque folders pass."""
    page = """## The run directory

```
runs/<name>/
├── a.json                 the a file
├── opt.txt                only sometimes
├── sub/
│   ├── <x>/               one per x
│   │   ├── r.json, s.json
│   │   └── model/         only for some x
│   └── gone.txt           listed but never written
└── blob/                  opaque
```

## `sub/<x>/r.json`

| key | meaning |
|---|---|
| `k1`, `k_<n>` | keys |
| `k2` | only with a setting |
| `k3` | never written |
"""
    run = tmp_path / "run"
    for rel, body in {"a.json": "{}", "sub/one/r.json": '{"k1": 1, "k_7": 2, "new": 3}', "sub/one/s.json": "{}",
                      "sub/one/model/w.bin": "", "blob/deep/x.bin": "", "extra.txt": ""}.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(body)
    entries = tree_entries(page)
    assert {e.name: (e.optional, e.is_dir, e.listed) for e in entries} == {
        "a.json": (False, False, False), "opt.txt": (True, False, False), "sub": (False, True, True),
        "sub/<x>": (False, True, True), "sub/<x>/r.json": (False, False, False), "sub/<x>/s.json": (False, False, False),
        "sub/<x>/model": (True, True, False), "sub/gone.txt": (False, False, False), "blob": (False, True, False)}
    files, dirs = run_paths(run)
    assert undocumented_paths(entries, files, dirs) == ["extra.txt"]
    assert missing_paths(entries, files, dirs) == ["sub/gone.txt"]
    kind, keys = key_tables(page)["sub/<x>/r.json"]
    assert kind == "key" and compare_names(keys, names_in(run / "sub/one/r.json")) == (["new"], ["k3"])


@pytest.mark.parametrize("name, given, expected", [
    ("unlearn/<request>/result.json", "unlearn/id_r4_g0/result.json", True),
    ("unlearn/<request>/result.json", "unlearn/id_r4/deeper/result.json", False),
    ("eval_step_uq_0.5", "eval_step_uq_0x5", False),  # a dot is a dot, not any character
    ("method_<stat>", "method_forget_nll", True),
])
def test_placeholders_stand_for_one_name(name, given, expected):
    assert Entry(name, False).matches(given) is expected
