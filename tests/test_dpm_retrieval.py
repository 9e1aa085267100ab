"""DPM query-mask retrieval: batched matrix products vs the official per-query loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from occreid.methods.dpm import retrieval as md  # the module whose constants the tests patch
from occreid.evaluation.masked_distance import MaskedCosineDistance, masked_distance_matrix
from occreid.losses.arcface import masked_cosine


def _official_loop(qf, qm, gf, distance="arccos", mask_query=False, renorm=True):
    """Plain reference of ``cosine_single``: for query i, mask every normalised gallery feature
    with m_i, re-normalise, take the cosine with the normalised query; arccos of the clipped
    cosine."""
    q_hat = F.normalize(qf, dim=1)
    g_hat = F.normalize(gf, dim=1)
    rows = []
    for i in range(qf.shape[0]):
        q = q_hat[i]
        if mask_query:
            q = qm[i] * q
            q = F.normalize(q, dim=0) if renorm else q
        g = qm[i] * g_hat
        g = F.normalize(g, dim=1) if renorm else g
        rows.append(g @ q)
    s = torch.stack(rows)
    if distance == "arccos":
        return torch.arccos(s.clamp(-1 + 1e-5, 1 - 1e-5))
    return 1 - s


def _problem(nq=9, ng=13, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    qf = torch.randn(nq, d, generator=g, dtype=dtype) * 4
    gf = torch.randn(ng, d, generator=g, dtype=dtype) * 4
    qm = torch.rand(nq, d, generator=g, dtype=dtype)
    return qf, qm, gf


@pytest.mark.parametrize("distance", ["arccos", "cosine"])
@pytest.mark.parametrize("mask_query", [False, True])
@pytest.mark.parametrize("mask_norm", ["mask_then_normalize", "normalize_then_mask"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_vectorised_equals_per_query_loop(distance, mask_query, mask_norm, backend):
    qf, qm, gf = _problem()
    ref = _official_loop(qf, qm, gf, distance, mask_query, mask_norm == "mask_then_normalize")
    kw = dict(distance=distance, mask_query=mask_query, mask_norm=mask_norm, backend=backend)
    got = masked_distance_matrix(qf, qm, gf, **kw)
    assert got.dtype == torch.float64 and got.shape == (9, 13)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    got32 = masked_distance_matrix(qf.float(), qm.float(), gf.float(), **kw)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, ref.float(), rtol=0, atol=2e-5 if distance == "arccos" else 2e-6)


def test_ranking_identical_to_loop_and_ties_absent():
    qf, qm, gf = _problem(nq=20, ng=40, d=8, seed=3)
    ref = _official_loop(qf, qm, gf)
    got = masked_distance_matrix(qf, qm, gf, chunk_size=6)
    assert torch.equal(got.argsort(dim=1), ref.argsort(dim=1))


@pytest.mark.parametrize("chunk", [1, 2, 7, 9, 100])
@pytest.mark.parametrize("gallery_chunk", [None, 1, 4, 13, 100])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_chunk_size_does_not_change_values(chunk, gallery_chunk, backend):
    for dtype, atol in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
        qf, qm, gf = _problem(dtype=dtype)
        full = MaskedCosineDistance(qf, qm, gf, backend="torch")(0, 9)
        got = masked_distance_matrix(qf, qm, gf, chunk_size=chunk, gallery_chunk=gallery_chunk, backend=backend)
        assert got.shape == (9, 13) and got.dtype == dtype
        torch.testing.assert_close(got, full, rtol=0, atol=atol)


# one formula: retrieval = the training masked cosine (occreid.losses.arcface.masked_cosine)

_OPTIONS = [(mq, mn) for mq in (False, True) for mn in ("mask_then_normalize", "normalize_then_mask")]


def _edge_problem(dtype):
    """Random features and masks plus the eps corners: an all-zero mask row, a mask with one
    channel on, a zero query feature and a zero gallery feature."""
    qf, qm, gf = _problem(nq=7, ng=11, d=12, seed=8, dtype=dtype)
    qm[1] = 0
    qm[2] = 0
    qm[2, 3] = 1
    qf[4] = 0
    gf[5] = 0
    return qf, qm, gf


@pytest.mark.parametrize("mask_query,mask_norm", _OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_is_the_training_masked_cosine_bit_for_bit(mask_query, mask_norm, dtype):
    """The gallery in the prototypes' place: masked_cosine(q, m, G) itself (one gallery piece),
    and the distances are arccos / 1 − of exactly those values."""
    qf, qm, gf = _edge_problem(dtype)
    train = masked_cosine(qf, qm, gf, mask_feature=mask_query, mask_norm=mask_norm)
    kw = dict(mask_query=mask_query, mask_norm=mask_norm, backend="torch")
    dist = MaskedCosineDistance(qf, qm, gf, **kw)
    assert torch.equal(dist.similarity(0, 7), train)
    assert torch.equal(dist(0, 7), torch.arccos(train.clamp(-1 + 1e-5, 1 - 1e-5)))
    assert torch.equal(MaskedCosineDistance(qf, qm, gf, distance="cosine", **kw)(0, 7), 1.0 - train)
    part = masked_cosine(qf[2:5], qm[2:5], gf, mask_feature=mask_query, mask_norm=mask_norm)
    assert torch.equal(dist.similarity(2, 5), part)
    pieces = MaskedCosineDistance(qf, qm, gf, gallery_chunk=4, **kw)  # each piece: masked_cosine on it
    for g0 in range(0, 11, 4):
        piece = masked_cosine(qf, qm, gf[g0:g0 + 4], mask_feature=mask_query, mask_norm=mask_norm)
        assert torch.equal(pieces.similarity(0, 7)[:, g0:g0 + 4], piece)


@pytest.mark.parametrize("mask_query,mask_norm", _OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_numpy_backend_equals_the_training_masked_cosine(mask_query, mask_norm, dtype):
    """The CPU backend restates masked_cosine's steps in numpy: equal to the rounding of the
    matrix products, for every option, dtype and eps corner."""
    qf, qm, gf = _edge_problem(torch.float64)
    qf, qm, gf = qf.to(dtype), qm.to(dtype), gf.to(dtype)
    train = masked_cosine(qf, qm, gf, mask_feature=mask_query, mask_norm=mask_norm)
    dist = MaskedCosineDistance(qf, qm, gf, mask_query=mask_query, mask_norm=mask_norm, backend="numpy")
    got = dist.similarity(0, 7)
    assert got.dtype == train.dtype and got.shape == train.shape
    atol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, train, rtol=0, atol=atol)
    torch.testing.assert_close(dist(0, 7), torch.arccos(train.clamp(-1 + 1e-5, 1 - 1e-5)), rtol=0,
                               atol=1e-13 if dtype == torch.float64 else 2e-5)
    cos = MaskedCosineDistance(qf, qm, gf, mask_query=mask_query, mask_norm=mask_norm, distance="cosine")
    torch.testing.assert_close(cos(0, 7), 1.0 - train, rtol=0, atol=atol)
    torch.testing.assert_close(dist.similarity(2, 5), train[2:5], rtol=0, atol=atol)
    assert torch.isfinite(got).all()


def test_numpy_backend_in_pieces(monkeypatch):
    """The denominator is computed a few query rows at a time; the buffer is reused."""
    qf, qm, gf = _problem(nq=9, ng=13, d=16, seed=9)
    full = MaskedCosineDistance(qf, qm, gf)(0, 9)
    monkeypatch.setattr(md, "DEN_PIECE_ELEMENTS", 30)  # 2 query rows of 13 per piece
    monkeypatch.setattr(md, "_DEN_MIN_ROWS", 1)
    dist = MaskedCosineDistance(qf, qm, gf)
    torch.testing.assert_close(dist(0, 9), full, rtol=0, atol=1e-14)
    torch.testing.assert_close(dist(4, 7), full[4:7], rtol=0, atol=1e-14)
    torch.testing.assert_close(masked_distance_matrix(qf, qm, gf, chunk_size=4), full, rtol=0, atol=1e-14)
    assert dist.backend == "numpy" and "backend='numpy'" in repr(dist)


def test_empty_gallery_and_empty_block():
    qf, qm, gf = _problem()
    assert MaskedCosineDistance(qf, qm, gf[:0])(0, 9).shape == (9, 0)
    assert MaskedCosineDistance(qf, qm, gf, gallery_chunk=4)(3, 3).shape == (0, 13)


def test_block_callable_contract():
    qf, qm, gf = _problem()
    dist = MaskedCosineDistance(qf, qm, gf)
    assert dist.num_queries == 9 and len(dist) == 9 and dist.num_gallery == 13
    full = dist(0, 9)
    torch.testing.assert_close(dist(3, 7), full[3:7], rtol=0, atol=1e-12)
    assert dist(4, 4).shape == (0, 13)
    with pytest.raises(IndexError, match="out of range"):
        dist(5, 10)
    assert "num_queries=9" in repr(dist)


def test_gallery_mask_and_query_mask_semantics():
    """Only the query's mask acts, on the gallery side: a channel the query mask switches off
    cannot influence the distance; the query feature itself is not masked."""
    d = 6
    qf = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    qm = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])  # channels 4, 5 masked out
    g_true = torch.tensor([[1.0, 1.0, 0.0, 0.0, 5.0, 5.0]])  # agrees where the mask is on
    g_dist = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])  # closer without the mask
    gf = torch.cat([g_true, g_dist])
    plain = 1 - F.normalize(qf, dim=1) @ F.normalize(gf, dim=1).t()
    assert plain[0, 1] < plain[0, 0]
    s = MaskedCosineDistance(qf, qm, gf, distance="cosine")(0, 1)
    assert s[0, 0] < s[0, 1]
    torch.testing.assert_close(s[0, 0], torch.tensor(0.0), rtol=0, atol=1e-6)
    assert qf.shape[1] == d


def test_numpy_and_half_inputs():
    qf, qm, gf = _problem(dtype=torch.float32)
    ref = masked_distance_matrix(qf, qm, gf)
    got = masked_distance_matrix(qf.numpy(), qm.numpy(), gf.numpy())
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, ref)
    half = masked_distance_matrix(qf.half(), qm.half(), gf.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, rtol=0, atol=5e-3)


def test_errors():
    qf, qm, gf = _problem()
    with pytest.raises(ValueError, match="q_mask must have the shape"):
        MaskedCosineDistance(qf, qm[:, :4], gf)
    with pytest.raises(ValueError, match="widths differ"):
        MaskedCosineDistance(qf, qm, gf[:, :4])
    with pytest.raises(ValueError, match="distance"):
        MaskedCosineDistance(qf, qm, gf, distance="euclidean")
    with pytest.raises(ValueError, match="2-D"):
        MaskedCosineDistance(qf[0], qm, gf)
    with pytest.raises(ValueError, match="floating-point"):
        MaskedCosineDistance(np.ones((2, 3), dtype=np.int64), qm, gf)
    with pytest.raises(ValueError, match="chunk_size"):
        masked_distance_matrix(qf, qm, gf, chunk_size=0)
    with pytest.raises(ValueError, match="gallery_chunk"):
        MaskedCosineDistance(qf, qm, gf, gallery_chunk=0)
    with pytest.raises(ValueError, match="backend"):
        MaskedCosineDistance(qf, qm, gf, backend="cupy")


def test_evaluator_accepts_the_block_callable():
    from occreid.evaluation import rank
    qf, qm, gf = _problem(nq=12, ng=30, d=8, seed=5)
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(0, 5, 12), rng.integers(0, 5, 30)
    q_cams, g_cams = rng.integers(0, 3, 12), rng.integers(0, 3, 30)
    dist = MaskedCosineDistance(qf, qm, gf)
    a = rank.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, chunk_size=5)
    b = rank.evaluate_rank(dist(0, 12).numpy(), q_pids, g_pids, q_cams, g_cams, max_rank=10)
    np.testing.assert_allclose(a["cmc"], b["cmc"])
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)
    # and with the masked distance in gallery pieces
    c = rank.evaluate_rank(MaskedCosineDistance(qf, qm, gf, gallery_chunk=7), q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert c["mAP"] == pytest.approx(b["mAP"], abs=1e-12)
