"""Pictures: FED stripe scores drawn on the image, DPM mask statistics, the HTML report and the
visualize command on a tiny dataset (its metrics must equal the evaluator's)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from occreid.viz.occlusion import draw_mask_statistics, draw_occlusion_scores, mask_statistics
from occreid.viz.report import write_report

from helpers import write_market
from test_inference import make_tiny_checkpoint


def test_occlusion_scores_tint_each_stripe(tmp_path):
    grey = Image.new("RGB", (16, 32), (100, 100, 100))
    scores = torch.tensor([[1.0, 0.0, 0.5, 1.0]])
    out = draw_occlusion_scores([grey], scores, tmp_path / "fed.png", labels=["q1"], thumb_size=(64, 32),
                                max_tint=0.6)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape[0] > 64 and img.shape[1] > 32
    x0, y0 = 8, 26  # first cell's image origin
    stripe_centre = [y0 + 8, y0 + 24, y0 + 40, y0 + 56]  # 4 stripes of 16 px
    red = np.array([220, 30, 30])
    for s, y in zip(scores[0].tolist(), stripe_centre):
        a = 0.6 * (1 - s)
        expect = np.round((1 - a) * 100 + a * red)
        assert np.abs(img[y, x0 + 10] - expect).max() <= 1, (s, img[y, x0 + 10], expect)
    with pytest.raises(ValueError, match=r"\[N, P\]"):
        draw_occlusion_scores([grey, grey], scores, tmp_path / "x.png")


def test_mask_statistics_match_numpy():
    rng = np.random.default_rng(0)
    m = rng.uniform(0, 1, (10, 6))
    groups = ["holistic"] * 4 + ["npo"] * 6
    st = mask_statistics(torch.tensor(m), groups)
    assert st["num_images"] == 10 and st["num_channels"] == 6
    assert st["mean"] == pytest.approx(m.mean()) and st["std"] == pytest.approx(m.std())
    assert st["frac_below_0.5"] == pytest.approx((m < 0.5).mean())
    assert st["channel_mean_spread"] == pytest.approx(m.mean(0).std())
    assert st["per_image_std"] == pytest.approx(m.std(1).mean())
    assert st["groups"]["npo"]["mean"] == pytest.approx(m[4:].mean())
    assert st["groups"]["holistic"]["num_images"] == 4


def test_mask_statistics_picture(tmp_path):
    m = torch.sigmoid(torch.randn(20, 48))
    out = draw_mask_statistics(m, tmp_path / "dpm.png", groups=["a"] * 10 + ["b"] * 10)
    img = Image.open(out)
    assert img.size == (1240, 420)
    arr = np.asarray(img.convert("L"))
    heat = arr[45:365, 865:1215]  # inside the heat map: stretched, so it spans dark to light
    assert heat.min() < 30 and heat.max() > 225
    with pytest.raises(ValueError, match="non-empty"):
        draw_mask_statistics(torch.zeros(0, 4), tmp_path / "e.png")


def test_html_report_embeds_everything(tmp_path):
    png = tmp_path / "pic.png"
    Image.new("RGB", (20, 10), (255, 0, 0)).save(png)
    metrics = {"mAP": 0.5, "rank1": 0.75, "rank5": 0.9, "rank10": 1.0, "mINP": 0.25, "num_valid_queries": 8,
               "num_skipped_queries": 1, "cmc": [0.75, 0.8, 0.9],
               "by_occlusion": {"npo": {"num_queries": 3, "mAP": 0.4, "rank1": 0.5, "rank5": 1.0, "rank10": 1.0,
                                        "mINP": 0.2}}}
    out = write_report(tmp_path / "r.html", title="a <b> test", info={"method": "dpm"}, metrics=metrics,
                       sections=[("Ranked lists", [(png, "top-8")]), ("Missing", [(tmp_path / "no.png", "x")])],
                       extra={"mask": {"mean": 0.5}})
    text = out.read_text()
    assert "a &lt;b&gt; test" in text and "<b> test" not in text
    assert "<td>50.0</td><td>75.0</td><td>90.0</td><td>100.0</td><td>25.0</td>" in text
    assert "<td>npo</td><td>3</td><td>40.0</td>" in text and "1 queries skipped" in text
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) == 2  # the CMC curve and the picture; the missing file is left out
    assert base64.b64decode(imgs[1]) == png.read_bytes()
    assert "Missing" not in text and "&quot;mean&quot;: 0.5" in text


@pytest.mark.parametrize("method", ["dpm", "fed"])
def test_visualize_command_on_a_dataset(tmp_path, capsys, method):
    from occreid.cli import main
    from occreid.config import load_config
    from occreid.engine.build import build_datasets, model_from_checkpoint
    from occreid.engine.checkpoint import load_checkpoint
    from occreid.engine.trainer import evaluate_model

    write_market(tmp_path / "data", n_train=4, n_test=5)
    ck = make_tiny_checkpoint(tmp_path / "model.pth", method)
    out = tmp_path / "viz"
    assert main(["visualize", "--weights", str(ck), "--data-root", str(tmp_path / "data"), "--out", str(out),
                 "--device", "cpu", "--num-queries", "4", "--topk", "3"]) == 0
    got = json.loads((out / "metrics.json").read_text())
    # the same numbers as the evaluator used by `occreid test`
    ckpt = load_checkpoint(ck)
    cfg = load_config(None, [f"data.root={tmp_path / 'data'}"], base=ckpt["config"])
    ref = evaluate_model(model_from_checkpoint(ckpt), cfg, build_datasets(cfg)[1], torch.device("cpu"), None)
    for key in ("mAP", "rank1", "mINP", "num_valid_queries"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6)
    ranked = Image.open(out / "ranked_lists.png")
    assert ranked.size[1] >= 4 * 128  # 4 query rows, thumbnails >= 128 px high
    extra = "dpm_mask_statistics.png" if method == "dpm" else "fed_occlusion_scores.png"
    assert (out / extra).is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 3 and "Metrics" in html
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out

    # image mode, and a bad image
    img = str(tmp_path / "data" / "market1501" / "query" / "0100_c1s1_000000_00.jpg")
    assert main(["visualize", "--weights", str(ck), "--out", str(out / "imgs"), "--images", img, img]) == 0
    assert (out / "imgs" / extra).is_file()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["visualize", "--weights", str(ck), "--out", str(out / "x"), "--images", str(bad)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
