"""Shared pieces of the CPU benchmarks: data, model, timing summaries and the result files.

Data: the `default` preset's prepared examples (KJV passages, canaries, Python docs, tokenized by the run's own
BPE tokenizer), prepared once into a cache directory under /tmp (never into runs/), then a seeded random subset of
examples of 8..128 tokens. Model: the `default` preset's Llama (4 layers, hidden 128, 4 heads, ff 344, vocab 4096),
random init. Results: benchmarks/results/<name>.json with machine, versions, date, command, numbers, ratios and
whether each target was met.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("UNLEARNBENCH_BENCH_CACHE", Path(tempfile.gettempdir()) / "unlearnbench_bench"))
PACKAGES = ("unlearnbench", "torch", "transformers", "accelerate", "datasets", "numpy", "pandas", "psutil")


def portable_path(path) -> str:
    """A path as result files record it: relative to the repository when inside it, else `<tmp>/name` or the
    bare name (results carry no absolute path of the machine they ran on)."""
    path = Path(path).resolve()
    if ROOT in path.parents:
        return str(path.relative_to(ROOT))
    if CACHE.resolve() in path.parents:
        return f"<bench cache>/{path.relative_to(CACHE.resolve())}"
    return f"<elsewhere>/{path.name}"


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (OMP_NUM_THREADS should be set before import for the workers too)."""
    import torch

    torch.set_num_threads(n)


def machine() -> dict:
    import psutil
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "platform": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": load,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def versions() -> dict:
    """Package versions and the git revision, as the project records them in a run's config.yaml."""
    from unlearnbench.records import git_revision, package_versions

    return {**package_versions(), "git": git_revision()}


def summary(xs: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    xs = [float(x) for x in xs]
    med = statistics.median(xs)
    return {"median": med, "min": min(xs), "max": max(xs),
            "spread_pct": 100.0 * (max(xs) - min(xs)) / med if med else None, "runs": xs}


def write_result(name: str, body: dict, quick: bool, out_dir: Path | None = None) -> Path:
    """benchmarks/results/<name>.json (quick runs: <name>.quick.json) with the provenance every result carries."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}{'.quick' if quick else ''}.json"
    doc = {"benchmark": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join([Path(sys.executable).name] + [os.path.relpath(sys.argv[0], ROOT)]
                                 + [_portable_arg(a) for a in sys.argv[1:]]),
           "settings_kind": "quick (tiny settings, a logic check, not a measurement)" if quick else "full",
           "machine": machine(), "versions": versions(), **body}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_default))
    tmp.replace(path)
    return path


def _portable_arg(arg: str) -> str:
    """A command-line argument as a result records it: an absolute path (alone or as key=value) made portable."""
    key, sep, value = arg.rpartition("=") if "=" in arg and not arg.startswith("/") else ("", "", arg)
    return key + sep + (portable_path(value) if os.path.isabs(value) else value)


def _default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def default_config():
    from unlearnbench.config import load_config

    return load_config("default")


def prepared_dir() -> Path:
    """The default preset's data, prepared once under CACHE (a few seconds); reused afterwards."""
    from unlearnbench.data.build import build_data

    data_dir = CACHE / "data_default"
    if not (data_dir / "examples").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        build_data(default_config(), data_dir)
    return data_dir


def scoring_data(n: int = 2000, seed: int = 0):
    """A seeded random subset of n prepared examples of 8..128 tokens: a datasets.Dataset read from disk with an
    indices mapping, like the subsets the stages score (eval_subset, the request evaluator's selection)."""
    import numpy as np

    import datasets

    from unlearnbench.data.build import load_examples

    datasets.disable_progress_bars()
    ds = load_examples(prepared_dir())
    lengths = np.array([len(x) for x in ds["input_ids"]])
    ok = np.nonzero((lengths >= 8) & (lengths <= 128))[0]
    pick = np.sort(np.random.default_rng(seed).choice(ok, size=min(n, len(ok)), replace=False))
    return ds.select(pick.tolist())


def default_model(vocab_size: int = 4096, seed: int = 0):
    from unlearnbench.models import build_model

    model = build_model(default_config(), vocab_size, seed)
    model.config.use_cache = False
    return model


def fmt_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
