"""k-reciprocal re-ranking against a plain dense reference written from the paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from occreid.evaluation import re_ranking
from occreid.evaluation import rerank as rerank_mod


def reference_re_ranking(qf, gf, k1, k2, lam):
    """Zhong et al. CVPR'17 with dense M × M arrays and per-image loops, in float64.

    Follows the reference code (TransReID's re_ranking): squared Euclidean distance over
    its row maximum, N(i, k) = the k+1 nearest images (self included), R(i, k) k-reciprocal, the 2/3 rule
    with ⌊k1/2⌉ for the expansion, Gaussian weights, mean query expansion over the k2
    nearest, Jaccard = 1 − Σmin/Σmax, and (1 − λ)·Jaccard + λ·distance.
    """
    x = np.concatenate([qf, gf]).astype(np.float64)
    nq, m = len(qf), len(x)
    sq = (x ** 2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * x @ x.T
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")

    top = {k: [set(row[: k + 1].tolist()) for row in rank] for k in {k1, int(np.around(k1 / 2))}}

    def reciprocal(i, k):  # R(i, k) = {j ∈ N(i, k) : i ∈ N(j, k)}
        return [j for j in rank[i, : k + 1].tolist() if i in top[k][j]]

    kh = int(np.around(k1 / 2))
    v = np.zeros((m, m))
    for i in range(m):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, kh)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        idx = sorted(expanded)
        w = np.exp(-dist[i, idx])
        v[i, idx] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(m)])
    jaccard = np.zeros((nq, m))
    for i in range(nq):
        for j in range(m):
            jaccard[i, j] = 1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum()
    return ((1 - lam) * jaccard + lam * dist[:nq])[:, nq:]


def clustered(seed, nq=20, ng=60, n_ids=8, dim=16, noise=0.8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_ids, dim))
    qf = centers[rng.integers(0, n_ids, nq)] + noise * rng.normal(size=(nq, dim))
    gf = centers[rng.integers(0, n_ids, ng)] + noise * rng.normal(size=(ng, dim))
    return qf, gf


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (50, 15, 0.3), (7, 3, 0.5),
                                        (5, 1, 0.2), (3, 2, 0.0), (9, 4, 1.0)])
def test_matches_dense_reference(k1, k2, lam):
    qf, gf = clustered(0)
    ref = reference_re_ranking(qf, gf, k1, k2, lam)
    out = re_ranking(torch.from_numpy(qf), torch.from_numpy(gf), k1, k2, lam, chunk_size=7)
    assert out.shape == (20, 60) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-10)
    out32 = re_ranking(qf.astype(np.float32), gf.astype(np.float32), k1, k2, lam)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=0, atol=1e-5)


def test_expansion_rule_is_exercised():
    """The test problem must reach the R* expansion and leave reciprocal sets non-trivial."""
    qf, gf = clustered(0)
    x = torch.from_numpy(np.concatenate([qf, gf]))
    nn, _, _ = rerank_mod._neighbours(x, 21, 20, 16)
    recip = rerank_mod._reciprocal_mask(nn, 21, slice(0, 80))
    recip_h = rerank_mod._reciprocal_mask(nn, 11, slice(0, 80))
    idx, valid = rerank_mod._expanded_sets(nn, slice(0, 80), recip, recip_h)
    assert (recip.sum(1) < 21).any()  # not every neighbour is reciprocal
    assert (valid.sum(1) > recip.sum(1)).any()  # some R* grew beyond R(i, k1)


def test_small_memory_budget_gives_same_result(monkeypatch):
    """Every step works piecewise; pieces of a few elements give the same numbers."""
    qf, gf = clustered(1, nq=12, ng=30)
    full = re_ranking(qf, gf, 6, 3, 0.3)
    monkeypatch.setattr(rerank_mod, "_BUDGET", 400)  # several pieces in every step
    pieces = re_ranking(qf, gf, 6, 3, 0.3, chunk_size=5)
    np.testing.assert_allclose(pieces.numpy(), full.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(full.numpy(), reference_re_ranking(qf, gf, 6, 3, 0.3),
                               rtol=0, atol=1e-10)


def test_neighbour_lists_longer_than_the_data_are_cut():
    qf, gf = clustered(2, nq=3, ng=5)
    np.testing.assert_allclose(re_ranking(qf, gf, 20, 6, 0.3).numpy(),
                               reference_re_ranking(qf, gf, 20, 6, 0.3), rtol=0, atol=1e-10)


def test_bad_arguments():
    qf, gf = clustered(3, nq=4, ng=6)
    with pytest.raises(ValueError, match="k1"):
        re_ranking(qf, gf, k1=0)
    with pytest.raises(ValueError, match="k2"):
        re_ranking(qf, gf, k2=1.5)
    with pytest.raises(ValueError, match="lambda_value"):
        re_ranking(qf, gf, lambda_value=1.5)
    with pytest.raises(ValueError, match="widths differ"):
        re_ranking(qf, gf[:, :3])
    with pytest.raises(ValueError, match="at least one"):
        re_ranking(qf[:0], gf)
