"""The FED model on a tiny ViT: contract, shapes, switches, memory hooks, test-time feature."""

from __future__ import annotations

import copy

import pytest
import torch

from occreid.engine.step import TrainStep
from occreid.methods import build_model, get_method
from occreid.methods.fed.model import FED
from occreid.methods.fed.memory import sequential_momentum_update
from occreid.utils import OccReIDError

H, W, C = 32, 16, 6


def tiny(**kw) -> FED:
    torch.manual_seed(0)
    return build_model("fed", num_classes=C, backbone="vit_nano", img_size=(H, W), stride=8,
                       drop_path=0.0, **kw)


def batch7(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 7, H, W, generator=g)
    x[:, 6] = 0
    x[0, 6, :8] = 1.0  # top stripe occluded in sample 0
    x[1, 6, :, :6] = 0.5  # vertical occluder in sample 1
    return x


def initialised(model: FED) -> FED:
    model.eval()
    imgs = torch.randn(2 * C, 3, H, W)
    model.init_memory(model.memory_features(imgs), torch.arange(C).repeat(2))
    model.train()
    return model


def test_build_and_training_outputs():
    model = initialised(tiny())
    assert isinstance(model, FED) and model.feature_dim == 4 * 32
    pids = torch.tensor([0, 0, 1, 1])
    out = model(batch7(), pids=pids)
    for key in ("logits_oem_clean", "logits_fdm_occ", "logits_global_clean"):
        assert out[key].shape == (4, C)
    for key in ("feat_oem_clean", "feat_oem_occ", "feat_fdm_clean", "feat_fdm_occ"):
        assert out[key].shape == (4, 128)
    assert out["scores_clean"].shape == out["mask"].shape == (4, 4)
    assert out["mask"][0].tolist() == [0, 1, 1, 1]
    assert out["mask"][1].tolist() == [1, 1, 1, 1]  # vertical occluders are ignored
    losses = model.loss(out, pids)
    total = sum(losses.values())
    total.backward()
    # the OEM is trained by the MSE terms and through the FDM (scores enter Eq. 7 with grad)
    assert model.oem.heads[0][0].weight.grad is not None
    assert model.fdm.attn.q.weight.grad is not None
    assert model.part_bn.bias.grad is None  # frozen BNNeck bias


def test_fdm_path_trains_the_oem():
    model = initialised(tiny())
    out = model(batch7(), pids=torch.tensor([0, 0, 1, 1]))
    out["logits_fdm_clean"].sum().backward(retain_graph=True)
    g = model.oem.heads[2][2].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_errors_for_bad_inputs():
    model = tiny()
    with pytest.raises(OccReIDError, match="not initialised"):
        model(batch7(), pids=torch.tensor([0, 0, 1, 1]))
    initialised(model)
    with pytest.raises(OccReIDError, match="7-channel"):
        model(torch.randn(2, 3, H, W), pids=torch.tensor([0, 1]))
    with pytest.raises(OccReIDError, match="needs the identity labels"):
        model(batch7())
    model.eval()
    with pytest.raises(OccReIDError, match="RGB images"):
        model(batch7())
    with pytest.raises(OccReIDError, match="unknown option.*num_partz.*num_parts"):
        tiny(num_partz=3)
    with pytest.raises(OccReIDError, match="attn_scale"):
        tiny(attn_scale="sqrt")
    with pytest.raises(OccReIDError, match="num_neighbours.*expected int"):
        tiny(num_neighbours="eight")


def test_test_time_feature_independent_of_fdm_and_memory():
    model = initialised(tiny())
    model(batch7(), pids=torch.tensor([0, 0, 1, 1]))  # moves BN running stats
    model.eval()
    imgs = torch.randn(3, 3, H, W)
    with torch.no_grad():
        feat = model(imgs)["feat"]
        # plain composition: tokens -> row parts -> OEM -> eval BN
        tokens = model.backbone(imgs)
        parts = tokens[:, 1:].reshape(3, 4, 2, 32).mean(2)  # grid 4x2: 1 row (2 tokens) per part
        _, s = model.oem(parts)
        ref = model.part_bn((parts * s[..., None]).flatten(1))
        torch.testing.assert_close(feat, ref, rtol=0, atol=1e-5)
        other = copy.deepcopy(model)
        other.memory.features.normal_()
        for p in other.fdm.parameters():
            p.normal_()
        other.classifier_fdm.weight.normal_()
        assert torch.equal(other(imgs)["feat"], feat)
        ff = model.forward_features(imgs, with_fdm=True)
        assert ff["fdm_feat"].shape == (3, 128) and ff["part_scores"].shape == (3, 4)
        assert torch.equal(ff["feat"], feat)
        assert torch.equal(model.occlusion_scores(imgs), ff["part_scores"])
        assert model(imgs[:1])["feat"].shape == (1, 128)  # batch of one


