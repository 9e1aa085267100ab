"""FED components against plain reference computations written here (tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from occreid.data.npo import official_stripe_rule, stripe_mask, stripe_means
from occreid.losses.fed_losses import FED_LOSS_WEIGHTS, fed_losses, memory_contrastive_loss
from occreid.methods.fed.model import (
    FDM,
    OEM,
    FDMCrossAttention,
    GEGLUFeedForward,
    PostNormFeedForward,
    memory_search,
    part_pool,
)
from occreid.methods.fed.memory import IdentityMemory, mean_momentum_update, sequential_momentum_update
from occreid.utils import OccReIDError


# ------------------------------------------------------------------------------ stripe mask
def ref_official_rule(v: list) -> list:
    """The official per-sample rule, written from fed-official.md §2.2."""
    t = [1 if x > 0 else 0 for x in v]
    n = sum(t)
    if n == len(v) or n == 0:
        return [1.0] * len(v)
    if n == 1:
        return [1.0 - x for x in t]
    order = sorted(range(len(v)), key=lambda i: -v[i])
    v1, v2 = v[order[0]], v[order[1]]
    if v1 / v2 > 3:
        out = [1.0] * len(v)
        out[order[0]] = 0.0
        return out
    return [1.0 - x for x in t]


def test_official_rule_matches_reference_on_random_means():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 4, 6):
        v = torch.rand(300, n, generator=g)
        v[torch.rand(300, n, generator=g) < 0.5] = 0  # many untouched stripes
        v[:5] = 0
        got = official_stripe_rule(v)
        want = torch.tensor([ref_official_rule(row.tolist()) for row in v])
        assert torch.equal(got, want)


def _pair_with_box(h: int, w: int, top: int, left: int, bh: int, bw: int, value: float = 1.0):
    """Clean random image and a copy with a constant box pasted; returns d = sum_c |x - x'|."""
    g = torch.Generator().manual_seed(top * 1000 + left)
    x = torch.rand(3, h, w, generator=g) * 0.5  # < value everywhere: every box pixel changes
    x2 = x.clone()
    x2[:, top : top + bh, left : left + bw] = value
    return (x - x2).abs().sum(0)


def test_stripe_mask_rules_on_hand_made_pairs():
    H, W = 64, 32  # 4 stripes of 16 rows
    cases = {
        # name: (box, official mask, paper mask)
        "top 16 rows": ((0, 0, 16, W), [0, 1, 1, 1], [0, 1, 1, 1]),
        "top 20 rows (2nd stripe 4/16 covered)": ((0, 0, 20, W), [0, 1, 1, 1], [0, 1, 1, 1]),
        # ~1/3 of the 2nd stripe already counts as occluded for the official ratio test
        "top 22 rows (2nd stripe 6/16 covered)": ((0, 0, 22, W), [0, 0, 1, 1], [0, 1, 1, 1]),
        "bottom 28 rows (2nd stripe 12/16 = 3/4)": ((36, 0, 28, W), [1, 1, 0, 0], [1, 1, 1, 0]),
        "bottom 30 rows (2nd stripe 14/16 > 3/4)": ((34, 0, 30, W), [1, 1, 0, 0], [1, 1, 0, 0]),
        "vertical full height, 12 px wide": ((0, 20, H, 12), [1, 1, 1, 1], [1, 1, 1, 1]),
        "no occluder": ((0, 0, 0, 0), [1, 1, 1, 1], [1, 1, 1, 1]),
    }
    diffs, off, pap = [], [], []
    for (box, o, p) in cases.values():
        diffs.append(_pair_with_box(H, W, *box))
        off.append(o)
        pap.append(p)
    d = torch.stack(diffs)
    assert stripe_mask(d, 4, rule="official").tolist() == off
    assert stripe_mask(d, 4, rule="paper").tolist() == pap


def test_stripe_means_reference_and_any_height():
    d = torch.rand(2, 3, 40, 12)
    m = stripe_means(d, 4)
    assert m.shape == (2, 3, 4)
    torch.testing.assert_close(m, d.view(2, 3, 4, 10 * 12).mean(-1))
    odd = stripe_means(torch.rand(5, 30, 7), 4)  # 30 rows, not divisible by 4
    assert odd.shape == (5, 4)
    with pytest.raises(ValueError, match="unknown stripe-mask rule"):
        stripe_mask(d, 4, rule="bogus")


