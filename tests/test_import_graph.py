"""The package's import graph, read from the source (`import` and `from ... import` statements at module level and
inside functions, parsed with `ast`): no import circle anywhere in `unlearnbench`, no stage importing another
stage, and the file checks (`integrity.py`) standing on nothing above `io` / `errors`."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"


def modules(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package's __init__)} of every module of `package` under `src`."""
    out = {}
    for f in sorted((src / package).rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _targets(node: ast.AST, here: list[str], known: dict) -> list[str]:
    """The package's modules an import statement names (`from a import b` names `a.b` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = (here[: len(here) - node.level + 1] if node.level else []) + ([node.module] if node.module else [])
    mod = ".".join(base)
    return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement anywhere in the module. Importing
    `a.b.c` also runs `a/__init__` and `a/b/__init__`: those packages count as imported too, except the
    importer's own packages (always initialized before it)."""
    known = modules(src, package)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for name, (path, is_pkg) in known.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for t in _targets(node, here, known):
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t not in known:
                    continue  # another package
                for p in [t] + [t.rsplit(".", k)[0] for k in range(1, t.count(".") + 1)]:
                    if p != name and not name.startswith(p + "."):
                        graph[name].add(p)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (a module, what it imports, ..., the same module again), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def cross_stage_imports(graph: dict[str, set[str]], stages: str) -> list[tuple[str, str]]:
    """(stage module, another stage module it imports) pairs of the package `stages`."""
    prefix = stages + "."
    return sorted((m, t) for m, ts in graph.items() if m.startswith(prefix) for t in ts
                  if t.startswith(prefix) and t != m and not t.startswith(m + "."))


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_cycle_finder_sees_a_crafted_circle_through_function_level_and_relative_imports(tmp_path):
    src = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from .sub.c import x\n    return x\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import os\n\ndef g():\n    import pkg.a\n",
        "pkg/stages/__init__.py": "",
        "pkg/stages/one.py": "from pkg.stages import two\n",
        "pkg/stages/two.py": "x = 1\n",
    })
    graph = import_graph(src, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub.c", "pkg.sub"}
    assert graph["pkg.sub.c"] == {"pkg.a"}  # its own package is not an edge; os is another package
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.b", "pkg.sub.c"}
    assert cross_stage_imports(graph, "pkg.stages") == [("pkg.stages.one", "pkg.stages.two")]

    (src / "pkg/sub/c.py").write_text("import os\n")  # the circle broken
    assert find_cycle(import_graph(src, "pkg")) is None
    # a circle through a package's __init__: importing pkg.sub.c runs pkg/sub/__init__, which imports pkg.b
    (src / "pkg/sub/__init__.py").write_text("def h():\n    from .. import b\n")
    assert set(find_cycle(import_graph(src, "pkg"))) == {"pkg.b", "pkg.sub"}


def test_no_import_circle_in_the_package():
    graph = import_graph(SRC, "unlearnbench")
    # the graph is the package's, not an empty one: a few edges every reader of the code can check
    assert {"unlearnbench.integrity", "unlearnbench.rundir", "unlearnbench.stages"} <= graph["unlearnbench.records"]
    assert "unlearnbench.records" in graph["unlearnbench.stages.unlearn"]
    assert "unlearnbench.records" in graph["unlearnbench.data.build"]  # a function-level import
    assert sum(map(len, graph.values())) > 100
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_stage_imports_another_stage():
    graph = import_graph(SRC, "unlearnbench")
    stages = [m for m in graph if m.startswith("unlearnbench.stages.")]
    assert len(stages) == 6
    assert cross_stage_imports(graph, "unlearnbench.stages") == []
    assert not graph["unlearnbench.stages"], "the STAGES table imports no stage module (they are loaded lazily)"


def test_file_checks_stand_on_nothing_above_io():
    graph = import_graph(SRC, "unlearnbench")
    assert graph["unlearnbench.integrity"] <= {"unlearnbench.io", "unlearnbench.errors"}
    assert graph["unlearnbench.rundir"] <= {"unlearnbench.config", "unlearnbench.errors"}
    assert graph["unlearnbench.lock"] <= {"unlearnbench.rundir", "unlearnbench.errors", "unlearnbench.distributed"}
