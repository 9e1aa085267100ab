"""DPM components on tiny tensors: HMG, masked-prototype cosine + ArcFace, HEM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from occreid.losses.arcface import ArcFaceLoss, arcface_logits, masked_cosine
from occreid.losses.hem import HeadOrthogonalityLoss, head_orthogonality_loss
from occreid.methods.dpm.model import (
    HeadEnrichModule,
    HierarchicalMaskGenerator,
    MaskedPrototypeClassifier,
    cls_patch_attention_logits,
    scale_block_indices,
    tokens_to_maps,
)

# ------------------------------------------------------------------------------------- HMG


@pytest.mark.parametrize(
    "depth, expected",
    [(12, (2, 4, 10, 12)), (8, (1, 3, 7, 8)), (6, (1, 2, 5, 6)), (4, (1, 3, 4)), (2, (1, 2)), (1, (1,))],
)
def test_scale_block_indices(depth, expected):
    assert scale_block_indices((2, 4, 10, 12), depth) == expected


def test_scale_block_indices_errors():
    with pytest.raises(ValueError, match="1-based"):
        scale_block_indices((0, 4), 12)
    with pytest.raises(ValueError, match="outside"):
        scale_block_indices((13,), 12)
    with pytest.raises(ValueError, match="at least one"):
        scale_block_indices((), 12)
    assert scale_block_indices((1, 2, 3), 3, reference_depth=3) == (1, 2, 3)


def test_tokens_to_maps_layout_and_errors():
    b, gy, gx, d = 2, 3, 5, 4
    tokens = torch.randn(b, 1 + gy * gx, d)
    maps = tokens_to_maps(tokens, (gy, gx))
    assert maps.shape == (b, d, gy, gx)
    for y in range(gy):
        for x in range(gx):
            assert torch.equal(maps[:, :, y, x], tokens[:, 1 + gx * y + x, :])
    with pytest.raises(ValueError, match="patch grid"):
        tokens_to_maps(tokens, (4, 4))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        tokens_to_maps(tokens[0], (gy, gx))


def _randomise(hmg: HierarchicalMaskGenerator, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hmg.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "weight" in name else 0.1))
        for m in hmg.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _plain_hmg_eval(hmg: HierarchicalMaskGenerator, maps, mode: str = "max"):
    """Reference: F.conv2d, BN with running stats by formula, ReLU, 2x2 pooling via reshape
    (floor, skipped along a side of length 1), global pool, linear, sigmoid."""
    x = torch.cat(maps, 1)
    for i in (0, 2, 4):
        conv, bn = hmg.conv_layers[i][0], hmg.conv_layers[i][1]
        x = F.conv2d(x, conv.weight, conv.bias, padding=1)
        x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        x = torch.relu(x * bn.weight[:, None, None] + bn.bias[:, None, None])
        if i < 4:
            h, w = x.shape[-2:]
            kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
            x = x[..., : h // kh * kh, : w // kw * kw]
            x = x.reshape(*x.shape[:2], h // kh, kh, w // kw, kw)
            x = x.amax(dim=(3, 5)) if mode == "max" else x.mean(dim=(3, 5))
    pooled = x.flatten(2).amax(-1) if mode == "max" else x.flatten(2).mean(-1)
    return torch.sigmoid(pooled @ hmg.fc.weight.t() + hmg.fc.bias)


@pytest.mark.parametrize("grid", [(22, 11), (21, 10), (4, 2), (3, 1), (1, 1), (5, 5)])
@pytest.mark.parametrize("batch", [1, 3])
def test_hmg_shapes_and_reference(grid, batch):
    d, k = 8, 4
    hmg = HierarchicalMaskGenerator(d, k)
    _randomise(hmg)
    hmg.eval()
    maps = [torch.randn(batch, d, *grid) for _ in range(k)]
    with torch.no_grad():
        out = hmg.forward_intermediates(maps)
        ref = _plain_hmg_eval(hmg, maps)
    assert out["pooled"].shape == (batch, d)  # c3 = D by default
    assert out["mask"].shape == (batch, d)
    torch.testing.assert_close(out["mask"], ref, rtol=1e-5, atol=1e-6)
    assert ((out["mask"] > 0) & (out["mask"] < 1)).all()
    # one concatenated tensor is accepted too
    torch.testing.assert_close(hmg(torch.cat(maps, 1)), out["mask"])


def test_hmg_avg_pooling_variant_reference():
    hmg = HierarchicalMaskGenerator(6, 2, pooling="avg")
    _randomise(hmg, 3)
    hmg.eval()
    maps = [torch.randn(2, 6, 7, 5) for _ in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(hmg(maps), _plain_hmg_eval(hmg, maps, "avg"), rtol=1e-5, atol=1e-6)
        # and it differs from max pooling with the same weights
        mx = HierarchicalMaskGenerator(6, 2)
        mx.load_state_dict(hmg.state_dict())
        assert not torch.allclose(mx.eval()(maps), hmg(maps))


def test_hmg_pooling_equals_official_maxpool_on_official_grids():
    from occreid.methods.dpm.model import _Pool2x2

    pool = _Pool2x2("max")
    for h, w in [(22, 11), (11, 5), (21, 10), (10, 5), (5, 2)]:
        x = torch.randn(2, 3, h, w)
        assert torch.equal(pool(x), torch.nn.MaxPool2d(2, 2)(x))


def test_hmg_channel_widths_follow_model_width_and_zero_init():
    with torch.device("meta"):  # ViT-B sizes without allocating 236 MB
        hmg = HierarchicalMaskGenerator(768, 4)
    convs = [hmg.conv_layers[i][0] for i in (0, 2, 4)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3072, 1536), (1536, 768), (768, 768)]
    assert (hmg.fc.in_features, hmg.fc.out_features) == (768, 768)
    assert sum(p.numel() for p in hmg.parameters()) == 58_992_384  # dpm-official.md §3
    tiny = HierarchicalMaskGenerator(16, 3)
    assert [(tiny.conv_layers[i][0].in_channels, tiny.conv_layers[i][0].out_channels) for i in (0, 2, 4)] == [
        (48, 24), (24, 16), (16, 16)
    ]
    # the FC weight is zero at init: every mask is exactly 0.5 whatever the input
    mask = tiny.train()([torch.randn(2, 16, 6, 3) * 5 for _ in range(3)])
    assert torch.equal(mask, torch.full((2, 16), 0.5))


def test_hmg_batch_of_one_train_mode_and_gradients():
    hmg = HierarchicalMaskGenerator(8, 4)
    _randomise(hmg)
    hmg.train()
    maps = [torch.randn(1, 8, 22, 11, requires_grad=True) for _ in range(4)]
    mask = hmg(maps)
    assert mask.shape == (1, 8)
    mask.sum().backward()
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in maps)


def test_hmg_without_fc_is_sigmoid_of_pooled():
    hmg = HierarchicalMaskGenerator(8, 2, mask_fc=False)
    assert hmg.fc is None
    out = hmg.eval().forward_intermediates([torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)])
    torch.testing.assert_close(out["mask"], torch.sigmoid(out["pooled"]))
    assert (out["mask"] >= 0.5).all()  # sigmoid of a ReLU output


def test_hmg_errors():
    with pytest.raises(ValueError, match="pooling"):
        HierarchicalMaskGenerator(8, 4, pooling="mean")
    with pytest.raises(ValueError, match="embed_dim"):
        HierarchicalMaskGenerator(8, 2, hidden_channels=(8, 8, 4), mask_fc=False)
    hmg = HierarchicalMaskGenerator(8, 4)
    with pytest.raises(ValueError, match="expects 4 block maps"):
        hmg([torch.randn(1, 8, 4, 2)] * 3)
    with pytest.raises(ValueError, match="32 channels"):
        hmg([torch.randn(1, 6, 4, 2)] * 4)


# ---------------------------------------------------------------------- masked prototypes


def _masked_cos_loop(feat, mask, weight, mask_feature=False, renorm=True):
    """Reference: per sample, build the masked prototype matrix explicitly (official MArcface)."""
    w_hat = F.normalize(weight, dim=1)
    rows = []
    for i in range(feat.shape[0]):
        x = F.normalize(feat[i], dim=0)
        if mask_feature:
            x = mask[i] * x
            x = F.normalize(x, dim=0) if renorm else x
        p = mask[i] * w_hat  # [C, D]
        p = F.normalize(p, dim=1) if renorm else p
        rows.append(p @ x)
    return torch.stack(rows)


@pytest.mark.parametrize("mask_feature", [False, True])
@pytest.mark.parametrize("mask_norm", ["mask_then_normalize", "normalize_then_mask"])
def test_masked_cosine_vs_per_sample_reference(mask_feature, mask_norm):
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(7, 12, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(7, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=g, dtype=torch.float64)
    got = masked_cosine(feat, mask, weight, mask_feature=mask_feature, mask_norm=mask_norm)
    ref = _masked_cos_loop(feat, mask, weight, mask_feature, mask_norm == "mask_then_normalize")
    assert got.dtype == torch.float64 and got.shape == (7, 5)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # float32 path agrees too
    got32 = masked_cosine(feat.float(), mask.float(), weight.float(), mask_feature=mask_feature, mask_norm=mask_norm)
    torch.testing.assert_close(got32, ref.float(), rtol=0, atol=2e-6)


def test_masked_cosine_mask_before_equals_after_norm_in_official_mode():
    """normalize(m ⊙ Ŵ) == normalize(m ⊙ W): masking before or after the row norm is the same."""
    g = torch.Generator().manual_seed(2)
    feat, mask = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.rand(4, 10, generator=g, dtype=torch.float64)
    w = torch.randn(3, 10, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [0.1]], dtype=torch.float64)
    before = torch.stack([F.normalize(mask[i] * w, dim=1) @ F.normalize(feat[i], dim=0) for i in range(4)])
    torch.testing.assert_close(masked_cosine(feat, mask, w), before, rtol=0, atol=1e-12)
    # with an all-ones mask it is the plain cosine
    plain = F.normalize(feat, dim=1) @ F.normalize(w, dim=1).t()
    torch.testing.assert_close(masked_cosine(feat, torch.ones_like(feat), w), plain, rtol=0, atol=1e-12)


def test_masked_cosine_zero_mask_is_finite_with_finite_grad():
    feat = torch.randn(2, 6, requires_grad=True)
    mask = torch.zeros(2, 6, requires_grad=True)
    w = torch.randn(3, 6, requires_grad=True)
    cos = masked_cosine(feat, mask, w)
    assert torch.equal(cos, torch.zeros(2, 3))
    cos.sum().backward()
    for t in (feat, mask, w):
        assert torch.isfinite(t.grad).all()


def test_masked_cosine_errors():
    with pytest.raises(ValueError, match="mask must have the shape"):
        masked_cosine(torch.randn(2, 4), torch.rand(2, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="prototype width"):
        masked_cosine(torch.randn(2, 4), torch.rand(2, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="mask_norm"):
        masked_cosine(torch.randn(2, 4), torch.rand(2, 4), torch.randn(5, 4), mask_norm="before")


def _arcface_reference(cos, labels, s, m, easy=False):
    """Plain ArcFace (official MArcface formula) with a one-hot blend, per element."""
    out = torch.empty_like(cos)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            c = float(cos[i, j])
            if j == int(labels[i]):
                phi = c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m)
                if easy:
                    phi = phi if c > 0 else c
                else:
                    phi = phi if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
                out[i, j] = s * phi
            else:
                out[i, j] = s * c
    return out


@pytest.mark.parametrize("margin, easy", [(0.5, False), (0.3, False), (0.5, True)])
def test_arcface_logits_vs_reference(margin, easy):
    cos = torch.tensor(
        [[0.2, -0.1, 0.9], [0.95, -0.99, 0.0], [-0.3, 0.4, -0.96], [0.5, 0.5, -0.5]], dtype=torch.float64
    )
    labels = torch.tensor([2, 1, 2, 0])  # includes targets below cos(pi - m) and negative ones
    got = arcface_logits(cos, labels, scale=30.0, margin=margin, easy_margin=easy)
    torch.testing.assert_close(got, _arcface_reference(cos, labels, 30.0, margin, easy), rtol=0, atol=1e-10)
    loss = ArcFaceLoss(30.0, margin, easy)(cos, labels)
    torch.testing.assert_close(loss, F.cross_entropy(got, labels))


def test_arcface_errors():
    cos = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        arcface_logits(cos, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected labels"):
        arcface_logits(cos, torch.tensor([0]))
    with pytest.raises(ValueError, match="margin"):
        ArcFaceLoss(30.0, 2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_arcface_finite_under_cpu_autocast(dtype):
    """Features equal to their prototype (cos = 1 exactly or rounded above 1 in half precision):
    logits, loss and gradients stay finite under autocast."""
    torch.manual_seed(0)
    clf = MaskedPrototypeClassifier(16, 4)
    feat = (clf.weight.detach()[[0, 1, 2, 3, 0]] * 40).clone().requires_grad_(True)
    mask = torch.ones(5, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    with torch.autocast("cpu", dtype=dtype):
        logits, cos = clf(feat.to(dtype), mask.to(dtype))
        loss = ArcFaceLoss()(cos, labels) + F.cross_entropy(logits, labels)
    assert cos.dtype == torch.float32
    assert torch.isfinite(cos).all() and torch.isfinite(loss)
    loss.backward()
    for t in (feat, mask, clf.weight):
        assert torch.isfinite(t.grad).all()
    # the target cosine is ~1 and got the margin: s (cos m - tiny) ~ 30 cos(0.5)
    arc = arcface_logits(cos, labels)
    assert torch.allclose(arc[0, 0], torch.tensor(30 * math.cos(0.5)), atol=0.1)


def test_classifier_plain_branch_and_init():
    torch.manual_seed(0)
    clf = MaskedPrototypeClassifier(64, 50)
    bound = math.sqrt(6 / (64 + 50))  # xavier uniform
    assert clf.weight.abs().max() <= bound and clf.weight.abs().max() > 0.9 * bound
    feat, mask = torch.randn(3, 64), torch.rand(3, 64)
    logits, cos = clf(feat, mask)
    torch.testing.assert_close(logits, feat @ clf.weight.t())  # no norm, no bias, no scale
    torch.testing.assert_close(cos, masked_cosine(feat, mask, clf.weight))


# ------------------------------------------------------------------------------------- HEM


def _hem_reference(a, eps=1e-6):
    total = 0.0
    n = a.shape[1]
    for b in range(a.shape[0]):
        rows = a[b] / torch.sqrt((a[b] ** 2).sum(-1, keepdim=True) + eps)
        total = total + torch.linalg.matrix_norm(rows @ rows.t() - torch.eye(n, dtype=a.dtype)) ** 2
    return total / (n * n)


def test_hem_loss_vs_reference_and_reductions():
    a = torch.randn(4, 3, 9, dtype=torch.float64)
    torch.testing.assert_close(head_orthogonality_loss(a), _hem_reference(a), rtol=1e-12, atol=0)
    torch.testing.assert_close(head_orthogonality_loss(a, reduction="mean"), _hem_reference(a) / 4, rtol=1e-12, atol=0)
    torch.testing.assert_close(HeadOrthogonalityLoss()(a), _hem_reference(a))


def test_hem_loss_extremes():
    n = 4
    identical = torch.ones(2, n, 10)
    # Gram of identical unit rows is all ones: (N^2 - N) off-diagonal ones per image
    torch.testing.assert_close(head_orthogonality_loss(identical), torch.tensor(2 * (n * n - n) / (n * n)), rtol=1e-5, atol=0)
    orth = torch.zeros(2, n, 10)
    orth[:, torch.arange(n), torch.arange(n)] = 3.0
    assert head_orthogonality_loss(orth) < 1e-10


def test_hem_gradient_flows_and_errors():
    a = torch.randn(2, 3, 5, requires_grad=True)
    head_orthogonality_loss(a).backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="heads, patches"):
        head_orthogonality_loss(torch.randn(3, 5))
    with pytest.raises(ValueError, match="reduction"):
        head_orthogonality_loss(torch.randn(1, 2, 3), reduction="none")
    with pytest.raises(ValueError, match="attention"):
        HeadEnrichModule("probs")


def test_cls_patch_attention_logits_and_hem_module_variants():
    q = torch.randn(2, 3, 8)
    k = torch.randn(2, 3, 6, 8)
    ref = torch.einsum("bhd,bhpd->bhp", q, k) / math.sqrt(8)
    torch.testing.assert_close(cls_patch_attention_logits(q, k), ref)
    torch.testing.assert_close(cls_patch_attention_logits(q, k, scale=0.5), ref * math.sqrt(8) * 0.5)
    with pytest.raises(ValueError, match="expected q_cls"):
        cls_patch_attention_logits(q, k[:, :2])
    torch.testing.assert_close(HeadEnrichModule("logits")(ref), head_orthogonality_loss(ref))
    torch.testing.assert_close(HeadEnrichModule("softmax")(ref), head_orthogonality_loss(ref.softmax(-1)))


def test_hem_under_autocast_is_float32():
    a = torch.randn(2, 3, 5).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_orthogonality_loss(a)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
