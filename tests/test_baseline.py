"""ViT baseline: BNNeck + classifier, train/eval outputs, losses, build_model."""

from __future__ import annotations

import math

import pytest
import torch

from occreid.methods import MethodSpec, available_methods, build_model, get_method, register_method, unregister_method
from occreid.methods.baseline import Baseline
from occreid.models import BNNeck, Classifier, build_backbone
from occreid.utils import OccReIDError

IMG = (32, 16)


def nano_baseline(num_classes=5, cams=0, **kw) -> Baseline:
    """vit_nano baseline without drop path, so train-mode passes are deterministic."""
    torch.manual_seed(0)
    return build_model("baseline", num_classes=num_classes, backbone="vit_nano", img_size=IMG, stride=8,
                       sie_camera=cams > 0, num_cameras=cams, drop_path=0.0, **kw)


def batch(n=6, cams=0):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(n, 3, *IMG, generator=g)
    pids = torch.tensor([0, 0, 1, 1, 2, 4, 4, 3][:n])
    cam = torch.arange(n) % cams if cams else None
    return imgs, pids, cam


def ref_triplet_soft(feats, pids):
    """Per-anchor loop: hardest positive / negative by explicit distances, soft margin."""
    losses = []
    for i in range(len(pids)):
        d = [torch.sqrt(torch.clamp(((feats[i] - feats[j]) ** 2).sum(), min=1e-12)) for j in range(len(pids))]
        pos = max(d[j] for j in range(len(pids)) if pids[j] == pids[i])
        neg = min(d[j] for j in range(len(pids)) if pids[j] != pids[i])
        losses.append(torch.log1p(torch.exp(pos - neg)))
    return torch.stack(losses).mean()


def ref_ce(logits, pids, eps=0.0):
    k = logits.shape[1]
    total = 0.0
    for i in range(len(pids)):
        logp = logits[i] - torch.logsumexp(logits[i], 0)
        for c in range(k):
            t = (1 - eps) * float(c == pids[i]) + eps / k
            total = total - t * logp[c]
    return total / len(pids)


def test_train_outputs_and_loss_values():
    m = nano_baseline(id_loss_weight=0.5, triplet_loss_weight=2.0).train()
    imgs, pids, _ = batch()
    out = m(imgs)
    assert set(out) == {"logits", "global_feat"}
    assert out["logits"].shape == (6, 5) and out["global_feat"].shape == (6, 32)
    # global_feat is the cls token after the final norm; logits = classifier(BN_train(global_feat))
    tokens = m.backbone(imgs)
    torch.testing.assert_close(out["global_feat"], tokens[:, 0])
    g = out["global_feat"]
    bn = (g - g.mean(0)) / torch.sqrt(g.var(0, unbiased=False) + 1e-5)  # weight 1, bias 0 at init
    torch.testing.assert_close(out["logits"], bn @ m.classifier.weight.t(), rtol=1e-4, atol=1e-6)
    losses = m.loss(out, pids)
    assert set(losses) == {"id", "triplet"}
    torch.testing.assert_close(losses["id"], 0.5 * ref_ce(out["logits"], pids), rtol=1e-5, atol=1e-6)
    # pid 2 has one sample: its hardest positive is its own distance, sqrt(rounding noise of
    # |x|^2 + |x|^2 - 2 x.x) ~ 1e-3 (official TransReID's expansion too) against the loop's exact
    # 1e-6, so the loss agrees to ~1e-4 only
    torch.testing.assert_close(losses["triplet"], 2.0 * ref_triplet_soft(g, pids), rtol=1e-5, atol=1e-3)
    sum(losses.values()).backward()
    assert m.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.classifier.weight.grad.abs().sum() > 0
    assert m.bottleneck.bias.grad is None  # frozen


def test_label_smoothing_and_margin_options():
    m = nano_baseline(label_smoothing=0.1, triplet_margin=0.3).train()
    imgs, pids, _ = batch()
    out = m(imgs)
    losses = m.loss(out, pids)
    torch.testing.assert_close(losses["id"], ref_ce(out["logits"], pids, eps=0.1), rtol=1e-5, atol=1e-6)
    g = out["global_feat"]
    d = torch.cdist(g.double(), g.double())
    same = pids[:, None] == pids[None, :]
    ap = torch.stack([d[i][same[i]].max() for i in range(6)])
    an = torch.stack([d[i][~same[i]].min() for i in range(6)])
    expect = torch.clamp(ap - an + 0.3, min=0).mean().float()
    torch.testing.assert_close(losses["triplet"], expect, rtol=1e-4, atol=1e-5)


