"""FeatureExtractor: inputs (paths, PIL, RGB/BGR arrays), test-time preprocessing, L2-normalised
features, DPM masks / FED part scores, fingerprints and the errors bad input gets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from occreid.utils.io import OccReIDError


def make_tiny_checkpoint(path, method: str = "baseline", *, sie: bool = False, seed: int = 0, size=(32, 16)) -> Path:
    """A vit_nano checkpoint (D = 32, depth 2) written with save_checkpoint, no training.

    DPM's zero-initialised HMG FC would give constant 0.5 masks; its weight is randomised so the
    masks differ between channels and images.
    """
    from occreid.config import load_config
    from occreid.engine.build import build_model, model_meta
    from occreid.engine.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    ov = [f"model.name={method}", "model.backbone=vit_nano", "model.stride=8", "model.drop_path=0.0",
          f"data.size_train=[{size[0]},{size[1]}]", f"data.size_test=[{size[0]},{size[1]}]",
          "data.name=market1501", "data.num_workers=0", "test.ims_per_batch=16", "device=cpu"]
    if sie:
        ov.append("model.sie_camera=true")
    cfg = load_config(None, ov)
    model = build_model(cfg, 5, 3, with_pretrained=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("hmg.fc.weight"):
                p.normal_(0, 0.5)
    meta = model_meta(cfg, 5, 3, model.feature_dim)
    return save_checkpoint(path, model, epoch=1, config=cfg, model_meta=meta, include_rng=False)


def random_images(n: int, seed: int = 0, h: int = 40, w: int = 20):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _reference(ckpt_path, arrays):
    """Plain reference: the checkpoint's model on the test transform, feature L2-normalised."""
    from occreid.data import build_test_transform
    from occreid.engine.build import model_from_checkpoint
    from occreid.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    meta = ckpt["model_meta"]
    model = model_from_checkpoint(ckpt)
    tf = build_test_transform(tuple(meta["img_size"]), mean=meta["pixel_mean"], std=meta["pixel_std"])
    x = torch.stack([tf(Image.fromarray(a)) for a in arrays])
    with torch.no_grad():
        out = model(x)
    return model, x, out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {m: make_tiny_checkpoint(d / f"{m}.pth", m) for m in ("baseline", "dpm", "fed")}


def test_paths_pil_rgb_and_bgr_arrays_agree_with_reference(ckpts, tmp_path):
    from occreid import FeatureExtractor

    arrays = random_images(5)
    paths = []
    for i, a in enumerate(arrays):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    ex = FeatureExtractor(ckpts["baseline"], device="cpu", batch_size=2)
    f_paths = ex(paths)
    f_pil = ex([Image.fromarray(a) for a in arrays])
    f_rgb = ex(arrays)
    f_bgr = ex([a[:, :, ::-1].copy() for a in arrays], color="BGR")
    f_stack = ex(np.stack(arrays))
    _, _, ref = _reference(ckpts["baseline"], arrays)
    ref = F.normalize(ref["feat"], dim=1)
    assert f_paths.shape == (5, ex.feature_dim) == (5, 32)
    assert torch.allclose(f_paths.norm(dim=1), torch.ones(5), atol=1e-6)
    for f in (f_paths, f_pil, f_rgb, f_bgr, f_stack):
        assert torch.allclose(f, ref, atol=1e-6)
    # the channel order matters: BGR data read as RGB gives other features
    assert not torch.allclose(ex([a[:, :, ::-1].copy() for a in arrays]), ref, atol=1e-3)
    # batching does not change the result
    assert torch.allclose(ex(arrays, batch_size=1), f_rgb, atol=1e-6)
    single = ex(arrays[0])
    assert single.shape == (1, 32) and torch.allclose(single[0], ref[0], atol=1e-6)


