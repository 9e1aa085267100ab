"""Official TransReID / FED / DPM checkpoints as input (occreid.engine.official).

End to end, per trajectory case (tests/data/trajectory, see test_trajectory.py): the
official-format state dict of the README's recipe, saved as the official code saves it, gives
through ``FeatureExtractor(path, config=...)``, ``occreid test --weights PATH --config ...``
and an ONNX export the eval features the official model computed (``out.eval_init.*``).
The error paths run on meta tensors (names and shapes only).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import occreid.engine.trainer as trainer_module
from occreid import FeatureExtractor
from occreid.cli import main
from occreid.data import build_dataset
from occreid.engine.official import (
    detect_official_method,
    load_official_state_dict,
    official_checkpoint,
    official_state_dict_of,
)
from occreid.methods import build_model, get_method
from occreid.utils import OccReIDError

from official_recipe import OFFICIAL_CONFIGS, case_files, load_case, manifest, occreid_config, recipe_state_dict

CASES = case_files()
TOL = 1e-4  # the README's tolerance for eval_init


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).norm() / b.norm())


@functools.lru_cache(maxsize=None)
def _case(path: str):
    case = load_case(Path(path))
    return case, manifest(case)


def _write_official(folder: Path, man: Dict[str, Any], case: Dict[str, Any]) -> Path:
    """The recipe weights as the official code saves them: ``transformer_1.pth``; FED under
    ``nn.DataParallel`` (``module.`` prefix) with its memory in ``transformermemory_1.pth``."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = recipe_state_dict(man)
    if man["method"] == "fed":
        sd = {"module." + k: v for k, v in sd.items()}
        torch.save(case["out.memory_init"].clone(), folder / "transformermemory_1.pth")
    path = folder / "transformer_1.pth"
    torch.save(sd, path)
    return path


def _official_feature(man, case, key: str = "out.eval_init.o") -> torch.Tensor:
    return case[key if key in case else key + ".0"]


def _uint8_images(case) -> list:
    """The stored test batch as the uint8 images it was made from (exact: the test transform of
    a 128x64 image is ToTensor + Normalize(0.5, 0.5))."""
    x = ((case["in.test.0"] * 0.5 + 0.5) * 255).round().to(torch.uint8)
    return [img.permute(1, 2, 0).numpy() for img in x]


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """One official checkpoint per case, written once."""
    root = tmp_path_factory.mktemp("official")
    out = {}
    for p in CASES:
        case, man = _case(str(p))
        out[p.stem] = _write_official(root / p.stem, man, case)
    return out


@functools.lru_cache(maxsize=None)
def _extractor(path: str, stem: str) -> FeatureExtractor:
    case, man = _case(str(next(p for p in CASES if p.stem == stem)))
    return FeatureExtractor(path, device="cpu", config=occreid_config(man), batch_size=8)


@pytest.mark.parametrize("case_path", CASES, ids=[p.stem for p in CASES])
def test_feature_extractor_reads_official_checkpoints(case_path, official_files):
    case, man = _case(str(case_path))
    ex = _extractor(str(official_files[case_path.stem]), case_path.stem)
    assert ex.method == get_method(occreid_config(man)["model"]["name"]).name
    cams = case["in.test.3"].tolist() if ex.uses_cameras else None
    out = ex.extract(_uint8_images(case), camids=cams)
    ref = _official_feature(man, case)
    err = rel_err(out["feat"], F.normalize(ref, dim=1))
    assert err < TOL, f"{case_path.stem}: FeatureExtractor feature vs official eval feature: relative error {err:.3g}"
    if "mask" in out:  # DPM: the query mask is the official eval output 1
        err = rel_err(out["mask"], case["out.eval_init.o.1"])
        assert err < TOL, f"{case_path.stem}: DPM mask relative error {err:.3g}"
    if man["method"] == "fed":  # the memory file beside the checkpoint was loaded: the FDM feature
        assert bool(ex.model.memory.initialized)
        with torch.no_grad():
            fdm = ex.model.forward_features(case["in.test.0"], None, with_fdm=True)["fdm_feat"]
        err = rel_err(fdm, case["out.eval_init.o.1"])
        assert err < TOL, f"{case_path.stem}: FED FDM feature with the official memory: relative error {err:.3g}"