# ------------------------------------------------------------------------------ part pooling
def test_part_pool_rows_and_flat():
    B, gy, gx, D = 2, 8, 3, 5
    tokens = torch.randn(B, gy * gx, D)
    rows = part_pool(tokens, (gy, gx), 4, "rows")
    ref = tokens.view(B, 4, 2 * gx, D).mean(2)  # 2 grid rows per part
    torch.testing.assert_close(rows, ref)
    torch.testing.assert_close(part_pool(tokens, (gy, gx), 4, "flat"), ref)
    # 6 rows into 4 parts: adaptive bins [0,2), [1,3), [3,5), [4,6)
    t6 = torch.randn(B, 6 * gx, D)
    grid = t6.view(B, 6, gx, D)
    ref6 = torch.stack([grid[:, a:b].mean((1, 2)) for a, b in [(0, 2), (1, 3), (3, 5), (4, 6)]], 1)
    torch.testing.assert_close(part_pool(t6, (6, gx), 4, "rows"), ref6)
    with pytest.raises(ValueError, match="grid"):
        part_pool(tokens, (5, 5), 4)


# ------------------------------------------------------------------------------ OEM
def test_oem_matches_plain_computation():
    torch.manual_seed(0)
    P, D = 3, 16
    oem = OEM(D, P)
    parts = torch.randn(5, P, D)
    erased, scores = oem(parts)
    assert scores.shape == (5, P) and erased.shape == (5, P, D)
    for i in range(P):
        lin1, ln, lin2 = oem.heads[i][0], oem.heads[i][1], oem.heads[i][2]
        assert lin1.weight.shape == (D // 4, D)
        h = parts[:, i] @ lin1.weight.t() + lin1.bias
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias
        s = torch.sigmoid(h @ lin2.weight.t() + lin2.bias).squeeze(-1)
        torch.testing.assert_close(scores[:, i], s, rtol=0, atol=1e-6)
        torch.testing.assert_close(erased[:, i], parts[:, i] * s[:, None], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="OEM expects"):
        oem(torch.randn(5, P + 1, D))


# ------------------------------------------------------------------------------ memory search
def ref_search(x, mem_n, k, labels):
    out = []
    for i in range(x.shape[0]):
        sims = [(float(F.normalize(x[i], dim=0) @ mem_n[j]), j) for j in range(mem_n.shape[0])]
        ranked = [j for _, j in sorted(sims, key=lambda t: -t[0])]
        if labels is None:
            out.append(ranked[:k])
        else:
            top = ranked[: k + 1]
            own = int(labels[i])
            out.append([j for j in top if j != own] if own in top else top[:k])
    return torch.tensor(out)


def test_memory_search_excludes_own_identity_and_returns_k():
    g = torch.Generator().manual_seed(1)
    C, Fd, B, K = 12, 10, 9, 4
    mem_n = F.normalize(torch.randn(C, Fd, generator=g), dim=1)
    labels = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, Fd, generator=g)
    x[:3] = mem_n[labels[:3]] * 5 + 0.01 * x[:3]  # own centre ranked first
    lat, idx = memory_search(x, mem_n, K, labels)
    assert idx.shape == (B, K) and lat.shape == (B, K, Fd)
    assert not (idx == labels[:, None]).any()
    assert torch.equal(idx, ref_search(x, mem_n, K, labels))
    assert torch.equal(lat, mem_n[idx])
    lat_e, idx_e = memory_search(x, mem_n, K, None)
    assert torch.equal(idx_e, ref_search(x, mem_n, K, None))
    assert torch.equal(idx_e[:3, 0], labels[:3])  # eval mode keeps the own centre
    # k larger than the memory allows: clamped to C - 1 (training) / C (eval)
    assert memory_search(x, mem_n[:4], 8, labels % 4)[1].shape == (B, 3)
    assert memory_search(x, mem_n[:4], 8, None)[1].shape == (B, 4)


# ------------------------------------------------------------------------------ memory update
def ref_sequential(c, x, pids, m):
    c = c.clone()
    for xi, y in zip(x, pids):
        c[y] = m * c[y] + (1 - m) * xi
    return c


