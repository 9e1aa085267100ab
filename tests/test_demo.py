"""The demo command end to end on the tiny SynthOcc preset (a few seconds)."""

import json

import pytest
from PIL import Image

from occreid.cli import main

FAST = ["model.backbone=vit_nano", "model.stride=8", "data.synth_preset=tiny", "data.size_train=[64,32]",
        "data.size_test=[64,32]", "data.num_workers=0", "solver.ims_per_batch=16", "solver.eval_period=1",
        "progress=off"]


@pytest.mark.parametrize("method", ["baseline", "fed", "dpm"])
def test_demo_writes_metrics_curves_and_ranked_lists(tmp_path, capsys, method):
    out = tmp_path / "demo"
    rc = main(["demo", "--output", str(out), "--data-root", str(tmp_path / "data"), "--epochs", "2",
               "--method", method, "--compare", "none", "--device", "cpu", *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ranked lists:" in printed and str(out / "ranked_occluded_queries.png") in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and m["epoch"] == 2
    assert set(m["by_occlusion"]) >= {"holistic", "npo", "ntp", "occluded"}
    assert m["by_occlusion"]["holistic"]["num_queries"] + m["by_occlusion"]["occluded"]["num_queries"] == m["num_valid_queries"]
    for name in ("curves.png", "ranked_occluded_queries.png", "model_final.pth", "log.jsonl"):
        assert (out / name).is_file(), name
    with Image.open(out / "ranked_occluded_queries.png") as im:
        assert im.width >= 9 * 32  # a query column followed by the top-8 gallery images (32 px wide)
        assert im.height >= 6 * 64  # 3 NPO + 3 NTP queries, one row each (64 px high)
    # the dataset is generated once and reused
    assert (tmp_path / "data" / "SynthOcc" / "synthocc.json").is_file()


def test_demo_rejects_unknown_method(tmp_path, capsys):
    assert main(["demo", "--method", "pcb", "--output", str(tmp_path)]) == 2
    assert "pcb" in capsys.readouterr().err
    # an unknown second method fails before anything is trained
    assert main(["demo", "--compare", "pcb", "--output", str(tmp_path / "d"), "--data-root", str(tmp_path / "data")]) == 2
    assert "pcb" in capsys.readouterr().err
    assert not (tmp_path / "d" / "log.jsonl").exists() and not (tmp_path / "data").exists()


def test_demo_shows_the_baseline_and_a_method_side_by_side(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--output", str(out), "--data-root", str(tmp_path / "data"), "--epochs", "1",
               "--compare", "dpm", "--device", "cpu", *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    base = json.loads((out / "metrics.json").read_text())
    dpm = json.loads((tmp_path / "demo_dpm" / "metrics.json").read_text())
    assert base["method"] == "baseline" and dpm["method"] == "dpm"
    table = printed[printed.index("side by side (mAP / R1, %):"):].splitlines()
    assert table[1].split() == ["method", "occluded", "npo", "ntp", "holistic", "all"]
    for line, m in zip(table[3:5], (base, dpm)):
        cells = line.split()
        assert cells[0] == m["method"]
        occ = m["by_occlusion"]["occluded"]
        assert cells[1:4] == [f"{100 * occ['mAP']:.1f}", "/", f"{100 * occ['rank1']:.1f}"]
        assert cells[-3:] == [f"{100 * m['mAP']:.1f}", "/", f"{100 * m['rank1']:.1f}"]