def _write_test_set(root: Path, case) -> None:
    """An Occluded-Duke folder: query = the 8 stored test images (with their cameras); gallery =
    the same images under the next camera, so that every query has a true match."""
    base = root / "Occluded_Duke"
    pids, cams = case["in.test.pid"].tolist(), case["in.test.3"].tolist()
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (base / split).mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(_uint8_images(case)):
        pid, cam = pids[i] + 1, cams[i]
        Image.fromarray(img).save(base / "query" / f"{pid:04d}_c{cam + 1}_f{i:07d}.png")
        Image.fromarray(img).save(base / "bounding_box_test" / f"{pid:04d}_c{(cam + 1) % 8 + 1}_f{i:07d}.png")
        Image.fromarray(img).save(base / "bounding_box_train" / f"{pid:04d}_c{cam + 1}_f{i:07d}.png")


@pytest.mark.parametrize("case_path", CASES, ids=[p.stem for p in CASES])
def test_occreid_test_cli_evaluates_official_checkpoints(case_path, official_files, tmp_path, monkeypatch):
    case, man = _case(str(case_path))
    _write_test_set(tmp_path / "data", case)
    seen = {}
    real = trainer_module.evaluate_features

    def record(q, g, **kwargs):
        seen["query"] = {k: v.clone() for k, v in q.items()}
        return real(q, g, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_features", record)
    h, w = man["img_size"]
    cfg_name = OFFICIAL_CONFIGS[(man["method"], man["config"])]
    rc = main([
        "test", "--config", cfg_name, "--weights", str(official_files[case_path.stem]),
        "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--device", "cpu",
        f"data.size_train=[{h}, {w}]", f"data.size_test=[{h}, {w}]", "data.num_workers=0",
        "test.ims_per_batch=8", "solver.amp=fp32",
    ])
    assert rc == 0
    assert (tmp_path / "out" / "metrics.json").is_file()
    ds = build_dataset("occluded_duke", str(tmp_path / "data"))
    order = [int(Path(r.path).stem.rsplit("_f", 1)[1]) for r in ds.query]  # query records -> stored index
    ref = _official_feature(man, case)[order]
    err = rel_err(seen["query"]["feat"], ref)
    assert err < TOL, f"{case_path.stem}: occreid test query features vs official eval features: relative error {err:.3g}"


@pytest.mark.parametrize("case_path", CASES, ids=[p.stem for p in CASES])
def test_onnx_export_of_official_checkpoints(case_path, official_files, tmp_path):
    ort = pytest.importorskip("onnxruntime")  # the occreid[onnx] extra
    pytest.importorskip("onnx")
    from occreid.export import export_onnx

    case, man = _case(str(case_path))
    ex = _extractor(str(official_files[case_path.stem]), case_path.stem)
    path = export_onnx(ex, tmp_path / "reid.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"images": (case["in.test.0"] * 0.5 + 0.5).numpy()}  # the graph normalises itself
    if ex.uses_cameras:
        feed["camids"] = case["in.test.3"].numpy().astype(np.int64)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    err = rel_err(torch.from_numpy(got["feat"]), F.normalize(_official_feature(man, case), dim=1))
    assert err < TOL, f"{case_path.stem}: ONNX feature vs official eval feature: relative error {err:.3g}"
    if "mask" in got:
        err = rel_err(torch.from_numpy(got["mask"]), case["out.eval_init.o.1"])
        assert err < TOL, f"{case_path.stem}: ONNX mask relative error {err:.3g}"


# --------------------------------------------------------------------------------------------
# detection and error paths (meta tensors: names and shapes of the real ViT-B checkpoints)
# --------------------------------------------------------------------------------------------
def _meta_official(man) -> Dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=getattr(torch, dt), device="meta") for k, shape, dt in man["state_dict"]}


def _case_of(method: str):
    for p in CASES:
        case, man = _case(str(p))
        if man["method"] == method:
            return case, man
    pytest.skip(f"no {method} case in the trajectory folder")


@pytest.mark.parametrize("prefix", ["", "module."])
def test_detects_every_official_format(prefix):
    found = set()
    for p in CASES:
        _, man = _case(str(p))
        sd = {prefix + k: v for k, v in _meta_official(man).items()}
        want = get_method(occreid_config(man)["model"]["name"]).name
        assert detect_official_method(sd) == want
        assert official_state_dict_of({"state_dict": sd}) is not None  # wrapped, as some tools save it
        found.add(want)
    assert found, "no case"


