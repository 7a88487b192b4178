"""A run writes nothing outside its run directory: not under $HOME (W&B logs and artifacts, matplotlib's font
cache, the `datasets` cache of a local corpus), the working directory or $TMPDIR."""

import os
import subprocess

from conftest import PY, ROOT
from unlearnbench.data.corpora import kjv_passages
from unlearnbench.rundir import contain_writes


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, fs in os.walk(root) for f in fs + dirs)


def test_study_writes_only_inside_its_run_directory(tmp_path):
    home, cwd, tmp, run = (tmp_path / n for n in ("home", "cwd", "tmp", "run"))
    for d in (home, cwd, tmp):
        d.mkdir()
    import pandas as pd

    corpus = tmp_path / "corpus.parquet"  # read through `datasets`' parquet builder, which caches what it reads
    pd.DataFrame({"text": kjv_passages()[:3000]}).to_parquet(corpus, index=False)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}  # nothing else: no WANDB_MODE, no cache variables
    proc = subprocess.run(
        [PY, "-m", "unlearnbench", "run", "--preset", "smoke", f"run.dir={run}", "tracking.backend=wandb",
         f"data.corpus={corpus}", "data.n_train=300", "train.steps=10", "unlearn.max_steps=2",
         "unlearn.request_kinds=[canary]"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "report" / "report.md").exists() and list((run / "wandb").glob("offline-run-*"))
    assert _files(home) == [] and _files(cwd) == [] and _files(tmp) == []
    cache = run / ".cache"
    assert (cache / "matplotlib").is_dir() and (cache / "wandb").is_dir() and (cache / "datasets").is_dir()


def test_user_set_cache_variables_win(tmp_path, monkeypatch):
    from unlearnbench import rundir as runner

    monkeypatch.setattr(runner, "_OURS", {})
    for var in runner._CACHE_ENV:  # restored after the test, whatever contain_writes sets
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/shared/ext")
    got = contain_writes(tmp_path / "a")
    assert got["TORCH_EXTENSIONS_DIR"] == "/shared/ext"
    assert got["MPLCONFIGDIR"] == str((tmp_path / "a" / ".cache" / "matplotlib").resolve())
    # a second run in the same process moves what the first one set, never what the user set
    got = contain_writes(tmp_path / "b")
    assert got["MPLCONFIGDIR"] == str((tmp_path / "b" / ".cache" / "matplotlib").resolve())
    assert got["TORCH_EXTENSIONS_DIR"] == "/shared/ext"
