"""`python -m unlearnbench.docs`: rewrite the README's config reference from the dataclasses."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from unlearnbench.config import config_reference, schema

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _comments() -> dict[str, str]:
    """The trailing `# ...` comment of each field in config.py, as its description."""
    src = (Path(__file__).parent / "config.py").read_text()
    out, section = {}, None
    names = {e.cls.__name__: key for key, e in schema().items() if e.is_section and key}  # type: ignore[union-attr]
    for line in src.splitlines():
        m = re.match(r"class (\w+)\b", line)
        if m:
            section = names.get(m.group(1))
            continue
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m and section:
            out[f"{section}.{m.group(1)}"] = m.group(2).strip()
    return out


def reference_table() -> str:
    """Markdown table of every config key with type, default and description."""
    notes = _comments()
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default in config_reference():
        rows.append(f"| `{key}` | {typ.replace('|', ' or ')} | `{default}` | {notes.get(key, '').replace('|', '/')} |")
    return "\n".join(rows)


def main() -> None:
    """Rewrite the section between the markers in README.md (or check it with --check)."""
    readme = Path(__file__).resolve().parents[2] / "README.md"
    text = readme.read_text()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{reference_table()}\n{END}", text, flags=re.S)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else 1)
    readme.write_text(new)


if __name__ == "__main__":
    main()
