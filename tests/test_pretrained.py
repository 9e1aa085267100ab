"""Pretrained checkpoint loading: key adaptation, pos-embed resize, formats, strict errors."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from occreid.models import (
    ViTBackbone,
    backbone_state_from_reid_checkpoint,
    build_backbone,
    load_pretrained,
    resize_pos_embed,
)
from occreid.methods import build_model
from occreid.utils import OccReIDError

D = 16  # small width: every test here is fast


def jx_state(dim=D, depth=2, patch=16, grid=(14, 14), mlp=4, qkv_bias=True, classes=10, seed=0):
    """A checkpoint with the jx (timm 0.3.2) key names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid[0] * grid[1], dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": r(dim), p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim),
            p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
            p + "norm2.weight": r(dim), p + "norm2.bias": r(dim),
            p + "mlp.fc1.weight": r(mlp * dim, dim), p + "mlp.fc1.bias": r(mlp * dim),
            p + "mlp.fc2.weight": r(dim, mlp * dim), p + "mlp.fc2.bias": r(dim),
        })
        if qkv_bias:
            sd[p + "attn.qkv.bias"] = r(3 * dim)
    sd.update({"norm.weight": r(dim), "norm.bias": r(dim), "head.weight": r(classes, dim), "head.bias": r(classes)})
    return sd


def small_vit(stride=16, img_size=(256, 128), num_cameras=0, **kw) -> ViTBackbone:
    return ViTBackbone(img_size=img_size, patch_size=16, stride=stride, embed_dim=D, depth=2, num_heads=2,
                       num_cameras=num_cameras, drop_path=0.0, **kw)