def test_dpm_masks_and_fed_scores(ckpts):
    from occreid import FeatureExtractor

    arrays = random_images(3, seed=1)
    ex = FeatureExtractor(ckpts["dpm"], device="cpu")
    out = ex.extract(arrays)
    model, x, ref = _reference(ckpts["dpm"], arrays)
    assert set(out) == {"feat", "mask"}
    assert torch.allclose(out["feat"], F.normalize(ref["feat"], dim=1), atol=1e-6)
    assert torch.allclose(out["mask"], ref["mask"], atol=1e-6)
    assert out["mask"].shape == (3, 32) and float(out["mask"].std()) > 1e-3  # not the constant 0.5
    assert ex.retrieval == {"distance": "dpm_masked_cosine", "mask_norm": "mask_then_normalize", "mask_query": False}

    ex = FeatureExtractor(ckpts["fed"], device="cpu")
    out = ex.extract(arrays)
    model, x, ref = _reference(ckpts["fed"], arrays)
    assert set(out) == {"feat", "part_scores"}
    assert out["feat"].shape == (3, 4 * 32) and out["part_scores"].shape == (3, 4)
    assert torch.allclose(out["feat"], F.normalize(ref["feat"], dim=1), atol=1e-6)
    assert torch.allclose(out["part_scores"], model.occlusion_scores(x), atol=1e-6)
    assert set(ref) == {"feat", "part_scores", "global"}  # the model's eval mapping; "global" is not exported
    assert ex.retrieval == {"distance": "cosine"}


def test_sie_model_needs_camera_ids(tmp_path):
    from occreid import FeatureExtractor

    ex = FeatureExtractor(make_tiny_checkpoint(tmp_path / "sie.pth", sie=True), device="cpu")
    arrays = random_images(2)
    assert ex.uses_cameras
    with pytest.raises(OccReIDError, match="camera ids are required"):
        ex(arrays)
    a = ex(arrays, camids=[0, 2])
    b = ex(arrays, camids=[1, 1])
    assert a.shape == (2, 32) and not torch.allclose(a, b)
    with pytest.raises(OccReIDError, match="one camera id per image"):
        ex(arrays, camids=[0])
    with pytest.warns(DeprecationWarning, match="camids"):  # the former spelling still works
        assert torch.equal(ex(arrays, cam_ids=[0, 2]), a)


def test_bad_inputs_get_clear_errors(ckpts, tmp_path):
    from occreid import FeatureExtractor

    ex = FeatureExtractor(ckpts["baseline"], device="cpu")
    with pytest.raises(OccReIDError, match="image file not found: .*missing.jpg"):
        ex([str(tmp_path / "missing.jpg")])
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image")
    with pytest.raises(OccReIDError, match="not an image file.*notes.jpg"):
        ex(str(txt))
    with pytest.raises(OccReIDError, match="must be uint8"):
        ex([np.zeros((8, 4, 3), dtype=np.float32)])
    with pytest.raises(OccReIDError, match=r"shape \[H, W, 3\]"):
        ex([np.zeros((8, 4), dtype=np.uint8)])
    with pytest.raises(OccReIDError, match="torch.Tensor"):
        ex([torch.zeros(3, 8, 4)])
    with pytest.raises(OccReIDError, match="'RGB' or 'BGR'"):
        ex(random_images(1), color="HSV")
    assert ex([]).shape == (0, 32)


def test_checkpoint_errors(tmp_path):
    from occreid import FeatureExtractor

    with pytest.raises(OccReIDError, match="checkpoint not found"):
        FeatureExtractor(tmp_path / "nope.pth", device="cpu")
    official = tmp_path / "transreid.pth"
    torch.save({"base.cls_token": torch.zeros(1, 1, 8)}, official)
    with pytest.raises(OccReIDError, match="not an occreid checkpoint.*official TransReID"):
        FeatureExtractor(official, device="cpu")
    with pytest.raises(OccReIDError, match="missing: model"):
        FeatureExtractor({"config": {}, "model_meta": {}}, device="cpu")


def test_fingerprint_tracks_weights_and_description(ckpts, tmp_path):
    from occreid import FeatureExtractor
    from occreid.engine.checkpoint import load_checkpoint
    from occreid.inference import model_fingerprint

    ck = load_checkpoint(ckpts["baseline"])
    fp = FeatureExtractor(ck, device="cpu").fingerprint
    assert fp == model_fingerprint(ck["model_meta"], ck["model"]) and len(fp) == 16
    state = {k: v.clone() for k, v in ck["model"].items()}
    assert model_fingerprint(ck["model_meta"], state) == fp
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] += 1e-3
    assert model_fingerprint(ck["model_meta"], state) != fp
    assert model_fingerprint(dict(ck["model_meta"], neck_feat="after"), ck["model"]) != fp
    assert FeatureExtractor(ckpts["dpm"], device="cpu").fingerprint != fp


def test_import_occreid_is_light_and_lazy():
    code = (
        "import sys, occreid; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
        "from occreid import FeatureExtractor; assert 'torch' in sys.modules; "
        "assert FeatureExtractor.__module__ == 'occreid.inference'; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
