"""Export: ONNX graph vs PyTorch on the same batch (onnxruntime), safetensors + JSON sidecar
round trip, and the errors for files that are not occreid exports."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from occreid.utils.io import OccReIDError

from test_inference import make_tiny_checkpoint, random_images

# onnx/onnxruntime are optional (the test extra installs them): only the ONNX tests need them
needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnx/onnxruntime are not installed",
)


@needs_onnx
@pytest.mark.parametrize("method,sie", [("baseline", False), ("dpm", False), ("fed", False), ("baseline", True)])
def test_onnx_matches_pytorch_on_the_same_batch(tmp_path, method, sie):
    from occreid import FeatureExtractor
    from occreid.export import check_onnx, export_onnx, onnx_output_names

    ex = FeatureExtractor(make_tiny_checkpoint(tmp_path / "m.pth", method, sie=sie), device="cpu")
    path = export_onnx(ex, tmp_path / "m.onnx", batch_size=2)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == (["images", "camids"] if sie else ["images"])
    expected = {"baseline": ["feat"], "dpm": ["feat", "mask"], "fed": ["feat", "part_scores"]}[method]
    assert onnx_output_names(ex) == expected
    assert [o.name for o in sess.get_outputs()] == expected

    # a batch of 5 real-looking images (the graph was traced with 2: dynamic batch axis)
    h, w = ex.img_size
    from occreid.data import build_test_transform
    from PIL import Image

    raw_tf = build_test_transform((h, w), mean=None, std=None)  # resize + [0, 1], no normalisation
    arrays = random_images(5, seed=3)
    raw = torch.stack([raw_tf(Image.fromarray(a)) for a in arrays])
    feed = {"images": raw.numpy()}
    cams = [0, 1, 2, 0, 1]
    if sie:
        feed["camids"] = np.asarray(cams, dtype=np.int64)
    got = dict(zip(expected, sess.run(None, feed)))
    ref = ex.extract(arrays, camids=cams if sie else None)  # PyTorch, preprocessing included
    diffs = {k: float(np.abs(got[k] - ref[k].numpy()).max()) for k in ref}
    print(f"ONNX vs PyTorch ({method}{' +SIE' if sie else ''}, batch 5): max abs difference {diffs}")
    assert set(got) == set(ref)
    assert got["feat"].shape == (5, ex.feature_dim)
    for k in ref:
        assert diffs[k] < 1e-5, (k, diffs[k])
    assert np.allclose(np.linalg.norm(got["feat"], axis=1), 1.0, atol=1e-5)
    # the helper used by `occreid export --check` reports the same kind of figure
    assert max(check_onnx(path, ex, batch_size=3).values()) < 1e-5

    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["input"]["normalised_in_graph"] and meta["input"]["size"] == [h, w]
    assert meta["input"]["camids"] is sie and meta["fingerprint"] == ex.fingerprint
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["occreid"])["feature_dim"] == ex.feature_dim


def test_safetensors_roundtrip_rebuilds_the_extractor(tmp_path):
    from occreid import FeatureExtractor
    from occreid.export import export_safetensors, load_export

    ck = make_tiny_checkpoint(tmp_path / "dpm.pth", "dpm")
    ex = FeatureExtractor(ck, device="cpu")
    out = export_safetensors(ck, tmp_path / "out" / "reid.safetensors")
    side = json.loads((tmp_path / "out" / "reid.json").read_text())
    assert side["architecture"]["method"] == "dpm" and side["architecture"]["backbone"] == "vit_nano"
    assert side["input"]["size"] == [32, 16] and side["input"]["pixel_mean"] == [0.5, 0.5, 0.5]
    assert side["feature_dim"] == 32 and side["fingerprint"] == ex.fingerprint
    assert side["retrieval"]["distance"] == "dpm_masked_cosine"
    arrays = random_images(4, seed=5)
    a = ex.extract(arrays)
    back = load_export(out, device="cpu")
    b = back.extract(arrays)
    assert back.fingerprint == ex.fingerprint and back.method == "dpm"
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the .safetensors file alone is enough (sidecar embedded in its header)
    (tmp_path / "out" / "reid.json").unlink()
    alone = FeatureExtractor(out, device="cpu")
    assert alone.fingerprint == ex.fingerprint and torch.equal(alone(arrays), a["feat"])


def test_export_errors(tmp_path):
    from safetensors.torch import save_file

    from occreid import FeatureExtractor
    from occreid.export import export_safetensors

    foreign = tmp_path / "vit.safetensors"
    save_file({"pos_embed": torch.zeros(1, 3, 4)}, str(foreign))
    with pytest.raises(OccReIDError, match="not an occreid export"):
        FeatureExtractor(foreign, device="cpu")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(OccReIDError, match="cannot read .* as safetensors"):
        FeatureExtractor(broken, device="cpu")
    with pytest.raises(OccReIDError, match="weights file not found"):
        FeatureExtractor(tmp_path / "none.safetensors", device="cpu")
    # a sidecar from another export next to these weights
    a = export_safetensors(make_tiny_checkpoint(tmp_path / "a.pth"), tmp_path / "a.safetensors")
    export_safetensors(make_tiny_checkpoint(tmp_path / "b.pth", seed=1), tmp_path / "b.safetensors")
    (tmp_path / "a.json").write_text((tmp_path / "b.json").read_text())
    with pytest.raises(OccReIDError, match="different exports"):
        FeatureExtractor(a, device="cpu")
    with pytest.raises(OccReIDError, match="must end in .safetensors"):
        export_safetensors(make_tiny_checkpoint(tmp_path / "c.pth"), tmp_path / "c.bin")


@needs_onnx
def test_export_command(tmp_path, capsys):
    from occreid.cli import main

    ck = str(make_tiny_checkpoint(tmp_path / "m.pth", "fed"))
    assert main(["export", "--weights", ck, "--out", str(tmp_path / "m.onnx"), "--device", "cpu", "--check"]) == 0
    out = capsys.readouterr().out
    assert "check (onnxruntime vs PyTorch" in out and "max |part_scores difference|" in out
    assert main(["export", "--weights", ck, "--out", str(tmp_path / "m.safetensors"), "--check"]) == 0
    assert "max |feat difference| 0.00e+00" in capsys.readouterr().out
    assert main(["export", "--weights", ck, "--out", str(tmp_path / "m.bin")]) == 2
    assert "*.onnx or *.safetensors" in capsys.readouterr().err
