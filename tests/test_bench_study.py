"""benchmarks/bench_study.py: the per-request cost totals a user predicts a larger run's cost from."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
bench_study = pytest.importorskip("bench_study")


def _result(run, name, **values):
    d = run / "unlearn" / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"request": name, **values}))


def test_per_request_totals_sum_by_kind_and_repetitions(tmp_path):
    _result(tmp_path, "id_r4_g0", steps_run=10, wall_seconds=20.0, eval_seconds=15.0, flops=1e12,
            device_seconds=40.0, peak_memory_mib=900.0, status="target")
    _result(tmp_path, "id_r4_g1", steps_run=30, wall_seconds=40.0, eval_seconds=25.0, flops=3e12,
            device_seconds=80.0, peak_memory_mib=1000.0, status="collapsed")
    _result(tmp_path, "canary_r16_g0", steps_run=0, wall_seconds=1.0, eval_seconds=1.0, flops=1e10,
            device_seconds=2.0, peak_memory_mib=500.0, status="nothing_to_forget")
    out = bench_study.per_request_totals(tmp_path)
    g = out["by_group"]["id_r4"]
    assert g["requests"] == 2 and g["steps_run"] == 40
    assert g["wall_seconds_total"] == 60.0 and g["wall_seconds_mean"] == 30.0
    assert g["flops_total"] == 4e12 and g["peak_memory_mib_max"] == 1000.0
    assert g["device_seconds_per_step"] == pytest.approx(120.0 / 40)
    assert "device_seconds_per_step" not in out["by_group"]["canary_r16"]  # no steps: no per-step cost
    assert out["all"]["requests"] == 3 and out["all"]["flops_total"] == pytest.approx(4.01e12)
    assert [r["request"] for r in bench_study.request_costs(tmp_path)] == ["canary_r16_g0", "id_r4_g0", "id_r4_g1"]


replicate_spread = pytest.importorskip("replicate_spread")


def test_variance_components_by_hand():
    # seed 0 groups 1, 2, 3 (var 1, mean 2); seed 1 groups 5, 6, 7 (var 1, mean 6)
    r = replicate_spread.components([[1, 2, 3], [5, 6, 7]])
    assert r["within_seed_group_var"] == pytest.approx(1.0)
    # var of seed means (2, 6) with ddof 1 = 8, minus within / groups per seed = 1/3
    assert r["between_seed_var"] == pytest.approx(8 - 1 / 3)
    assert r["seed_share"] == pytest.approx((8 - 1 / 3) / (8 - 1 / 3 + 1))
    # seeds that agree on their means: the whole spread is between groups, the seed component floors at 0
    r = replicate_spread.components([[1, 3], [1, 3]])
    assert r["between_seed_var"] == 0.0 and r["within_seed_group_var"] == pytest.approx(2.0)
    assert r["seed_share"] == 0.0
    assert replicate_spread.components([[1.0], []]) is None  # one seed only