def test_eval_features_before_and_after_bn():
    imgs, pids, _ = batch()
    before = nano_baseline().train()
    after = nano_baseline(neck_feat="after").train()
    after.load_state_dict(before.state_dict())
    for m in (before, after):  # populate running statistics
        with torch.no_grad():
            m(imgs)
        m.eval()
    with torch.no_grad():
        f_before, f_after = before(imgs)["feat"], after(imgs)["feat"]
        g = before.backbone(imgs)[:, 0]
    assert f_before.shape == f_after.shape == (6, before.feature_dim) and before.feature_dim == 32
    torch.testing.assert_close(f_before, g)
    bn = after.bottleneck
    torch.testing.assert_close(bn.running_mean, before.bottleneck.running_mean)
    expect = (g - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(f_after, expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(f_before, f_after)
    with torch.no_grad():
        one = before(imgs[:1])["feat"]  # a batch of one in eval mode
    torch.testing.assert_close(one, f_before[:1], rtol=1e-5, atol=1e-6)


def test_heads_init_and_frozen_bias():
    neck = BNNeck(64)
    assert torch.equal(neck.weight.detach(), torch.ones(64)) and torch.equal(neck.bias.detach(), torch.zeros(64))
    assert neck.weight.requires_grad and not neck.bias.requires_grad
    assert set(neck.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    torch.manual_seed(0)
    cls = Classifier(256, 1000)
    assert cls.bias is None and cls.weight.shape == (1000, 256)
    assert cls.weight.std().item() == pytest.approx(0.001, rel=0.02)
    assert abs(cls.weight.mean().item()) < 1e-5
    m = nano_baseline()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "bottleneck.bias" not in trainable and "bottleneck.weight" in trainable
    assert "classifier.weight" in trainable and "classifier.bias" not in dict(m.named_parameters())
    # one backbone name for every method; TransReID's base.* keys are renamed on load
    assert {k.split(".")[0] for k in m.state_dict()} == {"backbone", "bottleneck", "classifier"}
    legacy = {("base." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in m.state_dict().items()}
    fresh = nano_baseline()
    fresh.load_state_dict(legacy)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_sie_camera_through_build_model():
    m = nano_baseline(cams=3).train()
    assert m.backbone.sie_embed.shape == (3, 1, 32) and m.backbone.sie_coef == 3.0
    imgs, pids, cams = batch(cams=3)
    out = m(imgs, cams)
    assert out["logits"].shape == (6, 5)
    with pytest.raises(OccReIDError, match="camera ids are required"):
        m(imgs)
    plain = nano_baseline(cams=0)
    assert plain.backbone.sie_embed is None
    assert plain.eval()(imgs, cams)["feat"].shape == (6, 32)  # cam ids accepted and ignored without SIE
    with pytest.raises(OccReIDError, match="needs num_cameras"):
        build_model("baseline", num_classes=5, backbone="vit_nano", img_size=IMG, stride=8, sie_camera=True)
    one = build_model("baseline", num_classes=5, backbone="vit_nano", img_size=IMG, stride=8,
                      sie_camera=True, num_cameras=1)
    assert one.backbone.sie_embed is None


def test_build_model_arguments():
    m = build_model("baseline", num_classes=7, backbone="vit_nano", img_size=(40, 24), stride=(8, 4),
                    drop_path=0.0, backbone_kwargs={"fused_attn": False, "attn_drop_rate": 0.1})
    assert isinstance(m, Baseline) and m.classifier.out_features == 7
    assert m.backbone.grid_size == (5, 5) and not m.backbone.fused_attn
    assert m.backbone.blocks[0].attn.attn_drop.p == 0.1
    with pytest.raises(OccReIDError, match=r"unknown option\(s\) bogus, neckfeat"):
        build_model("baseline", num_classes=7, backbone="vit_nano", neckfeat="after", bogus=1)
    with pytest.raises(TypeError, match="backbone_kwargs"):
        build_model("baseline", num_classes=7, backbone="vit_nano", backbone_kwargs={"stride": 8})
    with pytest.raises(OccReIDError, match="Did you mean 'baseline'"):
        build_model("baseline_", num_classes=7)
    with pytest.raises(OccReIDError, match="neck_feat"):
        build_model("baseline", num_classes=7, backbone="vit_nano", img_size=IMG, stride=8, neck_feat="middle")
    with pytest.raises(OccReIDError, match="expected float"):
        build_model("baseline", num_classes=7, backbone="vit_nano", img_size=IMG, stride=8, label_smoothing="x")
    assert "baseline" in available_methods() and get_method("vit_baseline") is get_method("baseline")


def test_registry_is_open_for_new_methods():
    class Dummy(torch.nn.Module):
        def __init__(self, backbone, num_classes, *, scale: float = 1.0):
            super().__init__()
            self.backbone, self.num_classes, self.scale = backbone, num_classes, scale

    class DummySpec(MethodSpec):
        name = "_test_dummy_method"
        model_class = Dummy

    register_method(DummySpec())
    try:
        m = build_model("_test_dummy_method", num_classes=3, backbone="vit_nano", img_size=IMG, stride=8, scale=2)
        assert isinstance(m, Dummy) and m.scale == 2.0 and isinstance(m.scale, float) and m.backbone.embed_dim == 32
        with pytest.raises(OccReIDError, match="scal"):
            build_model("_test_dummy_method", num_classes=3, backbone="vit_nano", img_size=IMG, stride=8, scal=2.0)
    finally:
        unregister_method("_test_dummy_method")
    assert "_test_dummy_method" not in available_methods()


def test_bf16_autocast_train_step_on_cpu():
    m = nano_baseline(cams=2).train()
    imgs, pids, cams = batch(cams=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(imgs, cams)
        losses = m.loss(out, pids)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(m.backbone.pos_embed.grad).all()


def test_loss_rejects_out_of_range_labels():
    m = nano_baseline(num_classes=3).train()
    imgs, pids, _ = batch()
    out = m(imgs)
    with pytest.raises(OccReIDError, match=r"\[0, 2\].*num_classes"):
        m.loss(out, pids)  # pid 4 >= 3 classes


def test_backbone_pretrained_is_passed_through(tmp_path):
    src = build_backbone("vit_nano", img_size=(64, 32), stride=8)
    path = tmp_path / "nano_in1k.pth"
    torch.save({k: v for k, v in src.state_dict().items() if k != "pos_embed"}
               | {"pos_embed": torch.randn(1, 1 + 14 * 14, 32), "head.weight": torch.randn(10, 32)}, path)
    m = build_model("baseline", num_classes=4, backbone="vit_nano", img_size=IMG, stride=8, pretrained=str(path))
    torch.testing.assert_close(m.backbone.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert m.backbone.pos_embed.shape == (1, 1 + 8, 32)
    assert math.isfinite(m.backbone.pos_embed.sum().item())


def test_npo_two_view_batch_trains_both_views():
    m = nano_baseline(num_classes=4)
    torch.manual_seed(3)
    clean, occ = torch.randn(4, 3, 32, 16), torch.randn(4, 3, 32, 16)
    x7 = torch.cat([clean, occ, (clean - occ).abs().mean(1, keepdim=True)], dim=1)
    pids = torch.tensor([0, 0, 1, 1])
    m.train()
    out = m(x7)
    torch.manual_seed(3)
    ref = m(torch.cat([clean, occ]))
    assert out["logits"].shape == (8, 4)
    torch.testing.assert_close(out["global_feat"], ref["global_feat"])
    got = m.loss(out, pids)
    want = m.loss(ref, torch.cat([pids, pids]))
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    with pytest.raises(ValueError, match="identity labels"):
        m.loss(out, torch.tensor([0, 1, 2]))


def test_data_npo_switch():
    from occreid.config import load_config
    from occreid.engine.build import use_npo

    def cfg(name, npo):
        return load_config(None, [f"model.name={name}", f"data.npo={npo}"])

    assert use_npo(cfg("fed", "auto")) and not use_npo(cfg("baseline", "auto"))
    assert use_npo(cfg("baseline", "true")) and not use_npo(cfg("dpm", "false"))
    with pytest.raises(OccReIDError, match="not possible"):
        use_npo(cfg("fed", "false"))
    with pytest.raises(OccReIDError, match="not supported by method .dpm."):
        use_npo(cfg("dpm", "true"))
    with pytest.raises(OccReIDError, match="auto, true or false"):
        use_npo(cfg("baseline", "maybe"))
