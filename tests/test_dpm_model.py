"""The DPM model on tiny ViTs: outputs, losses, the two-step update, optimisers, retrieval."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from occreid.evaluation.masked_distance import MaskedCosineDistance
from occreid.losses.arcface import arcface_logits
from occreid.losses.hem import head_orthogonality_loss
from occreid.losses.triplet import TripletLoss
from occreid.models.backbone import build_backbone
from occreid.engine.step import TrainStep, build_method_optimizers
from occreid.methods import build_model, get_method
from occreid.methods.dpm.model import DPM, convert_official_state_dict, tokens_to_maps
from occreid.utils import OccReIDError

SPEC = get_method("dpm")


def _step(m, x, y, c, optimizers, **kw):
    """One iteration of the engine's TrainStep with DPM's spec (the code ``occreid train`` runs)."""
    return TrainStep(SPEC, m, optimizers, **kw)({"images": x, "pids": y, "camids": c})


def _model(backbone="vit_nano", img=(32, 16), stride=8, cams=3, num_classes=4, seed=0, **kw):
    torch.manual_seed(seed)
    bb = build_backbone(backbone, img_size=img, stride=stride, num_cameras=cams, drop_path=0.0)
    m = DPM(bb, num_classes, **kw)
    if m.hmg is not None and m.hmg.fc is not None:
        with torch.no_grad():  # a non-zero mask FC, so the HMG convs get gradients too
            m.hmg.fc.weight.normal_(0, 0.2)
    return m


def _batch(img=(32, 16), n_ids=4, per_id=2, cams=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_ids * per_id, 3, *img, generator=g)
    y = torch.arange(n_ids).repeat_interleave(per_id)
    c = torch.randint(0, cams, (n_ids * per_id,), generator=g)
    return x, y, c


# ----------------------------------------------------------------------------- forward


def test_registered_and_built_by_name():
    m = build_model("dpm", num_classes=5, backbone="vit_nano", img_size=(32, 16), stride=8, arc_margin=0.3)
    assert isinstance(m, DPM) and m.arc_margin == 0.3 and m.num_classes == 5
    with pytest.raises(OccReIDError, match="hmg_pool"):
        build_model("dpm", num_classes=5, backbone="vit_nano", img_size=(32, 16), stride=8, hmg_pool="avg")


@pytest.mark.parametrize(
    "backbone, img, stride, blocks",
    [("vit_nano", (32, 16), 8, (1, 2)), ("vit_micro_patch8", (48, 16), (6, 6), (1, 2, 5, 6))],
)
def test_eval_outputs_blocks_and_batch_of_one(backbone, img, stride, blocks):
    m = _model(backbone, img, stride).eval()
    assert m.hmg_blocks == blocks
    assert m.hmg.conv_layers[0][0].in_channels == len(blocks) * m.feature_dim
    x, _, c = _batch(img)
    with torch.no_grad():
        out = m(x, c)
        one = m(x[:1], c[:1])
        tokens = m.backbone(x, c)
    assert set(out) == {"feat", "mask"}
    assert out["feat"].shape == out["mask"].shape == (8, m.feature_dim)
    assert one["feat"].shape == one["mask"].shape == (1, m.feature_dim)
    torch.testing.assert_close(one["mask"], out["mask"][:1], rtol=1e-5, atol=1e-6)
    # retrieval feature = pre-BNNeck cls token after the final norm (NECK_FEAT 'before')
    torch.testing.assert_close(out["feat"], tokens[:, 0])


def test_neck_feat_after():
    m = _model(neck_feat="after").eval()
    x, _, c = _batch()
    with torch.no_grad():
        out = m(x, c)
        ref = m.bottleneck(m.backbone(x, c)[:, 0])
    torch.testing.assert_close(out["feat"], ref)


def test_train_outputs_come_from_one_pass_with_the_right_tensors():
    """HMG input = reshaped patch tokens of the selected blocks; cls_attn = the last block's
    q_cls·k_patch·scale computed from its qkv weights; one backbone pass."""
    m = _model("vit_micro_patch8", (48, 16), (6, 6)).train()
    x, _, c = _batch((48, 16))
    bb = m.backbone
    captured, hmg_in, calls = {}, {}, {"blocks0": 0}

    def block_hook(i):
        def hook(_mod, _inp, out):
            captured[i + 1] = out.detach()
        return hook

    handles = [blk.register_forward_hook(block_hook(i)) for i, blk in enumerate(bb.blocks)]
    handles.append(bb.blocks[-1].norm1.register_forward_hook(lambda _m, _i, o: captured.__setitem__("norm1", o.detach())))
    handles.append(m.hmg.register_forward_pre_hook(lambda _m, args: hmg_in.__setitem__("maps", args[0])))

    def count(_m, _i, _o):
        calls["blocks0"] += 1

    handles.append(bb.blocks[0].register_forward_hook(count))
    out = m(x, c)
    for h in handles:
        h.remove()
    assert calls["blocks0"] == 1
    # the last block ran through forward_with_cls_logits, which bypasses the module hook
    for b, mp in zip(m.hmg_blocks, hmg_in["maps"]):
        if b in captured:
            torch.testing.assert_close(mp, tokens_to_maps(captured[b], bb.grid_size))
    with torch.no_grad():  # the last block's raw output, from a separate (deterministic) run
        _, (last,) = bb.forward_intermediates(x, c, indices=(bb.depth,))
    torch.testing.assert_close(hmg_in["maps"][-1], tokens_to_maps(last, bb.grid_size), rtol=1e-5, atol=1e-5)
    assert len(hmg_in["maps"]) == 4 and hmg_in["maps"][0].shape == (8, m.feature_dim, *bb.grid_size)
    # cls attention logits from the last block's normed input
    h = bb.num_heads
    d = m.feature_dim
    qkv = F.linear(captured["norm1"], bb.blocks[-1].attn.qkv.weight, bb.blocks[-1].attn.qkv.bias)
    q, k = qkv[..., :d], qkv[..., d : 2 * d]
    hd = d // h
    qh = q[:, 0].reshape(-1, h, hd)
    kh = k[:, 1:].reshape(k.shape[0], -1, h, hd).transpose(1, 2)
    ref = torch.einsum("bhd,bhpd->bhp", qh, kh) * hd**-0.5
    torch.testing.assert_close(out["cls_attn"], ref, rtol=1e-5, atol=1e-5)
    assert out["logits"].shape == out["cos"].shape == (8, 4)


def test_loss_terms_and_weights():
    m = _model(alpha=0.3, beta=0.2, triplet_loss_weight=0.7).train()
    x, y, c = _batch()
    out = m(x, c)
    losses = m.loss(out, y)
    assert set(losses) == {"id", "arc", "hem", "triplet"}
    torch.testing.assert_close(losses["id"], 0.3 * F.cross_entropy(out["logits"], y))
    arc = arcface_logits(out["cos"], y, scale=30.0, margin=0.5)
    torch.testing.assert_close(losses["arc"], 0.7 * F.cross_entropy(arc, y))
    torch.testing.assert_close(losses["hem"], 0.2 * head_orthogonality_loss(out["cls_attn"]))
    torch.testing.assert_close(losses["triplet"], 0.7 * TripletLoss()(out["global_feat"], y))
    # plain logits = BNNeck(feat) · Wᵀ, shared prototypes with the masked branch
    feat_bn = F.batch_norm(out["global_feat"], None, None, m.bottleneck.weight, m.bottleneck.bias, training=True)
    torch.testing.assert_close(out["logits"], feat_bn @ m.classifier.weight.t(), rtol=1e-4, atol=1e-4)


def test_beta_zero_skips_hem():
    m = _model(beta=0.0).train()
    x, y, c = _batch()
    out = m(x, c)
    assert out["cls_attn"] is None
    assert set(m.loss(out, y)) == {"id", "arc", "triplet"}


def test_masked_branch_gradient_reaches_hmg_and_backbone():
    m = _model().train()
    x, y, c = _batch()
    m.loss(m(x, c), y)["arc"].backward()
    assert m.hmg.conv_layers[0][0].weight.grad.abs().sum() > 0
    assert m.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(hem_attention="softmax", hem_reduction="mean"),
        dict(hmg_pooling="avg", hmg_fc=False),
        dict(mask_feature=True, mask_norm="normalize_then_mask"),
        dict(hmg_blocks=(12,), update_mode="single_pass", hmg_lr_schedule="cosine"),
    ],
)
def test_switches_run(kw):
    m = _model(**kw).train()
    x, y, c = _batch()
    losses = m.loss(m(x, c), y)
    assert all(torch.isfinite(v) for v in losses.values())


def test_switch_errors():
    bb = build_backbone("vit_nano", img_size=(32, 16), stride=8)
    for kw, msg in [
        (dict(neck_feat="bn"), "neck_feat"),
        (dict(update_mode="twice"), "update_mode"),
        (dict(hmg_lr_schedule="step"), "hmg_lr_schedule"),
        (dict(hem_attention="probs"), "attention"),
        (dict(hmg_pooling="mean"), "pooling"),
        (dict(mask_norm="after"), "mask_norm"),
        (dict(alpha=1.5), "alpha"),
        (dict(beta=-1.0), "beta"),
    ]:
        with pytest.raises(ValueError, match=msg):
            DPM(bb, 3, **kw)


def test_bf16_autocast_training_forward_is_finite():
    m = _model().train()
    x, y, c = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, c)
        losses = m.loss(out, y)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# ------------------------------------------------------------------- two-step update


def test_parameter_split_disjoint_and_complete():
    m = _model()
    hmg, main = m.hmg_parameters(), m.main_parameters()
    ids_h, ids_m = {id(p) for p in hmg}, {id(p) for p in main}
    assert not ids_h & ids_m
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert ids_h | ids_m == trainable
    named = dict(m.named_parameters())
    assert ids_h == {id(p) for n, p in named.items() if n.startswith("hmg.")}
    assert id(m.classifier.weight) in ids_m and id(m.bottleneck.weight) in ids_m
    assert id(m.bottleneck.bias) not in ids_m | ids_h  # frozen BNNeck bias


def _grads(model, x, y, c):
    model.zero_grad(set_to_none=True)
    sum(model.loss(model(x, c), y).values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_pass_update_matches_reference():
    """Pass 1 steps everything but the HMG with the gradient at θ0; pass 2 recomputes at the
    updated backbone/prototypes and steps only the HMG. Two forward passes."""
    lr = 0.05
    m = _model().train()
    x, y, c = _batch()
    m0 = copy.deepcopy(m)
    p0 = {n: p.detach().clone() for n, p in m0.named_parameters()}

    g1 = _grads(copy.deepcopy(m0), x, y, c)
    expect = {n: (p0[n] - lr * g1[n] if not n.startswith("hmg.") and n in g1 else p0[n]) for n in p0}
    mid = copy.deepcopy(m0)
    with torch.no_grad():
        for n, p in mid.named_parameters():
            p.copy_(expect[n])
    g2 = _grads(mid, x, y, c)
    for n in p0:
        if n.startswith("hmg."):
            expect[n] = p0[n] - lr * g2[n]

    calls = {"n": 0}

    def forward(images, cam_ids=None, **kw):
        calls["n"] += 1
        return m(images, cam_ids, **kw)

    opt = torch.optim.SGD(m.main_parameters(), lr=lr)
    hopt = torch.optim.SGD(m.hmg_parameters(), lr=lr)
    stats = _step(m, x, y, c, [opt, hopt], forward=forward)
    assert calls["n"] == 2
    assert set(stats) == {"id", "arc", "hem", "triplet", "loss", "acc"}
    changed_hmg = 0
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), expect[n], rtol=1e-5, atol=1e-6, msg=n)
        if n.startswith("hmg.") and not torch.equal(p0[n], p.detach()):
            changed_hmg += 1
    assert changed_hmg > 0
    assert not torch.equal(p0["classifier.weight"], m.classifier.weight.detach())
    # the HMG gradient of pass 2 differs from pass 1's (it is taken at the updated backbone)
    assert not torch.allclose(g1["hmg.conv_layers.0.0.weight"], g2["hmg.conv_layers.0.0.weight"])


def test_single_pass_update_matches_reference():
    lr = 0.05
    m = _model(update_mode="single_pass").train()
    x, y, c = _batch()
    p0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = _grads(copy.deepcopy(m), x, y, c)
    calls = {"n": 0}

    def forward(images, cam_ids=None, **kw):
        calls["n"] += 1
        return m(images, cam_ids, **kw)

    opt = torch.optim.SGD(m.main_parameters(), lr=lr)
    hopt = torch.optim.SGD(m.hmg_parameters(), lr=lr)
    _step(m, x, y, c, [opt, hopt], forward=forward)
    assert calls["n"] == 1
    for n, p in m.named_parameters():
        exp = p0[n] - lr * g[n] if n in g else p0[n]
        torch.testing.assert_close(p.detach(), exp, rtol=1e-5, atol=1e-6, msg=n)


def test_param_sets_constant_hmg_lr():
    m = _model()
    s = dict(
        optimizer="SGD", base_lr=0.008, bias_lr_factor=2.0, weight_decay=1e-4, weight_decay_bias=1e-4,
        momentum=0.9, max_epochs=10, warmup_epochs=2, warmup_lr_factor=0.01, min_lr_factor=0.002,
    )
    (opt, hopt), scheds = build_method_optimizers(SPEC, m, s)
    assert len(scheds) == 1
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    in_h = {id(p) for g in hopt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.main_parameters()}
    assert in_h == {id(p) for p in m.hmg_parameters()}
    assert sorted(g["lr"] for g in hopt.param_groups) == pytest.approx([0.008, 0.016])
    for epoch in range(1, 11):
        for sch in scheds:
            sch.step(epoch)
        assert sorted(g["lr"] for g in hopt.param_groups) == pytest.approx([0.008, 0.016])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.008 * 0.002)  # main: cosine to lr_min
    m2 = _model(hmg_lr_schedule="cosine")
    (_, hopt2), scheds2 = build_method_optimizers(SPEC, m2, s)
    assert len(scheds2) == 2
    scheds2[1].step(10)
    assert hopt2.param_groups[0]["lr"] == pytest.approx(0.008 * 0.002)


def test_engine_step_with_clipping_returns_float_stats():
    m = _model().train()
    x, y, c = _batch()
    opt = torch.optim.SGD(m.main_parameters(), lr=0.01)
    hopt = torch.optim.SGD(m.hmg_parameters(), lr=0.01)
    before = m.hmg.fc.weight.detach().clone()
    stats = _step(m, x, y, c, [opt, hopt], grad_clip=1.0)
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["loss"] == pytest.approx(sum(stats[k] for k in ("id", "arc", "hem", "triplet")), rel=1e-5)
    assert not torch.equal(before, m.hmg.fc.weight)
    with pytest.raises(OccReIDError, match="passes use optimisers"):
        TrainStep(SPEC, m, [opt])  # the two-pass update needs the HMG optimiser
    with pytest.raises(OccReIDError, match="accum_steps"):
        TrainStep(SPEC, m, [opt, hopt], accum_steps=2)


# ------------------------------------------------------------------------- retrieval


def test_retrieval_distance_hook():
    m = _model().eval()
    x, _, c = _batch()
    with torch.no_grad():
        out = m(x, c)
    q = {k: v[:3] for k, v in out.items()}
    g = {k: v[3:] for k, v in out.items()}
    dist = SPEC.retrieval_distance(m, q, g)
    assert isinstance(dist, MaskedCosineDistance) and dist.num_queries == 3
    # per-query reference: the query's mask on the normalised gallery features
    g_hat = F.normalize(g["feat"], dim=1)
    for i in range(3):
        s = F.normalize(q["mask"][i] * g_hat, dim=1) @ F.normalize(q["feat"][i], dim=0)
        torch.testing.assert_close(dist(i, i + 1)[0], torch.arccos(s.clamp(-1 + 1e-5, 1 - 1e-5)), rtol=0, atol=2e-6)


# ------------------------------------------------------------------ official checkpoints


def test_convert_official_state_dict_round_trip():
    m = _model()
    ours = m.state_dict()

    def to_official(k):
        if k.startswith("hmg.conv_layers."):
            return "base.ConvLayer." + k[len("hmg.conv_layers."):]
        if k.startswith("hmg.fc."):
            return "base.attfc." + k[len("hmg.fc."):]
        if k.startswith("backbone."):
            return "base." + k[len("backbone."):]
        return k

    official = {"module." + to_official(k): v for k, v in ours.items()}
    official["module.base.fc.weight"] = torch.zeros(1000, 32)  # unused ImageNet head: dropped
    converted = convert_official_state_dict(official)
    assert set(converted) == set(ours)
    m2 = _model(seed=5)
    m2.load_state_dict(converted, strict=True)
    assert torch.equal(m2.hmg.fc.weight, m.hmg.fc.weight)
    with pytest.raises(KeyError, match="unexpected key"):
        convert_official_state_dict({"center.centers": torch.zeros(1)})


def test_evaluate_features_uses_the_query_mask_distance():
    from occreid.evaluation import extract
    from occreid.evaluation import evaluate_rank

    m = _model().eval()
    x, y, c = _batch(n_ids=4, per_id=4)
    with torch.no_grad():
        out = m(x, c)
    feats = {**out, "pids": y, "camids": torch.arange(16) % 2}
    q = {k: v[0::4] for k, v in feats.items()}  # one query per id, camera 0
    g = {k: torch.cat([v[1::4], v[3::4]]) for k, v in feats.items()}  # camera 1 gallery images
    metrics = extract.evaluate_features(q, g, distance=lambda qq, gg: SPEC.retrieval_distance(m, qq, gg), max_rank=8)
    ref = evaluate_rank(
        MaskedCosineDistance(q["feat"], q["mask"], g["feat"])(0, 4).numpy(),
        q["pids"].numpy(), g["pids"].numpy(), q["camids"].numpy(), g["camids"].numpy(), max_rank=8,
    )
    assert metrics["mAP"] == pytest.approx(float(ref["mAP"]), abs=1e-9)
    assert metrics["rank1"] == pytest.approx(float(ref["cmc"][0]))


@pytest.mark.parametrize("mode", ["two_pass", "single_pass"])
def test_fp16_grad_scaler_and_clipping_keep_parameters_finite(mode):
    """fp16 autocast on CPU with a GradScaler (whose first scales overflow, so steps are
    skipped) and gradient clipping: a skipped step never writes NaN into either parameter set."""
    m = _model(update_mode=mode).train()
    x, y, c = _batch()
    opt = torch.optim.SGD(m.main_parameters(), lr=0.01)
    hopt = torch.optim.SGD(m.hmg_parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    for _ in range(3):
        _step(m, x, y, c, [opt, hopt], scaler=scaler, grad_clip=5.0, device=torch.device("cpu"), amp=torch.float16)
        bad = [n for n, t in m.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad
    assert scaler.get_scale() < 2.0**24  # overflowing steps were detected and skipped


# ----------------------------------------------------------------------------- ablation switches
_SOLVER = dict(base_lr=1e-3, bias_lr_factor=1.0, momentum=0.9, optimizer="AdamW", weight_decay=0.05,
               weight_decay_bias=0.05, max_epochs=2, warmup_epochs=1, warmup_lr_factor=0.1, min_lr_factor=0.01)


def test_without_masked_branch_is_the_baseline_loss_and_plain_retrieval():
    from occreid.evaluation.extract import query_gallery_distance

    m = _model(masked_branch=False, beta=0.0)
    assert m.hmg is None and m.hmg_parameters() == []
    assert not any(k.startswith("hmg.") for k in m.state_dict())
    x, y, c = _batch()
    m.train()
    out = m(x, c)
    assert out["mask"] is None and out["cos"] is None
    losses = m.loss(out, y)
    assert set(losses) == {"id", "triplet"}
    torch.testing.assert_close(losses["id"], F.cross_entropy(out["logits"], y))  # full weight, not alpha
    torch.testing.assert_close(losses["triplet"], TripletLoss(None)(out["global_feat"], y))
    opts, scheds = build_method_optimizers(SPEC, m, _SOLVER)
    assert len(opts) == 1 and len(scheds) == 1 and SPEC.passes(m) == ((0,),)
    before = copy.deepcopy(m.state_dict())
    stats = _step(m, x, y, c, opts)
    assert set(stats) >= {"id", "triplet", "loss", "acc"}
    assert not torch.equal(before["classifier.weight"], m.state_dict()["classifier.weight"])
    m.eval()
    q = m(x, c)
    assert set(q) == {"feat"} and SPEC.retrieval_distance(m, q, q) is None
    assert SPEC.retrieval(m) == {"distance": "cosine"}
    qn = F.normalize(q["feat"], dim=1)
    d = query_gallery_distance(q, q, distance=lambda qq, gg: SPEC.retrieval_distance(m, qq, gg), metric="cosine")
    torch.testing.assert_close(torch.as_tensor(d), 1 - qn @ qn.t(), atol=1e-5, rtol=0)


def test_angular_margin_on_the_plain_branch_and_softmax_masked_branch():
    x, y, c = _batch()
    m = _model(cls_margin=0.5, arc_margin=0.0)
    m.train()
    out = m(x, c)
    feat_bn = m.bottleneck(out["global_feat"])
    cos = F.normalize(feat_bn, dim=1) @ F.normalize(m.classifier.weight, dim=1).t()
    torch.testing.assert_close(out["cos_cls"], cos, atol=1e-6, rtol=0)
    losses = m.loss(out, y)
    want_id = 0.5 * F.cross_entropy(arcface_logits(cos, y, scale=30.0, margin=0.5), y)
    torch.testing.assert_close(losses["id"], want_id, atol=1e-5, rtol=1e-5)
    # Mask-Cls "S": margin 0 is the softmax over 30 * masked cosine.
    torch.testing.assert_close(losses["arc"], 0.5 * F.cross_entropy(30.0 * out["cos"], y), atol=1e-5, rtol=1e-5)


def test_hidden_channels_and_hard_margin_triplet_switches():
    m = _model(hmg_hidden_channels=(24, 16, 32), triplet_margin=0.3)
    convs = [mod for mod in m.hmg.conv_layers.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 16, 32]
    x, y, c = _batch()
    m.train()
    out = m(x, c)
    assert out["mask"].shape == (x.shape[0], m.feature_dim)
    torch.testing.assert_close(m.loss(out, y)["triplet"], TripletLoss(0.3)(out["global_feat"], y))