def test_update_memory_official_order_and_paper_banks():
    model = initialised(tiny())
    before = model.memory.features.clone()
    pids = torch.tensor([0, 0, 1, 1])
    out = model(batch7(), pids=pids)
    model.update_memory(out, pids)
    ref = sequential_momentum_update(before, out["feat_fdm_clean"].detach(), pids, 0.2)
    ref = sequential_momentum_update(ref, out["feat_oem_clean"].detach(), pids, 0.2)
    torch.testing.assert_close(model.memory.features, ref)
    assert torch.equal(model.memory.features[2:], before[2:])

    paper = initialised(tiny(memory_banks="separate", memory_update="mean", loss_weights="paper"))
    assert torch.equal(paper.memory.features, paper.memory_fdm.features)
    b_oem, b_fdm = paper.memory.features.clone(), paper.memory_fdm.features.clone()
    out = paper(batch7(), pids=pids)
    paper.update_memory(out, pids)
    ref_oem = b_oem.clone()
    ref_fdm = b_fdm.clone()
    for k in (0, 1):
        ref_oem[k] = 0.2 * b_oem[k] + 0.8 * out["feat_oem_clean"][pids == k].detach().mean(0)
        ref_fdm[k] = 0.2 * b_fdm[k] + 0.8 * out["feat_fdm_clean"][pids == k].detach().mean(0)
    torch.testing.assert_close(paper.memory.features, ref_oem)
    torch.testing.assert_close(paper.memory_fdm.features, ref_fdm)


def test_memory_init_from_loader_and_switch():
    model = tiny()
    imgs = torch.randn(2 * C, 3, H, W)
    pids = torch.arange(C).repeat(2)
    loader = [{"images": imgs[:5], "pids": pids[:5]}, (imgs[5:], pids[5:], torch.zeros(7))]
    model.train()
    model.init_memory_from_loader(loader)
    assert model.training and bool(model.memory.initialized)
    model.eval()
    with torch.no_grad():
        f = model.memory_features(imgs)
        parts = model.backbone(imgs)[:, 1:].reshape(2 * C, 4, 2, 32).mean(2)
        torch.testing.assert_close(f, model.part_bn(parts.flatten(1)), rtol=0, atol=1e-5)  # no OEM
        want = torch.stack([f[pids == k].mean(0) for k in range(C)])
    torch.testing.assert_close(model.memory.features, want, rtol=0, atol=1e-5)
    oem = tiny(memory_init="oem").eval()
    with torch.no_grad():
        assert torch.allclose(oem.memory_features(imgs), oem.forward_features(imgs)["feat"])
    with pytest.raises(OccReIDError, match="empty loader"):
        tiny().init_memory_from_loader([])


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_parts=2, global_token="cls"),
        dict(num_parts=3, attn_scale="standard", ffn_style="paper", fdm_head_merge="per_sample"),
        dict(fdm_bn="separate", mask_rule="paper", part_pooling="flat", num_neighbours=2),
    ],
)
def test_switches_and_part_counts(kw):
    model = initialised(tiny(**kw))
    P = model.num_parts
    pids = torch.tensor([0, 2, 2, 5])
    out = model(batch7(), pids=pids)
    assert out["feat_oem_clean"].shape == (4, 32 * P) and out["mask"].shape == (4, P)
    sum(model.loss(out, pids).values()).backward()
    model.update_memory(out, pids)
    model.eval()
    assert model(torch.randn(2, 3, H, W))["feat"].shape == (2, 32 * P)


