"""`unlearnbench map`: unlearning reruns over a grid on the run's trained models, one table and one heatmap."""

import json
import shutil

import pandas as pd
import pytest

from conftest import cli, smoke_config


def test_findings_map_reuses_the_models_and_tabulates_every_setting(smoke_study, tmp_path):
    from unlearnbench.findings_map import run_map, setting_configs
    from unlearnbench.study import run_study

    run = tmp_path / "run"
    shutil.copytree(smoke_study[1], run, symlinks=True)
    cfg = smoke_config(run, "unlearn.max_steps=4", "unlearn.request_kinds=[id,canary]")
    out = run_map(cfg, {"lr": [1e-3], "method": ["ga", "npo"], "exposure": ["rank"]})
    settings = ["lr0.001_ga_rank", "lr0.001_npo_rank"]
    for c in settings:
        assert (out / c / "models").is_symlink() and (out / c / "unlearn" / "summary.json").exists()
        assert not (out / c / "checkpoints").exists()  # nothing was trained again
        assert not (out / c / "summary.json").exists()  # a setting's findings are decided for the map, no report
    rows = pd.read_csv(out / "findings_map.csv")
    assert sorted(rows.setting.unique()) == settings
    assert set(rows.finding) == {"F1", "F2", "F3"} and set(rows.exposure) == {"rank"}
    # the map decides a setting's findings as the report stage would: run the setting's report and compare
    setting_cfg = dict(setting_configs(cfg, {"lr": [1e-3], "method": ["npo"], "exposure": ["rank"]})
                       )["lr0.001_npo_rank"]
    run_study(setting_cfg, "report")
    summary = json.loads((out / "lr0.001_npo_rank" / "summary.json").read_text())
    for key, f in summary["findings"].items():
        assert rows[(rows.setting == "lr0.001_npo_rank") & (rows.finding == key) & (rows["where"] == "overall")
                    ].verdict.item() == f["verdict"]
    f1 = summary["findings"]["F1"]
    contrast_rows = rows[(rows.setting == "lr0.001_npo_rank") & (rows.finding == "F1") & (rows["where"] != "overall")]
    assert len(contrast_rows) == len(f1["contrasts"]) > 0
    for c in f1["contrasts"]:  # the groups each contrast's interval rests on, as the summary counts them
        e = c["by_target"][c["main"]]
        r = contrast_rows[contrast_rows["where"] == f"r{c['repetitions']} {c['ood_kind']}"].iloc[0]
        assert (r.n_id, r.n_ood) == (e["counts"]["id_used"], e["counts"]["ood_used"])
        assert (r.verdict, r.unadjusted) == (c["family_verdict"], c["verdict"])
        assert pd.isna(r["mean"]) if e["mean"] is None else r["mean"] == pytest.approx(e["mean"])
    for c in summary["findings"]["F3"]["kinds"]:
        r = rows[(rows.setting == "lr0.001_npo_rank") & (rows.finding == "F3") & (rows["where"] == c["kind"])].iloc[0]
        assert r.verdict == c["family_verdict"] and r["mean"] == pytest.approx(c["cox"]["memorization"]["coef"])
    md = (out / "findings_map.md").read_text()
    for _, r in rows[rows.n_id.notna() & rows.lo.notna() & rows.hi.notna()].iterrows():
        assert f"[{r.lo:.3g}, {r.hi:.3g}], {int(r.n_id)} vs {int(r.n_ood)} groups" in md
    assert "| lr0.001_ga_rank |" in md and (out / "findings_map.png").read_bytes()[:4] == b"\x89PNG"


def test_map_without_trained_models_names_the_fix(tmp_path):
    res = cli("map", "--preset", "smoke", f"run.dir={tmp_path / 'empty'}", "--lr", "1e-3", "--methods", "ga",
              "--exposures", "rank")
    assert res.returncode == 2 and "Run `unlearnbench train" in res.stderr and "Traceback" not in res.stderr