def test_not_an_official_checkpoint():
    with pytest.raises(OccReIDError, match="not an official checkpoint of a known method"):
        detect_official_method({"base.cls_token": torch.zeros(1), "head.weight": torch.zeros(1)})
    assert official_state_dict_of({"format": "occreid-checkpoint"}) is None
    assert official_state_dict_of({"cls_token": torch.zeros(1)}) is None  # ImageNet backbone weights


def test_official_checkpoint_needs_a_config(tmp_path):
    _, man = _case_of("fed")
    sd = {"module." + k: torch.zeros(1) for k, _, _ in man["state_dict"]}
    torch.save(sd, tmp_path / "transformer_120.pth")
    with pytest.raises(OccReIDError, match=r"official fed checkpoint.*--config"):
        FeatureExtractor(tmp_path / "transformer_120.pth", device="cpu")
    rc = main(["export", "--weights", str(tmp_path / "transformer_120.pth"), "--out", str(tmp_path / "x.safetensors")])
    assert rc == 2


def test_wrong_method_config_is_named():
    _, fed = _case_of("fed")
    _, dpm = _case_of("dpm")
    with pytest.raises(OccReIDError, match=r"official fed checkpoint but the config builds model.name=dpm.*fed.yaml"):
        official_checkpoint(_meta_official(fed), occreid_config(dpm))


def test_missing_and_unexpected_entries_are_named():
    _, man = _case_of("dpm")
    cfg = occreid_config(man)
    sd = _meta_official(man)
    sd.pop("base.blocks.3.attn.proj.weight")
    sd["base.blocks.3.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(OccReIDError) as info:
        official_checkpoint(sd, cfg)
    msg = str(info.value)
    assert "backbone.blocks.3.attn.proj.weight" in msg and "are not in it" in msg
    assert "backbone.blocks.3.extra.weight" in msg and "no place in the model" in msg
    sd = _meta_official(man)
    with pytest.raises(OccReIDError, match=r"backbone.pos_embed \(1, 56, 768\) vs model \(1, 33, 768\)"):
        official_checkpoint(sd, occreid_config(man, ["model.stride=16"]))
    with pytest.raises(OccReIDError, match="sie_camera=true"):
        official_checkpoint(sd, occreid_config(man, ["model.sie_camera=false"]))


def test_fed_memory_file_is_checked(tmp_path):
    _, man = _case_of("fed")
    cfg = occreid_config(man)
    sd = _meta_official(man)
    ok = official_checkpoint(sd, cfg, memory=torch.ones(man["num_classes"], 3072))
    assert bool(ok["model"]["memory.initialized"]) and ok["model"]["memory.features"].shape == (man["num_classes"], 3072)
    none = official_checkpoint(sd, cfg)
    assert not bool(none["model"]["memory.initialized"])  # the retrieval feature does not need it
    with pytest.raises(OccReIDError, match=r"memory file holds \(5, 3072\).*\[16, 3072\]"):
        official_checkpoint(sd, cfg, memory=torch.ones(5, 3072))
    with pytest.raises(OccReIDError, match="memory file not found"):
        official_checkpoint(sd, cfg, memory=tmp_path / "transformermemory_120.pth")
    spec = get_method("fed")
    assert spec.official_companion_path(Path("logs/transformer_120.pth")) == Path("logs/transformermemory_120.pth")
    with pytest.raises(OccReIDError, match="no companion file"):
        official_checkpoint(_meta_official(_case_of("dpm")[1]), occreid_config(_case_of("dpm")[1]), memory=torch.ones(1))


def test_official_state_dict_into_a_built_model():
    _, man = _case_of("dpm")
    cfg = occreid_config(man)
    with torch.device("meta"):
        model = build_model("dpm", num_classes=man["num_classes"], num_cameras=man["camera_num"], sie_camera=True,
                            img_size=tuple(man["img_size"]), stride=cfg["model"]["stride"])
    sd = {"module." + k: v for k, v in _meta_official(man).items()}  # as saved under nn.DataParallel
    info = load_official_state_dict(model, sd)
    assert info.method == "dpm" and not info.companion
    assert info.official_entries == len(man["state_dict"]) and info.loaded_entries == len(model.state_dict())


def test_official_state_dict_into_the_wrong_model():
    _, man = _case_of("dpm")
    with torch.device("meta"):
        model = build_model("baseline", num_classes=man["num_classes"], img_size=tuple(man["img_size"]), stride=11)
    with pytest.raises(OccReIDError, match="official dpm checkpoint, but the model is a Baseline"):
        load_official_state_dict(model, _meta_official(man))
