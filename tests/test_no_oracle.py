"""The no-oracle mode (`train.oracle=false`): no θᵣ is trained, e_r is the mean leave-one-out exposure of each kind's
held-out references under θ₀ (docs/definitions.md section 11), and the report and summary.json say so."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import smoke_config
from unlearnbench.study import run_study

# 3 kinds x 1 repetitions count = 3 requests of 8 examples, each seen 16 times: memorized enough that UQ_0 = 0 is
# checked and that a request becomes unlearned for the attack stage to attack.
OVERRIDES = ("train.oracle=false", "data.repetitions=[16]", "data.group_size=8", "data.n_train=300",
             "data.n_retain=20", "data.n_holdout=40", "data.n_id_references=60", "data.n_references=60",
             "data.n_domain_references=60", "data.n_domain_holdout=20", "train.steps=60", "train.checkpoint_every=100",
             "unlearn.max_steps=6", "unlearn.eval_utility=32", "metrics.n_boot=20",
             "attack.requests=max_repetitions", "attack.relearn_steps=2", "attack.quant_bits=[8]")


def loo_by_hand(losses: np.ndarray) -> tuple[float, float]:
    """Mean over the references of each one's (rank, extrapolated) exposure against the others."""
    from unlearnbench.metrics import fit_skewnorm

    n = len(losses)
    rank, ext = [], []
    for i in range(n):
        others = np.delete(losses, i)
        r = 1 + np.sum(others < losses[i]) + 0.5 * np.sum(others == losses[i])
        rank.append(np.log2(len(others) + 1) - np.log2(r))
        fit = fit_skewnorm(others)
        ext.append(-stats.skewnorm.logcdf(losses[i], fit.a, fit.loc, fit.scale) / np.log(2))
    return float(np.mean(rank)), float(np.mean(ext))


@pytest.fixture(scope="module")
def no_oracle_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("no_oracle") / "run"
    cfg = smoke_config(run, *OVERRIDES)
    run_study(cfg, "run")
    return cfg, run


def test_no_oracle_trains_no_oracle_and_takes_e_r_from_references(no_oracle_run):
    cfg, run = no_oracle_run
    assert (run / "models" / "original" / "config.json").exists()
    assert not (run / "models" / "oracle").exists()
    assert not (run / "scores" / "oracle.parquet").exists()
    theta0 = pd.read_parquet(run / "scores" / "original.parquet")
    forget_scores = pd.read_parquet(run / "scores" / "forget.parquet")
    assert set(forget_scores.e_r_source) == {"held_out_references"}
    assert forget_scores[["nll_oracle", "memorization", "difficulty"]].isna().all().all()
    for kind in ("id", "canary", "domain"):
        refs = theta0[(theta0.kind == kind) & (theta0.split == "reference")]["nll"].to_numpy()  # metrics.loss = nll
        assert len(refs) == 60
        rank, ext = loo_by_hand(refs)
        rows = forget_scores[forget_scores.kind == kind]
        np.testing.assert_allclose(rows.exposure_rank_oracle, rank, rtol=1e-9)
        np.testing.assert_allclose(rows.exposure_extrapolated_oracle, ext, rtol=1e-6)
        np.testing.assert_allclose(rows.exposure_oracle, ext, rtol=1e-6)  # metrics.exposure = extrapolated
        assert 0.9 < rank < 2.0  # about the 1.44 bits of an unseen example
        # what the unlearning loop used: the same e_r for every example of the request, and UQ_0 = 0 whenever the
        # gap clears the floor (the request's e_0 is θ₀'s, as with an oracle)
        for reps in (16,):
            curve = pd.read_parquet(run / "unlearn" / f"{kind}_r{reps}" / "curve.parquet")
            forgetting = pd.read_parquet(run / "unlearn" / f"{kind}_r{reps}" / "forgetting.parquet")
            np.testing.assert_allclose(forgetting.exposure_oracle, ext, rtol=1e-6)
            np.testing.assert_allclose(curve.exposure_oracle_mean, ext, rtol=1e-6)
            first = curve.iloc[0]
            assert first.step == 0
            if first.gap >= cfg.metrics.uq_min_gap_bits:
                assert first.uq == 0.0
    gaps = [pd.read_parquet(run / "unlearn" / f"{k}_r16" / "curve.parquet").gap.iloc[0] for k in ("id", "canary", "domain")]
    assert max(gaps) >= cfg.metrics.uq_min_gap_bits  # at least one request where UQ_0 = 0 was checked


def test_no_oracle_summary_report_and_attacks_say_so(no_oracle_run):
    cfg, run = no_oracle_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["e_r_source"] == "held_out_references"
    assert json.loads((run / "stages" / "score.json").read_text())["info"]["e_r_source"] == "held_out_references"
    report = (run / "report" / "report.md").read_text()
    assert "e_r source: held-out references" in report and "leave-one-out" in report
    attacked = [json.loads(p.read_text()) for p in sorted((run / "attacks").glob("*/result.json"))]
    for res in attacked:  # the θr baseline was skipped: the held-out-reference e_r instead, no AUC under θr
        assert res["baseline"] == "held_out_references"
        assert all(v is None for v in res["mia"]["oracle"].values())
        assert res["relearn_retain"]["recovered"] is not None
        rel = pd.read_parquet(run / "attacks" / res["request"] / "relearning.parquet")
        assert set(rel.start) == {"unlearned"}
    if attacked:
        assert "θr was not attacked" in report


def test_fingerprints_include_the_oracle_flag(tmp_path):
    """Switching the mode recomputes train and score (and everything after them), never reuses their outputs."""
    from unlearnbench.config import fingerprint
    from unlearnbench.stages import STAGES

    on, off = smoke_config(tmp_path / "a"), smoke_config(tmp_path / "b", "train.oracle=false")
    for stage in ("train", "score", "unlearn"):
        assert fingerprint(on, STAGES[stage].sections) != fingerprint(off, STAGES[stage].sections), stage


def test_leave_one_out_exposure_worked_example():
    """docs/definitions.md section 11: references 2, 3, 4 -> rank exposures 1.585, 0.585, 0 bits, mean 0.72."""
    from unlearnbench.evaluation import held_out_e_r
    from unlearnbench.metrics import leave_one_out_exposure

    np.testing.assert_allclose(leave_one_out_exposure([2.0, 3.0, 4.0], "rank"), [np.log2(3), np.log2(3 / 2), 0.0])
    refs = np.random.default_rng(0).normal(4.0, 0.3, 80)
    ext = leave_one_out_exposure(refs, "extrapolated")
    assert np.isfinite(ext).all() and 1.0 < ext.mean() < 2.0  # an unseen draw: about 1/ln 2 = 1.44 bits
    scored = pd.DataFrame({"kind": ["canary"] * 80 + ["id"] * 5, "split": ["reference"] * 84 + ["forget"],
                           "nll": [*refs, 2.0, 3.0, 4.0, 5.0, 0.1]})
    e_r = held_out_e_r(scored, "nll").set_index("kind")
    # each of 4 references against the 3 others (ceiling log2 4 = 2 bits): ranks 1..4; the forget row is not used
    assert e_r.loc["id", "exposure_rank"] == pytest.approx(np.mean([2 - np.log2(k) for k in (1, 2, 3, 4)]))
    assert e_r.loc["canary", "exposure_extrapolated"] == pytest.approx(ext.mean())
    assert e_r.loc["id", "n_references"] == 4
