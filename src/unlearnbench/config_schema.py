"""One walk over a tree of config dataclasses: every section and key with its declared type and default.

The walk serves everything that needs the config's shape: the keys a section allows and the type a key expects
(error messages), the item type of each list key (validation), and the config reference table of the README
("Config reference", written by `python -m unlearnbench.docs`). It imports nothing from the package, so the
config and its checks both stand on it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

SECTION = "section"


@dataclass(frozen=True)
class Entry:
    """One node of the schema: a section (a dataclass) or a key (a field with a value)."""

    key: str  # dotted path; "" for the root
    type: str  # the declared type as written (`int`, `List[str]`, `Optional[float]`), or "section"
    default: Any = None  # a key's default value
    fields: tuple[str, ...] = ()  # a section's field names, in declaration order
    cls: type | None = None  # a section's dataclass

    @property
    def is_section(self) -> bool:
        """True for a section (a nested dataclass), False for a key that holds a value."""
        return self.type == SECTION


@functools.lru_cache(maxsize=None)
def walk(root: type) -> dict[str, Entry]:
    """Every section and key under the dataclass `root`, by dotted key, in declaration order (the root under "")."""
    out: dict[str, Entry] = {}

    def visit(prefix: str, cls: type) -> None:
        fields = dataclasses.fields(cls)
        out[prefix] = Entry(prefix, SECTION, fields=tuple(f.name for f in fields), cls=cls)
        defaults = cls()
        for f in fields:
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(f.default_factory):
                visit(key, f.default_factory)  # type: ignore[arg-type]
            else:
                out[key] = Entry(key, str(f.type).replace("typing.", ""), getattr(defaults, f.name))

    visit("", root)
    return out


def keys(root: type) -> list[Entry]:
    """The keys that hold values (no sections), in declaration order, nested sections flattened to dotted keys."""
    return [e for e in walk(root).values() if not e.is_section]


_ITEM_TYPES = {"int": int, "str": str, "float": float}


@functools.lru_cache(maxsize=None)
def list_items(root: type) -> dict[str, type]:
    """Every list key and the type of its items, from the annotations (List[int] -> int)."""
    return {e.key: _ITEM_TYPES[e.type[5:-1]] for e in keys(root) if e.type.startswith("List[")}
