"""The ablation runner: which runs a table trains, resume, and the summary tables."""

from __future__ import annotations

import json
import statistics

import pytest

from occreid.ablation import TABLES, format_markdown, get_table, plan_runs, run_dir, summarise, train_command
from occreid.config import load_config
from occreid.configs import config_path
from occreid.utils import OccReIDError


def test_every_row_is_a_valid_config():
    for table in TABLES.values():
        for row in table.rows:
            cfg = load_config(config_path(row.config), list(row.overrides))
            assert cfg["data"]["name"] == "synthocc"


def test_plan_runs_headline_rows_get_every_seed_and_shared_runs_once():
    fed = get_table("fed-components")
    plan = [(r.run, s) for r, s in plan_runs(fed, [0, 1, 2])]
    assert plan.count(("baseline", 1)) == 1 and ("baseline_re", 1) not in plan
    assert len(plan) == 3 + 1 + 1 + 1 + 1 + 3
    dpm = get_table("dpm-losses")  # baseline S and DPM S A are shared with dpm-components
    runs = {r.run for r, _ in plan_runs(dpm, [5])}
    assert {"dpm_baseline", "dpm_no_hr_no_hem"} <= runs and len(runs) == 5
    k8 = [r for r in get_table("fed-k").rows if r.run == "fed"]
    assert k8 and k8[0].headline
    with pytest.raises(OccReIDError, match="unknown ablation"):
        get_table("fed-table9")
    with pytest.raises(OccReIDError, match="at least one seed"):
        plan_runs(fed, [])


def test_train_command_resumes_an_interrupted_run(tmp_path):
    row = get_table("fed-components").rows[1]
    folder = run_dir(tmp_path, row, 4)
    folder.mkdir(parents=True)
    cmd = train_command(row, 4, folder, "/data", ["solver.max_epochs=1"])
    assert "--resume" not in cmd and cmd[-3:] == ["progress=false", "data.re_prob=0.5", "solver.max_epochs=1"]
    assert "solver.seed=4" in cmd and cmd[cmd.index("--data-root") + 1] == "/data"
    (folder / "last.pth").write_bytes(b"x")
    assert "--resume" in train_command(row, 4, folder, None, [])


def _metrics(m):
    groups = {g: {"mAP": m + d, "rank1": m + d + 0.05} for g, d in
              (("holistic", 0.1), ("npo", -0.05), ("ntp", -0.1), ("occluded", -0.07))}
    return {"mAP": m, "rank1": m + 0.05, "by_occlusion": groups}


def test_summary_mean_and_spread_over_seeds(tmp_path):
    table = get_table("dpm-components")
    maps = {}
    for i, row in enumerate(table.rows):
        for seed in ([0, 1, 2] if row.headline else [0]):
            folder = run_dir(tmp_path, row, seed)
            folder.mkdir(parents=True, exist_ok=True)
            value = 0.2 + 0.1 * i + 0.01 * seed
            maps.setdefault(row.run, []).append(100 * value)
            (folder / "metrics.json").write_text(json.dumps(_metrics(value)))
            if row.run != "dpm_baseline":
                (folder / "metrics_post_bn.json").write_text(json.dumps(_metrics(value + 0.1)))
    result = summarise(table, tmp_path, [0, 1, 2])
    head = result["rows"][0]
    assert head["seeds"] == [0, 1, 2] and "post_bn" not in head
    assert head["official"]["mAP all"]["mean"] == pytest.approx(statistics.mean(maps["dpm_baseline"]))
    assert head["official"]["mAP all"]["std"] == pytest.approx(statistics.stdev(maps["dpm_baseline"]))
    single = result["rows"][1]
    assert single["seeds"] == [0] and single["official"]["mAP all"]["std"] is None
    assert single["post_bn"]["mAP holistic"]["mean"] == pytest.approx(100 * (0.3 + 0.1 + 0.1))
    md = format_markdown(result)
    assert "| baseline (softmax + triplet) | 0,1,2 | 21.0 ± 1.0 |" in md
    assert "0 (single seed) | 30.0 |" in md and "post-BNNeck" in md


def test_v1_recipe_reads_the_v1_configs_into_their_own_runs(tmp_path):
    from occreid.ablation import table_dir
    from occreid.config import config_path, load_config
    from occreid.utils import OccReIDError

    cur, old = get_table("fed-components"), get_table("fed-components", "v1")
    assert len(cur.rows) == len(old.rows) and "recipe v1" in old.title
    for a, b in zip(cur.rows, old.rows):
        assert b.run == f"v1_{a.run}" and b.overrides == a.overrides and b.label == a.label
        assert b.config == a.config.replace("synthocc/", "synthocc/v1/")
        assert config_path(b.config).is_file()
    # the v1 baseline is the old recipe (patch 16, label smoothing, per-epoch schedule, 36 epochs)
    v1 = load_config(config_path("synthocc/v1/baseline_demo"))
    now = load_config(config_path("synthocc/baseline_demo"))
    assert (v1["model"]["backbone"], v1["model"]["label_smoothing"], v1["solver"]["max_epochs"]) == ("vit_mini_patch16", 0.1, 36)
    assert (v1["solver"]["lr_schedule"], now["solver"]["lr_schedule"]) == ("epoch", "iteration")
    # v1's FED and DPM inherit the v1 baseline, with the official plain CE and soft margin
    v1_fed = load_config(config_path("synthocc/v1/fed_demo"))
    assert v1_fed["model"]["backbone"] == "vit_mini_patch16" and v1_fed["model"]["label_smoothing"] == 0.0
    assert table_dir(tmp_path, "fed-k", "v1") == tmp_path / "fed-k_v1" and table_dir(tmp_path, "fed-k") == tmp_path / "fed-k"
    with pytest.raises(OccReIDError, match="recipe"):
        get_table("fed-k", "v3")
