"""The score stage: per-example table against the raw score files, shadow models, the printed table."""

import shutil

import numpy as np
import pandas as pd

from conftest import smoke_config
from unlearnbench import metrics
from unlearnbench.study import run_study


def test_score_stage_with_shadow_models(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(prepared[1], run)
    cfg = smoke_config(run, "train.steps=20", "train.checkpoint_every=100", "score.shadow_models=2")
    run_study(cfg, "train")
    run_study(cfg, "score")
    out = capsys.readouterr().out
    assert "exp θ0" in out and "canary" in out and "domain" in out
    forget_scores = pd.read_parquet(run / "scores/forget.parquet")
    orig = pd.read_parquet(run / "scores/original.parquet").set_index("example_id")
    orac = pd.read_parquet(run / "scores/oracle.parquet").set_index("example_id")
    assert len(forget_scores) == 9 * cfg.data.group_size
    # memorization and difficulty recomputed from the raw score files
    np.testing.assert_allclose(forget_scores.memorization, orac.loc[forget_scores.example_id, "nll"].to_numpy()
                               - orig.loc[forget_scores.example_id, "nll"].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(forget_scores.difficulty, orac.loc[forget_scores.example_id, "nll"].to_numpy(),
                               rtol=1e-9)
    # exposure under θ₀ recomputed against the canary references
    canary = forget_scores[forget_scores.kind == "canary"]
    refs = orig[(orig.kind == "canary") & (orig.split == "reference")].nll.to_numpy()
    np.testing.assert_allclose(canary.exposure_rank_original,
                               metrics.rank_exposure(orig.loc[canary.example_id, "nll"].to_numpy(), refs))
    # counterfactual memorization by hand from the shadow scores and their training masks
    import json

    masks = json.loads((run / "models/shadow_masks.json").read_text())
    shadows = [pd.read_parquet(run / f"scores/shadow_{j}.parquet").set_index("example_id") for j in range(2)]
    for eid in forget_scores.example_id[:10]:
        ins = [s.loc[eid, "nll"] for s, m in zip(shadows, masks) if m[eid]]
        outs = [s.loc[eid, "nll"] for s, m in zip(shadows, masks) if not m[eid]]
        assert len(ins) == 1 and len(outs) == 1  # K=2: each example is in exactly one shadow's half
        row = forget_scores.set_index("example_id").loc[eid]
        assert abs(row.cf_memorization - (np.mean(outs) - np.mean(ins))) < 1e-9
        assert abs(row.cf_difficulty - np.mean(outs)) < 1e-9