def bilinear_reference(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize [h, w, C] -> [out_h, out_w, C], align_corners=False (half-pixel
    centres, source coordinate clamped at 0), written from the formula."""
    h, w, _ = grid.shape

    def taps(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(int)
        i0 = np.minimum(i0, n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, ly = taps(h, out_h)
    x0, x1, lx = taps(w, out_w)
    out = np.zeros((out_h, out_w, grid.shape[2]))
    for a in range(out_h):
        for b in range(out_w):
            top = (1 - lx[b]) * grid[y0[a], x0[b]] + lx[b] * grid[y0[a], x1[b]]
            bot = (1 - lx[b]) * grid[y1[a], x0[b]] + lx[b] * grid[y1[a], x1[b]]
            out[a, b] = (1 - ly[a]) * top + ly[a] * bot
    return out


def expected_pos_embed(pos: torch.Tensor, src_grid, dst_grid) -> torch.Tensor:
    grid = pos[0, 1:].double().numpy().reshape(src_grid[0], src_grid[1], -1)  # row-major tokens
    res = bilinear_reference(grid, *dst_grid).reshape(dst_grid[0] * dst_grid[1], -1)
    return torch.cat([pos[0, :1].double(), torch.from_numpy(res)]).unsqueeze(0).float()


@pytest.mark.parametrize("stride, grid", [(16, (16, 8)), (12, (21, 10)), (11, (22, 11))])
def test_jx_checkpoint_loads_at_strides(stride, grid):
    sd = jx_state()
    m = small_vit(stride=stride, num_cameras=6)
    sie_before = m.sie_embed.detach().clone()
    report = load_pretrained(m, sd)
    assert m.grid_size == grid
    assert report.ok and report.pos_embed_resized == ((14, 14), grid)
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    assert report.expected_missing == ["sie_embed"]
    assert not report.dropped_dist_token and not report.patch_weight_reshaped
    state = m.state_dict()
    for k, v in sd.items():
        if k.startswith("head") or k == "pos_embed":
            continue
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)  # incl. the 16x16 kernel as is
    assert m.patch_embed.proj.stride == (stride, stride)
    torch.testing.assert_close(state["sie_embed"], sie_before, rtol=0, atol=0)
    expect = expected_pos_embed(sd["pos_embed"], (14, 14), grid)
    assert state["pos_embed"].shape == (1, 1 + grid[0] * grid[1], D)
    torch.testing.assert_close(state["pos_embed"], expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state["pos_embed"][:, 0], sd["pos_embed"][:, 0], rtol=0, atol=0)
    assert "resized pos_embed grid 14x14" in report.summary()


def test_same_grid_is_copied_without_resize():
    sd = jx_state(grid=(16, 8))
    m = small_vit()
    report = load_pretrained(m, sd, src_grid=(16, 8))
    assert report.pos_embed_resized is None
    torch.testing.assert_close(m.pos_embed.detach(), sd["pos_embed"], rtol=0, atol=0)


def test_non_square_source_grid_needs_src_grid():
    sd = jx_state(grid=(12, 6))
    with pytest.raises(OccReIDError, match=r"72 patch positions.*src_grid"):
        load_pretrained(small_vit(), sd)
    m = small_vit(stride=12)
    report = load_pretrained(m, sd, src_grid=(12, 6))
    assert report.pos_embed_resized == ((12, 6), (21, 10))
    expect = expected_pos_embed(sd["pos_embed"], (12, 6), (21, 10))
    torch.testing.assert_close(m.pos_embed.detach(), expect, rtol=1e-5, atol=1e-5)


def test_resize_pos_embed_function():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = resize_pos_embed(pos, (22, 11))
    torch.testing.assert_close(out, expected_pos_embed(pos, (14, 14), (22, 11)), rtol=1e-5, atol=1e-5)
    half = resize_pos_embed(pos.half(), (5, 3))
    assert half.dtype == torch.float16 and half.shape == (1, 16, 8)
    with pytest.raises(OccReIDError, match="does not match"):
        resize_pos_embed(pos, (4, 4), old_grid=(10, 10))


def test_distilled_deit_format_drops_the_distillation_position():
    sd = jx_state()
    pos = sd.pop("pos_embed")
    dist_pos = torch.full((1, 1, D), 100.0)  # would show up everywhere if it were kept
    ckpt = {"model": dict(sd, pos_embed=torch.cat([pos[:, :1], dist_pos, pos[:, 1:]], 1),
                          dist_token=torch.randn(1, 1, D), **{"head_dist.weight": torch.randn(10, D),
                                                            "head_dist.bias": torch.randn(10)})}
    m = small_vit(stride=12)
    report = load_pretrained(m, ckpt)
    assert report.ok and report.dropped_dist_token
    assert set(report.ignored) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "dist_token"}
    expect = expected_pos_embed(pos, (14, 14), (21, 10))
    torch.testing.assert_close(m.pos_embed.detach(), expect, rtol=1e-5, atol=1e-5)
    assert m.pos_embed.abs().max() < 50


def test_timm_training_checkpoint_file_with_args(tmp_path):
    sd = jx_state(seed=3)
    path = tmp_path / "timm_ckpt.pth.tar"
    torch.save({"epoch": 7, "arch": "vit_tiny", "state_dict": sd, "args": argparse.Namespace(lr=0.1),
                "version": 2}, path)
    m = small_vit()
    report = load_pretrained(m, path)
    assert report.ok and report.source == str(path)
    torch.testing.assert_close(m.blocks[1].mlp.fc2.weight.detach(), sd["blocks.1.mlp.fc2.weight"])


def test_ddp_prefix_and_2d_patch_weight(tmp_path):
    sd = jx_state(seed=4)
    flat = dict(sd)
    flat["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(D, -1)  # old linear patchifier
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in flat.items()}}, path)
    m = small_vit()
    report = load_pretrained(m, str(path))
    assert report.ok and report.patch_weight_reshaped
    torch.testing.assert_close(m.patch_embed.proj.weight.detach(), sd["patch_embed.proj.weight"], rtol=0, atol=0)


def test_safetensors_file(tmp_path):
    import safetensors.torch as safetensors
    sd = jx_state(seed=5)
    path = tmp_path / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    m = small_vit()
    assert load_pretrained(m, path).ok
    torch.testing.assert_close(m.norm.bias.detach(), sd["norm.bias"], rtol=0, atol=0)


_EXECUTED = []


def _mark_executed():
    _EXECUTED.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_mark_executed, ())


def test_checkpoint_files_are_read_with_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": jx_state(), "payload": _Evil()}, path)
    with pytest.raises(OccReIDError, match=r"weights_only=True"):
        load_pretrained(small_vit(), path)
    assert _EXECUTED == []  # the pickled callable never ran
    with pytest.raises(OccReIDError, match="not found"):
        load_pretrained(small_vit(), tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(OccReIDError, match="cannot read checkpoint"):
        load_pretrained(small_vit(), tmp_path / "garbage.pth")


def test_strict_errors_name_missing_unexpected_and_mismatched_keys():
    sd = jx_state()
    del sd["blocks.0.norm1.weight"]
    sd["blocks.5.attn.qkv.weight"] = torch.randn(3 * D, D)
    sd["blocks.1.mlp.fc1.weight"] = torch.randn(3 * D, D)
    with pytest.raises(OccReIDError) as err:
        load_pretrained(small_vit(), sd)
    msg = str(err.value)
    assert "missing in the checkpoint (1): blocks.0.norm1.weight" in msg
    assert "unexpected in the checkpoint (1): blocks.5.attn.qkv.weight" in msg
    assert "blocks.1.mlp.fc1.weight (checkpoint [48, 16] vs model [64, 16])" in msg
    assert "head.weight" not in msg and "sie_embed" not in msg
    # non-strict: loads what matches, reports the rest
    m = small_vit()
    report = load_pretrained(m, sd, strict=False)
    assert not report.ok
    assert report.missing == ["blocks.0.norm1.weight"] and report.unexpected == ["blocks.5.attn.qkv.weight"]
    assert report.mismatched == [("blocks.1.mlp.fc1.weight", (3 * D, D), (4 * D, D))]
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight.detach(), sd["blocks.0.attn.qkv.weight"])


def test_qkv_bias_mismatch_is_reported():
    sd = jx_state(qkv_bias=False)  # e.g. a vit_small-style checkpoint into a qkv-bias model
    with pytest.raises(OccReIDError, match=r"missing in the checkpoint \(2\): blocks.0.attn.qkv.bias, blocks.1"):
        load_pretrained(small_vit(), sd)
    m = small_vit(qkv_bias=False)
    assert load_pretrained(m, sd).ok


def test_width_mismatch_hint():
    sd = jx_state(dim=24)
    with pytest.raises(OccReIDError, match=r"24-d but the backbone is 16-d"):
        load_pretrained(small_vit(), sd)


def test_trained_reid_checkpoint_is_recognised(tmp_path):
    model = build_model("baseline", num_classes=4, backbone="vit_nano", img_size=(32, 16), stride=8,
                        sie_camera=True, num_cameras=3)
    trained = {"module." + k: v for k, v in model.state_dict().items()}
    trained["module.base.fc.weight"] = torch.randn(1000, 32)  # TransReID keeps the unused fc
    trained["module.base.fc.bias"] = torch.randn(1000)
    fresh = build_backbone("vit_nano", img_size=(32, 16), stride=8, num_cameras=3)
    with pytest.raises(OccReIDError, match=r"trained occreid/TransReID ReID checkpoint.*--weights"):
        load_pretrained(fresh, trained)
    base = backbone_state_from_reid_checkpoint(trained)
    assert "fc.weight" not in base and "sie_embed" in base
    report = load_pretrained(fresh, base)
    assert report.ok and report.expected_missing == []
    x, c = torch.randn(2, 3, 32, 16), torch.tensor([0, 2])
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, c), model.backbone(x, c), rtol=0, atol=0)
    with pytest.raises(OccReIDError, match="not a trained"):
        backbone_state_from_reid_checkpoint(jx_state())


def test_build_backbone_with_pretrained_path(tmp_path):
    sd = jx_state(dim=32, patch=8, mlp=4)
    path = tmp_path / "nano.pth"
    torch.save(sd, path)
    m = build_backbone("vit_nano", img_size=(64, 32), stride=6, pretrained=str(path))
    torch.testing.assert_close(m.blocks[1].attn.qkv.bias.detach(), sd["blocks.1.attn.qkv.bias"])
    expect = expected_pos_embed(sd["pos_embed"], (14, 14), (10, 5))
    torch.testing.assert_close(m.pos_embed.detach(), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(OccReIDError, match="does not match the backbone"):
        build_backbone("vit_micro_patch8", img_size=(64, 32), stride=8, pretrained=str(path))


def test_timm_source_errors(monkeypatch):
    with pytest.raises(OccReIDError, match="timm has no model named"):
        load_pretrained(small_vit(), "timm:not_a_model_xyz")
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(OccReIDError, match=r"internet access.*local file path"):
        load_pretrained(small_vit(), "timm:vit_base_patch16_224.orig_in21k_ft_in1k")


def test_timm_source_uses_timm_state_dict(monkeypatch):
    """'timm:<name>' loads the weights of timm's model (create_model stubbed: no network)."""
    import timm

    sd = jx_state(seed=9)
    calls = []

    class Fake(torch.nn.Module):
        def state_dict(self, *a, **k):
            return dict(sd)

    def fake_create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return Fake()

    monkeypatch.setattr(timm, "create_model", fake_create)
    m = small_vit()
    report = load_pretrained(m, "timm:vit_base_patch16_224.augreg_in21k")
    assert report.ok and calls == [("vit_base_patch16_224.augreg_in21k", True, {"num_classes": 0})]
    torch.testing.assert_close(m.cls_token.detach(), sd["cls_token"], rtol=0, atol=0)


def spec_jx_vit_base_keys():
    """The 152-tensor list of jx_vit_base_p16_224-80ecf9dd.pth (spec §2.2)."""
    keys = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768),
            "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,)}
    for i in range(12):
        p = f"blocks.{i}."
        keys.update({p + "norm1.weight": (768,), p + "norm1.bias": (768,),
                     p + "attn.qkv.weight": (2304, 768), p + "attn.qkv.bias": (2304,),
                     p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,),
                     p + "norm2.weight": (768,), p + "norm2.bias": (768,),
                     p + "mlp.fc1.weight": (3072, 768), p + "mlp.fc1.bias": (3072,),
                     p + "mlp.fc2.weight": (768, 3072), p + "mlp.fc2.bias": (768,)})
    keys.update({"norm.weight": (768,), "norm.bias": (768,), "head.weight": (1000, 768), "head.bias": (1000,)})
    return keys


def test_vit_base_key_set_equals_the_jx_checkpoint():
    spec = spec_jx_vit_base_keys()
    assert len(spec) == 152 and sum(math.prod(s) for s in spec.values()) == 86_567_656
    with torch.device("meta"):  # shapes only, nothing allocated
        m = build_backbone("vit_base_patch16", img_size=(224, 224), stride=16)
        ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert ours == {k: s for k, s in spec.items() if not k.startswith("head.")}
        # the full checkpoint adapts strictly into the stride-11 SIE model used by DPM
        m11 = build_backbone("vit_base_patch16", img_size=(256, 128), stride=11, num_cameras=8)
        ckpt = {k: torch.empty(s) for k, s in spec.items()}
        report = load_pretrained(m11, ckpt)
    assert report.ok and report.pos_embed_resized == ((14, 14), (22, 11))
    assert report.expected_missing == ["sie_embed"] and len(report.loaded) == 150
