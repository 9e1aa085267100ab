"""DPM components against golden vectors produced by the official code (tests/data/dpm_*.pt).

See /work/shared/golden/README.md (copied facts): every file is a flat dict of CPU tensors with
``in.*`` inputs, ``param.*`` official state-dict entries and ``out.*`` official outputs. Some
inputs are compact strided views: they are only used out of place here.
Tolerances: a few times the float32-vs-float64 differences listed in the README.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from occreid.evaluation.masked_distance import MaskedCosineDistance, masked_distance_matrix
from occreid.losses.arcface import arcface_logits
from occreid.losses.hem import head_orthogonality_loss
from occreid.methods.dpm.model import (
    HeadEnrichModule,
    HierarchicalMaskGenerator,
    MaskedPrototypeClassifier,
    cls_patch_attention_logits,
    convert_official_state_dict,
    tokens_to_maps,
)

DATA = Path(__file__).parent / "data"


def _load(name: str) -> dict:
    return torch.load(DATA / f"dpm_{name}.pt", weights_only=True)


def _params(g: dict) -> dict:
    return {k[len("param."):]: v for k, v in g.items() if k.startswith("param.")}


# ------------------------------------------------------------------------------------- HMG


@pytest.fixture(scope="module")
def hmg_golden():
    return _load("hmg")


def _official_hmg(g: dict) -> HierarchicalMaskGenerator:
    hmg = HierarchicalMaskGenerator(768, num_inputs=4)
    sd = convert_official_state_dict(_params(g))
    sd = {k[len("hmg."):]: v for k, v in sd.items() if k.startswith("hmg.")}
    hmg.load_state_dict(sd, strict=True)
    return hmg


def _maps(g: dict):
    return [g[f"in.block{b}"] for b in (2, 4, 10, 12)]


def test_hmg_golden_eval(hmg_golden):
    g = hmg_golden
    hmg = _official_hmg(g).eval()
    with torch.no_grad():
        out = hmg.forward_intermediates(_maps(g))
    torch.testing.assert_close(out["pooled"], g["out.pooled_eval"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["logits"], g["out.logits_eval"], rtol=0, atol=6e-5)
    torch.testing.assert_close(out["mask"], g["out.mask_eval"], rtol=0, atol=1.5e-5)


def test_hmg_golden_train_mode_and_running_stats(hmg_golden):
    g = hmg_golden
    hmg = _official_hmg(g).train()
    with torch.no_grad():
        out = hmg.forward_intermediates(_maps(g))
    torch.testing.assert_close(out["pooled"], g["out.pooled_train"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["logits"], g["out.logits_train"], rtol=0, atol=6e-5)
    torch.testing.assert_close(out["mask"], g["out.mask_train"], rtol=0, atol=1.5e-5)
    # train and eval masks really differ, so BN mode matters (README: up to 0.67)
    assert (g["out.mask_train"] - g["out.mask_eval"]).abs().max() > 0.3
    sd = hmg.state_dict()
    for i in (0, 2, 4):
        pre = f"out.after_train.base.ConvLayer.{i}.1."
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(
                sd[f"conv_layers.{i}.1.{stat}"], g[pre + stat], rtol=1e-5, atol=1e-5
            )
        assert torch.equal(sd[f"conv_layers.{i}.1.num_batches_tracked"], g[pre + "num_batches_tracked"])


def test_hmg_golden_batch_of_one_fixed(hmg_golden):
    """Official path: ``torch.squeeze`` of the pooled [1, D, 1, 1] map gives [D] and breaks the
    rest of the forward. Fixed path: [1, D], equal to the row of the batched eval run."""
    g = hmg_golden
    hmg = _official_hmg(g).eval()
    maps0 = [m[:1] for m in _maps(g)]
    with torch.no_grad():
        feat = hmg.conv_layers(torch.cat(maps0, dim=1))
        official_pooled = torch.squeeze(F.adaptive_max_pool2d(feat, 1))
        out = hmg.forward_intermediates(maps0)
    assert official_pooled.shape == (768,)  # the official shape bug
    assert out["mask"].shape == (1, 768)
    torch.testing.assert_close(out["mask"], g["out.mask_eval"][:1], rtol=0, atol=1.5e-5)
    torch.testing.assert_close(out["pooled"], g["out.pooled_eval"][:1], rtol=0, atol=1e-4)


def _official_grid(num_patches: int):
    """The official heuristic: Ww = int(sqrt(D / 2)), Hh = int(D / Ww)."""
    ww = int(math.sqrt(num_patches / 2))
    return int(num_patches / ww), ww


def test_token_map_layout_matches_golden_and_grid_heuristic_bug(hmg_golden):
    g = hmg_golden
    m = g["in.block2"]  # [2, 768, 22, 11]; map[b, c, y, x] = token[b, 1 + 11 y + x, c]
    cls = torch.zeros(2, 1, 768)
    tokens = torch.cat([cls, m.reshape(2, 768, -1).transpose(1, 2)], dim=1)
    assert torch.equal(tokens[1, 1 + 11 * 3 + 4], m[1, :, 3, 4])
    assert torch.equal(tokens_to_maps(tokens, (22, 11)), m)
    # the heuristic is right on the official grids ...
    assert _official_grid(242) == (22, 11)
    assert _official_grid(210) == (21, 10)
    assert _official_grid(128) == (16, 8)
    # ... and wrong for 384x128 at stride 12 (31x10): the official reshape fails there, ours
    # takes the grid from the backbone.
    assert _official_grid(310) != (31, 10)
    t = torch.randn(1, 1 + 310, 8)
    assert tokens_to_maps(t, (31, 10)).shape == (1, 8, 31, 10)
    with pytest.raises(ValueError, match="patch grid"):
        tokens_to_maps(t, _official_grid(310))


# ------------------------------------------------------------------------------------- HEM


def test_hem_golden_logits_and_loss():
    g = _load("hem")
    logits = cls_patch_attention_logits(g["in.q_cls"], g["in.k_patch"])
    torch.testing.assert_close(logits, g["out.attn_logits"], rtol=0, atol=3e-6)
    loss = head_orthogonality_loss(logits)
    torch.testing.assert_close(loss, g["out.loss"], rtol=1e-5, atol=0)
    # the module with the official switches gives the same loss from the stored logits
    torch.testing.assert_close(HeadEnrichModule()(g["out.attn_logits"]), g["out.loss"], rtol=1e-6, atol=0)
    # the official reduction is a sum over the batch: the mean variant divides by B = 3
    mean = head_orthogonality_loss(g["out.attn_logits"], reduction="mean")
    torch.testing.assert_close(mean * 3, g["out.loss"], rtol=1e-6, atol=0)
    # the paper's softmax variant is a different number (not silently the same)
    soft = HeadEnrichModule(attention="softmax")(g["out.attn_logits"])
    assert not torch.isclose(soft, g["out.loss"], rtol=1e-2)


# --------------------------------------------------------------------------------- ArcFace


def _official_marcface_loop(feat, mask, weight, labels, s, m):
    """The official MArcface, per sample as coded (unclamped sine), written plainly."""
    w_hat = F.normalize(weight, dim=1)
    rows = []
    for i in range(feat.shape[0]):
        p = F.normalize(mask[i] * w_hat, dim=1)
        rows.append(F.normalize(feat[i : i + 1], dim=1) @ p.t())
    cos = torch.cat(rows, 0)
    sin = torch.sqrt(1.0 - cos**2)
    phi = cos * math.cos(m) - sin * math.sin(m)
    phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
    one_hot = torch.zeros_like(cos).scatter_(1, labels.view(-1, 1), 1.0)
    return (one_hot * phi + (1.0 - one_hot) * cos) * s


def test_arcface_golden():
    g = _load("arcface")
    clf = MaskedPrototypeClassifier(768, 10)
    clf.load_state_dict({"weight": g["param.classifier.weight"]})
    logits, cos = clf(g["in.feat"], g["in.mask"])
    s, m = float(g["meta.s"]), float(g["meta.m"])
    arc = arcface_logits(cos, g["in.labels"], scale=s, margin=m)
    torch.testing.assert_close(logits, g["out.logits_plain"], rtol=0, atol=5e-6)
    torch.testing.assert_close(arc, g["out.logits_arc"], rtol=0, atol=2e-5)
    torch.testing.assert_close(F.cross_entropy(logits, g["in.labels"]), g["out.loss_plain"], rtol=0, atol=3e-6)
    torch.testing.assert_close(F.cross_entropy(arc, g["in.labels"]), g["out.loss_arc"], rtol=0, atol=3e-6)
    # row 5 takes the fallback branch: target logit = 30 (cos - m sin(pi - m))
    y5 = int(g["in.labels"][5])
    c5 = cos[5, y5]
    assert c5 < math.cos(math.pi - m)
    torch.testing.assert_close(arc[5, y5], 30 * (c5 - m * math.sin(math.pi - m)), rtol=0, atol=1e-5)
    assert arc[5, y5] < -35
    # the plain per-sample reference of the official code agrees as well
    ref = _official_marcface_loop(g["in.feat"], g["in.mask"], g["param.classifier.weight"], g["in.labels"], s, m)
    torch.testing.assert_close(ref, g["out.logits_arc"], rtol=0, atol=2e-5)


def test_arcface_official_nan_vs_fixed():
    """Official path: under half precision |cos| can round to > 1 and sqrt(1 - cos^2) is NaN.
    Fixed path: the cosine is computed in float32 and the sine from a clamped 1 - cos^2."""
    cos = torch.tensor([[1.001, 0.2], [-0.3, 0.9995]], dtype=torch.float16)
    labels = torch.tensor([0, 1])
    official_sin = torch.sqrt(1.0 - cos.float() ** 2)
    assert torch.isnan(official_sin[0, 0])
    ours = arcface_logits(cos, labels)
    assert torch.isfinite(ours).all()


# ------------------------------------------------------------------------------- retrieval


@pytest.fixture(scope="module")
def ret_golden():
    return _load("retrieval")


def test_retrieval_golden_distmat(ret_golden):
    g = ret_golden
    dist = MaskedCosineDistance(g["in.qf"], g["in.qm"], g["in.gf"])
    assert dist.num_queries == 5
    torch.testing.assert_close(dist(0, 5), g["out.distmat"], rtol=0, atol=5e-7)
    torch.testing.assert_close(dist(2, 4), g["out.distmat"][2:4], rtol=0, atol=5e-7)
    full = masked_distance_matrix(g["in.qf"], g["in.qm"], g["in.gf"], chunk_size=2)
    torch.testing.assert_close(full, g["out.distmat"], rtol=0, atol=5e-7)
    # the evaluator's distance (features normalised first) is the same thing
    torch.testing.assert_close(full, g["out.evaluator_distmat"], rtol=0, atol=5e-7)


def test_retrieval_golden_query_mask_changes_ranking(ret_golden):
    """Query 4: the unmasked cosine prefers distractor gallery 9, the masked distance the true
    match (gallery 7); gallery masks play no part."""
    g = ret_golden
    d = MaskedCosineDistance(g["in.qf"], g["in.qm"], g["in.gf"])(4, 5)[0]
    plain = 1 - F.normalize(g["in.qf"][4:5], dim=1) @ F.normalize(g["in.gf"], dim=1).t()
    assert int(plain[0].argmin()) == 9
    assert int(d.argmin()) == 7


def test_retrieval_golden_ranking_metrics(ret_golden):
    from occreid.evaluation import rank
    g = ret_golden
    dist = MaskedCosineDistance(g["in.qf"], g["in.qm"], g["in.gf"])
    res = rank.evaluate_rank(
        dist, g["in.q_pids"], g["in.g_pids"], g["in.q_camids"], g["in.g_camids"], max_rank=12
    )
    assert torch.equal(torch.as_tensor(res["cmc"], dtype=torch.float32), g["out.cmc"])
    assert abs(float(res["mAP"]) - 127 / 198) < 1e-7
    assert abs(float(res["mAP"]) - float(g["out.mAP"])) < 1e-6
    assert res["num_valid_queries"] == 3
