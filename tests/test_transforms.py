"""Tests for occreid.data.transforms (TransReID train/test pipelines, timm-style RandomErasing)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from occreid.data import RandomErasing, build_test_transform, build_train_transform


def make_image(h=23, w=11, seed=0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def reference(img: Image.Image, size, resample, mean=(0.5,) * 3, std=(0.5,) * 3) -> torch.Tensor:
    """Plain PIL resize + manual ToTensor/Normalize."""
    h, w = size
    arr = np.asarray(img.resize((w, h), resample), dtype=np.float32) / 255.0
    arr = (arr - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


@pytest.mark.parametrize("size", [(16, 8), (9, 13)])
def test_test_transform_equals_pil_resize_and_normalise(size):
    img = make_image()
    out = build_test_transform(size)(img)
    assert out.shape == (3, *size) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(img, size, Image.BILINEAR), rtol=0, atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1


def test_test_transform_custom_mean_std_and_interpolation():
    img = make_image(seed=1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = build_test_transform((12, 6), interpolation="bicubic", mean=mean, std=std)(img)
    torch.testing.assert_close(out, reference(img, (12, 6), Image.BICUBIC, mean, std),
                               rtol=0, atol=1e-5)
    raw = build_test_transform(10, mean=None, std=None)(img)  # int size = square, no normalise
    assert raw.shape == (3, 10, 10) and raw.min() >= 0 and raw.max() <= 1


def test_train_transform_order_and_defaults():
    tf = build_train_transform()
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop, T.ToTensor,
                     T.Normalize, RandomErasing]
    resize, flip, pad, crop = tf.transforms[:4]
    assert resize.size == (256, 128) and resize.interpolation == InterpolationMode.BICUBIC
    assert flip.p == 0.5 and pad.padding == 10 and pad.fill == 0 and crop.size == (256, 128)
    re = tf.transforms[-1]
    assert re.probability == 0.5 and re.max_attempts == 10
    assert re.area == pytest.approx((0.02, 1 / 3))
    assert re.log_aspect == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
    assert build_test_transform().transforms[0].interpolation == InterpolationMode.BILINEAR


def test_color_jitter_position_and_disabled_parts():
    fed = build_train_transform(color_jitter=(0.1, 0.1, 0.1, 0.0), re_prob=0, padding=0)
    kinds = [type(t) for t in fed.transforms]
    assert kinds == [T.ColorJitter, T.Resize, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert fed.transforms[0].brightness == (0.9, 1.1)
    dpm = build_train_transform(color_jitter=(0.3, 0.3, 0.2, 0.2),
                                color_jitter_position="after_resize")
    assert [type(t) for t in dpm.transforms[:3]] == [T.Resize, T.ColorJitter, T.RandomHorizontalFlip]
    assert dpm.transforms[1].hue == (-0.2, 0.2)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_train_flip(flip):
    img = make_image(seed=2)
    out = build_train_transform((16, 8), flip_prob=flip, padding=0, re_prob=0)(img)
    ref = reference(img, (16, 8), Image.BICUBIC)
    if flip:
        ref = ref.flip(-1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_pad_and_crop_keep_size_and_shift_content():
    img = make_image(seed=3)
    size, pad = (16, 8), 3
    ref = reference(img, size, Image.BICUBIC)
    padded = torch.full((3, size[0] + 2 * pad, size[1] + 2 * pad), -1.0)  # black after normalise
    padded[:, pad:pad + size[0], pad:pad + size[1]] = ref
    tf = build_train_transform(size, flip_prob=0, padding=pad, re_prob=0)
    offsets = set()
    torch.manual_seed(0)
    for _ in range(20):
        out = tf(img)
        assert out.shape == (3, *size)
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if torch.allclose(out, padded[:, i:i + size[0], j:j + size[1]], atol=1e-6)]
        assert hits, "output is not a crop of the zero-padded image"
        offsets.add(hits[0])
    assert len(offsets) > 1  # the crop really is random


def test_train_transform_is_seedable():
    img = make_image(seed=4)
    tf = build_train_transform((16, 8), re_prob=1.0)

    def run():
        random.seed(7)
        torch.manual_seed(7)
        return tf(img)

    a, b = run(), run()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def timm_box(seed, h, w, p=1.0, area=(0.02, 1 / 3), min_aspect=0.3, attempts=10):
    """The timm 0.3.2 'pixel' geometry, written out independently."""
    random.seed(seed)
    if random.random() > p:
        return None
    log_r = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(attempts):
        a = random.uniform(*area) * h * w
        r = math.exp(random.uniform(*log_r))
        bh, bw = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if bw < w and bh < h:
            return random.randint(0, h - bh), random.randint(0, w - bw), bh, bw
    return None


@pytest.mark.parametrize("seed", range(8))
def test_random_erasing_one_rectangle(seed):
    H, W = 32, 16
    x = torch.rand(3, H, W) * 2 - 1
    re = RandomErasing(probability=1.0)
    random.seed(seed)
    torch.manual_seed(seed)
    out = re(x)
    changed = (out != x)
    assert changed.any()
    assert (changed == changed[:1]).all()  # all channels change together (per-channel noise)
    rows = changed[0].any(1).nonzero().flatten()
    cols = changed[0].any(0).nonzero().flatten()
    top, left = int(rows[0]), int(cols[0])
    bh, bw = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
    assert changed[0, top:top + bh, left:left + bw].all()  # exactly one filled rectangle
    assert int(changed[0].sum()) == bh * bw
    assert (top, left, bh, bw) == timm_box(seed, H, W)
    # area fraction within bounds, up to the rounding of h and w
    frac = bh * bw / (H * W)
    slack = (bh + bw + 1) / (H * W)
    assert 0.02 - slack <= frac <= 1 / 3 + slack
    # the box holds N(0, 1) noise drawn from torch's generator
    torch.manual_seed(seed)
    noise = torch.empty(3, bh, bw).normal_()
    torch.testing.assert_close(out[:, top:top + bh, left:left + bw], noise, rtol=0, atol=0)
    assert torch.equal(x, x.clone())  # input not modified in place


def test_random_erasing_p0_and_no_fit_are_identity():
    x = torch.randn(3, 10, 10)
    re0 = RandomErasing(probability=0.0)
    for s in range(20):
        random.seed(s)
        assert torch.equal(re0(x), x)
    # a 95%-area square never fits (h = w = 10 is not < 10): nothing is erased
    never = RandomErasing(probability=1.0, area=(0.95, 0.95), min_aspect=1.0)
    assert torch.equal(never(x), x)


def test_random_erasing_parameters():
    x = torch.zeros(3, 20, 20, dtype=torch.float64)
    re = RandomErasing(probability=1.0, area=(0.5, 0.5), min_aspect=1.0, max_attempts=1)
    random.seed(0)
    out = re(x)
    side = round(math.sqrt(200))  # h = w = round(sqrt(0.5 * 400)) = 14
    assert out.dtype == torch.float64
    assert int((out != 0)[0].sum()) == side * side
    assert "probability=1.0" in repr(re)


@pytest.mark.parametrize(
    "kwargs",
    [dict(probability=1.5), dict(area=(0.5, 0.1)), dict(area=(0.0, 0.3)), dict(min_aspect=0.0),
     dict(max_attempts=0)],
)
def test_random_erasing_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        RandomErasing(**kwargs)


def test_random_erasing_rejects_non_chw():
    with pytest.raises(TypeError, match="CHW"):
        RandomErasing(1.0)(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="CHW"):
        RandomErasing(1.0)(make_image())


@pytest.mark.parametrize(
    "kwargs",
    [dict(interpolation="cubic-ish"), dict(flip_prob=2.0), dict(padding=-1), dict(re_prob=-0.1),
     dict(color_jitter=(0.1, 0.1)), dict(color_jitter_position="middle"), dict(size=(0, 8)),
     dict(mean=(0.5, 0.5, 0.5), std=None)],
)
def test_build_train_transform_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        build_train_transform(**kwargs)
