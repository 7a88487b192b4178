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
            device_seconds=40.0, peak_memory_mib=900.0, status="unlearned")
    _result(tmp_path, "id_r4_g1", steps_run=30, wall_seconds=40.0, eval_seconds=25.0, flops=3e12,
            device_seconds=80.0, peak_memory_mib=1000.0, status="diverged")
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