def test_global_token_choice():
    model = initialised(tiny())
    cls_model = copy.deepcopy(model)
    cls_model.global_token = "cls"
    x = batch7()
    with torch.no_grad():
        tokens = model.backbone(torch.cat([x[:, :3], x[:, 3:6]]))
        out = model(x, pids=torch.tensor([0, 0, 1, 1]))
        out_cls = cls_model(x, pids=torch.tensor([0, 0, 1, 1]))
    w = model.classifier_global.weight
    torch.testing.assert_close(out["logits_global_clean"], tokens[:4, 1] @ w.t())
    torch.testing.assert_close(out_cls["logits_global_occ"], tokens[4:, 0] @ w.t())


def test_warns_when_memory_not_updated(caplog):
    model = initialised(tiny())
    pids = torch.tensor([0, 0, 1, 1])
    model(batch7(), pids=pids)
    with caplog.at_level("WARNING"):
        model(batch7(), pids=pids)
    assert "update_memory" in caplog.text


def test_engine_step_runs_fed_forward_loss_step_and_memory_update():
    """The engine's one TrainStep with FED's spec: pids reach the forward, the weighted losses
    are summed, the optimiser steps, the memory is updated; on_train_start skips an
    initialised bank."""
    model = initialised(tiny())
    spec = get_method("fed")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step = TrainStep(spec, model, [opt])
    before = model.memory.features.clone()
    w = model.oem.heads[0][0].weight.clone()
    pids = torch.tensor([0, 0, 1, 1])
    stats = step({"images": batch7(), "pids": pids, "camids": torch.zeros(4, dtype=torch.long)})
    assert set(stats) >= {"loss", "mse_occ", "mc_fdm_clean"}
    assert abs(stats["loss"] - sum(v for k, v in stats.items() if k != "loss")) < 1e-4
    assert not torch.equal(model.oem.heads[0][0].weight, w)  # stepped
    assert not torch.equal(model.memory.features[:2], before[:2])  # memory updated
    assert torch.equal(model.memory.features[2:], before[2:])

    def no_loader():
        raise AssertionError("an initialised memory must not be rebuilt")

    spec.on_train_start(model, no_loader, torch.device("cpu"))
    with pytest.raises(OccReIDError, match="accum_steps"):
        TrainStep(spec, model, [opt], accum_steps=2)


# ----------------------------------------------------------------------------- ablation switches
def test_ablation_without_fdm_has_no_fdm_and_keeps_memory_loss():
    m = initialised(tiny(fdm=False))
    assert m.fdm is None and m.classifier_fdm is None
    assert not any(k.startswith(("fdm.", "classifier_fdm.")) for k in m.state_dict())
    pids = torch.tensor([0, 1, 2, 3])
    out = m(batch7(), pids=pids)
    assert not any("fdm" in k for k in out)
    losses = m.loss(out, pids)
    assert set(losses) == {"mse_clean", "mse_occ", "id_oem_clean", "id_oem_occ", "id_global_clean",
                           "id_global_occ", "mc_oem_clean", "mc_oem_occ"}
    before = m.memory.features.clone()
    sum(losses.values()).backward()
    m.update_memory(out, pids)  # written by the OEM features only
    ref = sequential_momentum_update(before, out["feat_oem_clean"].detach(), pids, 0.2)
    torch.testing.assert_close(m.memory.features, ref)
    with pytest.raises(OccReIDError, match="fdm=False"):
        m.eval().forward_features(torch.randn(2, 3, H, W), with_fdm=True)


def test_ablation_without_oem_uses_unit_scores_and_no_mse():
    m = initialised(tiny(oem=False))
    assert m.oem is None
    pids = torch.tensor([0, 1, 2, 3])
    out = m(batch7(), pids=pids)
    assert "scores_clean" not in out and "mse_clean" not in m.loss(out, pids)
    m.eval()
    x = torch.randn(3, 3, H, W)
    res = m.forward_features(x)
    torch.testing.assert_close(res["part_scores"], torch.ones(3, m.num_parts))
    _, parts = m._parts(x, None)
    torch.testing.assert_close(res["feat"], m.part_bn(parts.flatten(1)))  # BNNeck'd parts, unweighted


def test_no_mse_weights_are_official_without_mse():
    m = initialised(tiny())
    pids = torch.tensor([0, 1, 2, 3])
    out = m(batch7(), pids=pids)
    official = m.loss(out, pids)
    m.loss_weights = "no_mse"
    no_mse = m.loss(out, pids)
    assert set(official) - set(no_mse) == {"mse_clean", "mse_occ"}
    for k, v in no_mse.items():
        torch.testing.assert_close(v, official[k])