@pytest.mark.parametrize("m", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_closed_form_equals_sequential_loop(m):
    g = torch.Generator().manual_seed(2)
    C, Fd = 7, 5
    c = torch.randn(C, Fd, generator=g, dtype=torch.float64)
    pids = torch.tensor([3, 1, 3, 3, 0, 1, 3, 6, 6, 2])
    x = torch.randn(len(pids), Fd, generator=g, dtype=torch.float64)
    got = sequential_momentum_update(c, x, pids, m)
    torch.testing.assert_close(got, ref_sequential(c, x, pids, m), rtol=0, atol=1e-12)
    assert torch.equal(got[[4, 5]], c[[4, 5]])  # absent ids untouched


def test_mean_rule_and_module_update():
    g = torch.Generator().manual_seed(3)
    C, Fd, m = 5, 4, 0.2
    c = torch.randn(C, Fd, generator=g)
    pids = torch.tensor([1, 1, 4, 1])
    x = torch.randn(4, Fd, generator=g)
    ref = c.clone()
    ref[1] = m * c[1] + (1 - m) * x[[0, 1, 3]].mean(0)
    ref[4] = m * c[4] + (1 - m) * x[2]
    torch.testing.assert_close(mean_momentum_update(c, x, pids, m), ref)
    mem = IdentityMemory(C, Fd, momentum=m, update_rule="mean")
    mem.features.copy_(c)
    mem.update(x, pids)
    torch.testing.assert_close(mem.features, ref)
    seq = IdentityMemory(C, Fd, momentum=m)
    seq.features.copy_(c)
    seq.update(x, pids)
    torch.testing.assert_close(seq.features, ref_sequential(c, x, pids, m))
    with pytest.raises(ValueError, match="identity labels"):
        seq.update(x, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="update rule"):
        IdentityMemory(C, Fd, update_rule="ema")


def test_memory_initialisation():
    mem = IdentityMemory(3, 2)
    with pytest.raises(OccReIDError, match="not initialised"):
        mem.check_initialized()
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    pids = torch.tensor([0, 0, 2, 1, 1])
    mem.init_from_features(feats, pids)
    torch.testing.assert_close(mem.features, torch.tensor([[2.0, 3.0], [1.0, 1.5], [5.0, 0.0]]))
    assert bool(mem.initialized)
    mem.check_initialized()
    with pytest.raises(OccReIDError, match="no image of 1 identities"):
        IdentityMemory(3, 2).init_from_features(feats[:2], pids[:2] * 0 + torch.tensor([0, 2]))
    with pytest.raises(OccReIDError, match="relabel"):
        IdentityMemory(3, 2).init_from_features(feats, pids + 5)


# ------------------------------------------------------------------------------ FDM
def ref_attention(att: FDMCrossAttention, x, lat, merge: str):
    """Explicit per-sample, per-head loop over the module's weights."""
    B, K, width = lat.shape
    H = att.num_heads
    dh = width // H
    q_all = x @ att.q.weight.t()
    kv = lat @ att.kv.weight.t()
    heads = torch.zeros(B, H, dh)
    for b in range(B):
        for h in range(H):
            q = q_all[b, h * dh : (h + 1) * dh]
            k = kv[b, :, h * dh : (h + 1) * dh]
            v = kv[b, :, width + h * dh : width + (h + 1) * dh]
            a = torch.softmax(k @ q * att.scale, dim=0)
            heads[b, h] = a @ v
    if merge == "per_sample":
        merged = heads.reshape(B, width)
    else:  # official: [H, B, dh] flattened, read back as B rows
        flat = [heads[b, h] for h in range(H) for b in range(B)]
        merged = torch.cat(flat).view(B, width)
    return (merged @ att.proj.weight.t() + att.proj.bias).view(B, att.num_parts, att.dim)


@pytest.mark.parametrize("merge", ["official", "per_sample"])
@pytest.mark.parametrize("scale", ["official", "standard"])
def test_fdm_attention_matches_reference(merge, scale):
    torch.manual_seed(4)
    D, P, H, K, B = 8, 3, 4, 5, 3
    att = FDMCrossAttention(D, P, H, scale=scale, head_merge=merge)
    expected_scale = (D / H) ** -0.5 if scale == "official" else (D * P / H) ** -0.5
    assert math.isclose(att.scale, expected_scale)
    assert att.q.bias is None and att.kv.bias is None and att.proj.bias is not None
    x, lat = torch.randn(B, D * P), F.normalize(torch.randn(B, K, D * P), dim=-1)
    torch.testing.assert_close(att(x, lat), ref_attention(att, x, lat, merge), rtol=0, atol=1e-5)


def test_feed_forwards_and_fdm_composition():
    torch.manual_seed(5)
    D, P = 8, 4
    ffn = GEGLUFeedForward(D, mult=4)
    t = torch.randn(2, P, D)
    h = F.layer_norm(t, (D,), ffn.norm.weight, ffn.norm.bias) @ ffn.fc1.weight.t() + ffn.fc1.bias
    ref = (h[..., : 4 * D] * F.gelu(h[..., 4 * D :])) @ ffn.fc2.weight.t() + ffn.fc2.bias
    torch.testing.assert_close(ffn(t), ref, rtol=0, atol=1e-6)
    post = PostNormFeedForward(D, mult=2)
    ref_post = F.layer_norm(
        t + F.gelu(t @ post.fc1.weight.t() + post.fc1.bias) @ post.fc2.weight.t() + post.fc2.bias,
        (D,), post.norm.weight, post.norm.bias,
    )
    torch.testing.assert_close(post(t), ref_post, rtol=0, atol=1e-6)

    fdm = FDM(D, P, num_heads=2)
    x, lat, s = torch.randn(3, D * P), F.normalize(torch.randn(3, 6, D * P), dim=-1), torch.rand(3, P)
    out = fdm(x, lat, s)
    ref = fdm.ffn2(fdm.ffn1(fdm.attn(x, lat)) * s[..., None] + x.view(3, P, D))  # Eq. 7
    torch.testing.assert_close(out, ref)
    assert isinstance(FDM(D, P, 2, ffn_style="paper").ffn1, PostNormFeedForward)


# ------------------------------------------------------------------------------ losses
def test_memory_contrastive_loss_plain_formula():
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(6, 5, generator=g) * 3, torch.randn(4, 5, generator=g)
    pids = torch.tensor([0, 1, 2, 3, 1, 0])
    got = memory_contrastive_loss(x, pids, c, 0.05)
    xd, cd = x.double(), c.double()
    logits = (xd / xd.norm(dim=1, keepdim=True)) @ (cd / cd.norm(dim=1, keepdim=True)).t() / 0.05
    p = logits.exp()[torch.arange(6), pids] / (logits.exp().sum(1) + 1e-6)
    want = -(p + 1e-6).log().mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # gradient flows into x only
    xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
    memory_contrastive_loss(xr, pids, cr).backward()
    assert xr.grad is not None and cr.grad is None
    # large logits stay finite (official exp() without max subtraction would overflow fp16)
    assert torch.isfinite(memory_contrastive_loss(x.half(), pids, c.half(), 0.001))


def _fake_outputs(B=4, C=5, P=4, Fd=8, seed=7):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for head in ("oem", "fdm", "global"):
        for br in ("clean", "occ"):
            out[f"logits_{head}_{br}"] = torch.randn(B, C, generator=g)
    for head in ("oem", "fdm"):
        for br in ("clean", "occ"):
            out[f"feat_{head}_{br}"] = torch.randn(B, Fd, generator=g)
    out["scores_clean"], out["scores_occ"] = torch.rand(B, P, generator=g), torch.rand(B, P, generator=g)
    out["mask"] = (torch.rand(B, P, generator=g) > 0.5).float()
    return out, torch.tensor([0, 3, 3, 1]), torch.randn(C, Fd, generator=g)


def test_fed_loss_assembly_official_and_paper_weights():
    out, pids, mem = _fake_outputs()
    terms = fed_losses(out, pids, mem)
    assert set(terms) == set(FED_LOSS_WEIGHTS["official"])
    ce = lambda k: F.cross_entropy(out[k], pids)  # noqa: E731
    mc = lambda k: memory_contrastive_loss(out[k], pids, mem)  # noqa: E731
    total = (
        F.mse_loss(out["scores_clean"], torch.ones(4, 4)) + F.mse_loss(out["scores_occ"], out["mask"])
        + 0.5 * (ce("logits_oem_clean") + ce("logits_oem_occ"))
        + 0.5 * (ce("logits_fdm_clean") + ce("logits_fdm_occ"))
        + 0.5 * (ce("logits_global_clean") + ce("logits_global_occ"))
        + 1.0 * mc("feat_oem_clean") + 0.3 * mc("feat_oem_occ")
        + 0.5 * mc("feat_fdm_clean") + 0.5 * mc("feat_fdm_occ")
    )
    torch.testing.assert_close(sum(terms.values()), total)
    paper = fed_losses(out, pids, mem, weights="paper")
    torch.testing.assert_close(sum(paper.values()), 0.5 * sum(v / FED_LOSS_WEIGHTS["official"][k] for k, v in terms.items()))
    # separate FDM bank (paper): the FDM terms read it
    mem2 = torch.randn_like(mem)
    sep = fed_losses(out, pids, mem, mem2)
    torch.testing.assert_close(sep["mc_fdm_occ"], 0.5 * memory_contrastive_loss(out["feat_fdm_occ"], pids, mem2))
    torch.testing.assert_close(sep["mc_oem_occ"], terms["mc_oem_occ"])
    with pytest.raises(ValueError, match="unknown FED loss weights"):
        fed_losses(out, pids, mem, weights="eq10")
    with pytest.raises(ValueError, match="miss the keys"):
        fed_losses(out, pids, mem, weights={"mse_clean": 1.0})
