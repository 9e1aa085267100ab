"""Triplet (batch-hard, soft margin / margin) and ID (label-smoothing CE) losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from occreid.losses import CrossEntropyLabelSmooth, TripletLoss, euclidean_dist, hard_example_mining
from occreid.utils import OccReIDError


def ref_dist(x, y):
    out = torch.empty(len(x), len(y), dtype=torch.float64)
    for i in range(len(x)):
        for j in range(len(y)):
            out[i, j] = math.sqrt(max(float(((x[i].double() - y[j].double()) ** 2).sum()), 1e-12))
    return out


def ref_mining(dist, labels):
    n = len(labels)
    ap = [max(float(dist[i, j]) for j in range(n) if labels[j] == labels[i]) for i in range(n)]
    an = [min((float(dist[i, j]) for j in range(n) if labels[j] != labels[i]), default=math.inf) for i in range(n)]
    return torch.tensor(ap), torch.tensor(an)


def ref_triplet(feats, labels, margin=None):
    """Per-anchor loop computed with differentiable ops (for value and gradient checks)."""
    terms = []
    for i in range(len(labels)):
        d = torch.stack([torch.sqrt(torch.clamp(((feats[i] - feats[j]) ** 2).sum(), min=1e-12))
                         for j in range(len(labels))])
        pos = d[labels == labels[i]].max()
        neg = d[labels != labels[i]].min()
        terms.append(torch.log1p(torch.exp(pos - neg)) if margin is None else torch.clamp(pos - neg + margin, min=0))
    return torch.stack(terms).mean()


# uneven identities: 3, 1 (an anchor whose only positive is itself), 2, 4 samples
LABELS = torch.tensor([5, 5, 5, 2, 7, 7, 9, 9, 9, 9])


def test_euclidean_dist_matches_loop_and_is_fp32():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 7, generator=g), torch.randn(4, 7, generator=g)
    torch.testing.assert_close(euclidean_dist(x, y).double(), ref_dist(x, y), rtol=1e-5, atol=1e-5)
    self_d = euclidean_dist(x, x).diagonal()
    assert (self_d < 1e-2).all() and (self_d >= 1e-6 - 1e-12).all()  # clamp at 1e-12 -> >= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = euclidean_dist(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), ref_dist(x.bfloat16().float(), y.bfloat16().float()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[m, d\]"):
        euclidean_dist(x, torch.randn(4, 6))


def test_hard_example_mining_any_number_per_identity():
    g = torch.Generator().manual_seed(1)
    dist = euclidean_dist(*(2 * [torch.randn(10, 6, generator=g)]))
    d_ap, d_an = hard_example_mining(dist, LABELS)
    ap, an = ref_mining(dist, LABELS)
    torch.testing.assert_close(d_ap, ap)
    torch.testing.assert_close(d_an, an)
    assert d_ap[3] == dist[3, 3]  # the singleton's hardest positive is itself (~1e-6)
    with pytest.raises(ValueError, match="square"):
        hard_example_mining(dist[:, :4], LABELS)
    with pytest.raises(ValueError, match="labels"):
        hard_example_mining(dist, LABELS[:5])


@pytest.mark.parametrize("margin", [None, 0.3])
def test_triplet_loss_value_and_gradient_vs_loop(margin):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(10, 8, generator=g)
    f1 = base.clone().requires_grad_(True)
    f2 = base.clone().double().requires_grad_(True)
    loss, d_ap, d_an = TripletLoss(margin)(f1, LABELS, return_dists=True)
    ref = ref_triplet(f2, LABELS, margin)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    ap, an = ref_mining(ref_dist(base, base), LABELS)
    torch.testing.assert_close(d_ap.double(), ap.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_an.double(), an.double(), rtol=1e-5, atol=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(f1.grad.double(), f2.grad, rtol=1e-4, atol=1e-6)
    assert isinstance(TripletLoss(margin)(base, LABELS), torch.Tensor)


def test_triplet_soft_margin_formula():
    # two identities on a line: d_ap = 1, d_an = 3 for anchors 0 and 2 ...
    feats = torch.tensor([[0.0], [1.0], [4.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    loss, d_ap, d_an = TripletLoss()(feats, labels, return_dists=True)
    torch.testing.assert_close(d_ap, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(d_an, torch.tensor([4.0, 3.0, 3.0, 4.0]))
    expect = (2 * math.log1p(math.exp(-3.0)) + 2 * math.log1p(math.exp(-2.0))) / 4
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert TripletLoss(margin=0.3)(feats, labels).item() == 0.0
    normed = TripletLoss(normalize_feature=True)(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]),
                                                 labels)
    # normalised: positives coincide (d_ap = 1e-6), negatives at sqrt(2)
    assert normed.item() == pytest.approx(math.log1p(math.exp(-(math.sqrt(2) - 1e-6))), rel=1e-5)


def test_triplet_without_negatives_is_zero_and_finite():
    feats = torch.randn(4, 5, requires_grad=True)
    labels = torch.zeros(4, dtype=torch.long)
    loss, _, d_an = TripletLoss()(feats, labels, return_dists=True)
    assert torch.isinf(d_an).all() and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(feats.grad).all()
    with pytest.raises(ValueError, match=r"feats \[N, D\]"):
        TripletLoss()(feats, labels[:3])
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=-1.0)


def test_triplet_under_autocast_is_fp32():
    feats = torch.randn(6, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = TripletLoss()(feats.bfloat16(), labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smooth_ce_vs_loop(eps):
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(6, 5, generator=g)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    loss = CrossEntropyLabelSmooth(5, eps)(logits, targets)
    # TransReID: t = (1-eps) onehot + eps/K; loss = sum_k mean_b(-t * log_softmax)
    logp = logits.double().log_softmax(1)
    total = 0.0
    for k in range(5):
        col = 0.0
        for b in range(6):
            t = (1 - eps) * float(targets[b] == k) + eps / 5
            col += -t * float(logp[b, k])
        total += col / 6
    assert loss.item() == pytest.approx(total, rel=1e-5)
    if eps == 0.0:
        torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    half = CrossEntropyLabelSmooth(5, eps)(logits.half(), targets)
    assert half.dtype == torch.float32


def test_label_smooth_ce_errors():
    ce = CrossEntropyLabelSmooth(4, 0.1)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        ce(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"targets of shape \[3\]"):
        ce(torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(OccReIDError, match=r"\[0, 3\].*from 0 to 4"):
        ce(torch.randn(3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="epsilon"):
        CrossEntropyLabelSmooth(4, 1.0)
    with pytest.raises(ValueError, match="num_classes"):
        CrossEntropyLabelSmooth(0)
