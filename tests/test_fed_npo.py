"""FED's NPO augmentation (data side): patch bank, pasting geometry, the 7-channel sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from occreid.data.npo import (
    NPOTransform,
    OccluderBank,
    find_occluder_folder,
    paste_occluder,
    stripe_mask,
)
from occreid.utils import OccReIDError


def _patch(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture()
def bank_dir(tmp_path):
    d = tmp_path / "occluders"
    d.mkdir()
    _patch(40, 60, 0).save(d / "b_wide.jpg")
    _patch(90, 20, 1).save(d / "a_tall.png")
    (d / "notes.txt").write_text("not an image")
    (d / "sub").mkdir()
    return d


def test_bank_lists_images_sorted_and_errors(bank_dir, tmp_path):
    bank = OccluderBank(bank_dir)
    assert [p.name for p in bank.files] == ["a_tall.png", "b_wide.jpg"]
    assert len(bank) == 2 and bank[1].size == (60, 40) and bank[1] is bank[1]  # cached
    assert find_occluder_folder(tmp_path) == bank_dir
    with pytest.raises(OccReIDError, match="not found"):
        OccluderBank(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OccReIDError, match="holds no image files"):
        OccluderBank(empty)
    with pytest.raises(OccReIDError, match="no occluder patch folder"):
        find_occluder_folder(empty)


@pytest.mark.parametrize("size", [(256, 128), (64, 32)])
def test_paste_geometry_scales_with_image(size):
    H, W = size
    g = torch.Generator().manual_seed(0)
    x = torch.full((3, H, W), 0.25)
    seen_h, seen_w, corners = set(), set(), set()
    for i in range(60):
        for patch in (_patch(30, 60, i), _patch(90, 20, i)):
            out, info = paste_occluder(x, patch, generator=g)
            top, left, ph, pw = info["box"]
            changed = (out != x).any(0)
            assert not changed[~_box_mask(H, W, top, left, ph, pw)].any()  # only the box
            assert torch.equal(x, torch.full((3, H, W), 0.25))  # input untouched
            if info["orientation"] == "horizontal":
                assert pw == W and H // 4 <= ph <= H // 2 and left == 0
                assert top in (0, H - ph)
                seen_h.add(ph)
                corners.add(("top" if top == 0 else "bottom"))
            else:
                assert ph == H and W // 4 <= pw <= W // 2 and top == 0
                assert left in (0, W - pw)
                seen_w.add(pw)
                corners.add(("left" if left == 0 else "right"))
    assert len(seen_h) >= 3 and len(seen_w) >= 2
    assert corners == {"top", "bottom", "left", "right"}


def _box_mask(H, W, top, left, ph, pw):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[top : top + ph, left : left + pw] = True
    return m


def test_vertical_threshold_switch():
    patch = _patch(50, 20, 3)  # aspect 2.5
    x = torch.zeros(3, 64, 32)
    _, off = paste_occluder(x, patch, vertical_ratio=2.0, generator=torch.Generator().manual_seed(0))
    _, pap = paste_occluder(x, patch, vertical_ratio=3.0, generator=torch.Generator().manual_seed(0))
    assert off["orientation"] == "vertical" and pap["orientation"] == "horizontal"
    # paper augmentation path runs (random crop + jitter on every patch)
    out, info = paste_occluder(x, patch, patch_aug="paper", generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and info["orientation"] == "vertical"
    with pytest.raises(ValueError, match="patch_aug"):
        paste_occluder(x, patch, patch_aug="crop")


def test_official_vertical_patch_gets_no_color_jitter():
    """Vertical patches are only resized/flipped: pixels equal a plain bicubic resize."""
    import torchvision.transforms.functional as TF

    patch = Image.new("RGB", (10, 40), (200, 30, 90))  # uniform colour: flip/resize keep it
    out, info = paste_occluder(torch.zeros(3, 64, 32), patch, generator=torch.Generator().manual_seed(1))
    top, left, ph, pw = info["box"]
    expect = TF.to_tensor(TF.resize(patch, [ph, pw], interpolation=TF.InterpolationMode.BICUBIC))
    torch.testing.assert_close(out[:, top : top + ph, left : left + pw], expect)


def test_npo_transform_sample(bank_dir):
    H, W = 64, 32
    img = _patch(120, 50, 7)
    t = NPOTransform(bank_dir, (H, W), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    sample = t(img)
    assert sample.shape == (7, H, W) and sample.dtype == torch.float32
    x, x_occ, d = sample[0:3] * 0.5 + 0.5, sample[3:6] * 0.5 + 0.5, sample[6]
    assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
    torch.testing.assert_close(d, (x - x_occ).abs().sum(0), rtol=0, atol=1e-5)
    changed = d > 0
    assert changed.any()
    # Outside the pasted box both views are identical (they share the common transform).
    assert torch.equal(sample[0:3][:, ~changed], sample[3:6][:, ~changed])
    # Determinism: same seeds -> same sample.
    t2 = NPOTransform(bank_dir, (H, W), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert torch.equal(t2(img), sample)
    # prob = 0: no occluder, d = 0, all-visible label.
    t0 = NPOTransform(bank_dir, (H, W), prob=0.0)
    s0 = t0(img)
    assert torch.equal(s0[0:3], s0[3:6]) and not s0[6].any()
    assert stripe_mask(s0[6], 4).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="size"):
        NPOTransform(bank_dir, (H, W), common=lambda im: torch.zeros(3, 10, 10))(img)


def test_npo_batch_gives_expected_labels(bank_dir):
    """Over many samples: vertical occluders -> all visible; horizontal -> 1 or 2 stripes occluded."""
    H, W = 64, 32
    t = NPOTransform(bank_dir, (H, W), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    batch = torch.stack([t(_patch(80, 40, i)) for i in range(24)])
    mask = stripe_mask(batch[:, 6], 4)
    full_height = (batch[:, 6] > 0).any(2).all(1)  # vertical occluders touch every row
    assert full_height.any() and (~full_height).any()
    assert (mask[full_height] == 1).all()
    n_occ = (mask[~full_height] == 0).sum(1)
    assert ((n_occ >= 1) & (n_occ <= 2)).all()
    # an occluded stripe is always at the top or the bottom (corner pasting)
    rows = mask[~full_height]
    assert ((rows[:, 0] == 0) | (rows[:, 3] == 0)).all()


def test_bank_pools_several_folders_for_fed_star(bank_dir, tmp_path):
    os2 = tmp_path / "os2"
    os2.mkdir()
    _patch(30, 30, 2).save(os2 / "c.jpg")
    bank = OccluderBank([bank_dir, os2])
    assert [p.name for p in bank.files] == ["a_tall.png", "b_wide.jpg", "c.jpg"]  # folder by folder
    assert bank.folders == [bank_dir, os2] and "patches=3" in repr(bank)
    with pytest.raises(OccReIDError, match="not found"):
        OccluderBank([bank_dir, tmp_path / "missing_os2"])
    with pytest.raises(OccReIDError, match="empty"):
        OccluderBank([])


def test_config_occluder_list_resolves_against_data_root(bank_dir, tmp_path, monkeypatch):
    from occreid.engine.build import _occluder_folders

    monkeypatch.chdir(tmp_path / "occluders")  # 'occluders' does not exist from here
    assert _occluder_folders(None, str(tmp_path)) is None
    assert _occluder_folders("occluders", str(tmp_path)) == tmp_path / "occluders"
    assert _occluder_folders(["occluders", str(bank_dir)], str(tmp_path)) == [tmp_path / "occluders", bank_dir]
