"""compute_distance / DistanceBlocks / normalize_features against direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from occreid.evaluation import (
    DistanceBlocks,
    EvaluationInputError,
    compute_distance,
    evaluate_rank,
    normalize_features,
)


def feats(seed, nq=9, ng=23, d=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(nq, d)) * 3, rng.normal(size=(ng, d)) * 3


def direct_sq_euclidean(q, g):
    return ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)


def direct_cosine(q, g):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    return 1 - qn @ gn.T


def test_euclidean_is_squared_euclidean():
    q, g = feats(0)
    d = compute_distance(torch.from_numpy(q), torch.from_numpy(g))
    assert d.dtype == torch.float64 and d.shape == (9, 23)
    np.testing.assert_allclose(d.numpy(), direct_sq_euclidean(q, g), rtol=1e-12, atol=1e-10)
    d32 = compute_distance(q.astype(np.float32), g.astype(np.float32), "euclidean")
    assert d32.dtype == torch.float32
    np.testing.assert_allclose(d32.numpy(), direct_sq_euclidean(q, g), rtol=1e-5, atol=1e-4)


def test_cosine_and_normalized_euclidean():
    q, g = feats(1)
    cos = compute_distance(q, g, "cosine")
    np.testing.assert_allclose(cos.numpy(), direct_cosine(q, g), atol=1e-12)
    # TransReID: euclidean on L2-normalised features = 2 − 2 cos
    ne = compute_distance(q, g, "euclidean", normalize=True)
    np.testing.assert_allclose(ne.numpy(), 2 * direct_cosine(q, g), atol=1e-12)
    # cosine ignores the feature norm; normalize=True changes nothing for it
    np.testing.assert_allclose(compute_distance(q * 5, g, "Cosine", normalize=True).numpy(),
                               cos.numpy(), atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 4096])
def test_chunking_changes_nothing_but_rounding(chunk):
    q, g = feats(2, nq=13)
    q32, g32 = torch.from_numpy(q).float(), torch.from_numpy(g).float()
    for metric in ("euclidean", "cosine"):
        full = compute_distance(q32, g32, metric, chunk_size=4096)
        part = compute_distance(q32, g32, metric, chunk_size=chunk)
        # a GEMM of another shape may round differently: 1 ulp of float32
        np.testing.assert_allclose(part.numpy(), full.numpy(), rtol=3e-7, atol=1e-6)


def test_half_inputs_accumulate_in_float32():
    q, g = feats(3, d=64)
    qh, gh = torch.from_numpy(q).half(), torch.from_numpy(g).half()
    d = compute_distance(qh, gh)
    assert d.dtype == torch.float32
    exact = direct_sq_euclidean(qh.double().numpy(), gh.double().numpy())
    np.testing.assert_allclose(d.numpy(), exact, rtol=1e-5, atol=1e-3)
    # a half GEMM would round every result to ~3 significant digits; fp32 keeps ~7
    assert np.abs(d.numpy() - exact).max() < np.abs(exact).max() * 1e-5


def test_numpy_follows_tensor_device_and_output_is_torch():
    q, g = feats(4)
    d = compute_distance(q.astype(np.float32), torch.from_numpy(g).float())
    assert isinstance(d, torch.Tensor) and d.device.type == "cpu"


def test_distance_blocks_match_dense_and_plug_into_evaluate_rank():
    q, g = feats(5, nq=17, ng=40)
    rng = np.random.default_rng(0)
    qp, gp = rng.integers(0, 4, 17), rng.integers(0, 4, 40)
    qc, gc = rng.integers(0, 3, 17), rng.integers(0, 3, 40)
    blocks = DistanceBlocks(q, g, "cosine")
    assert blocks.num_queries == 17 and len(blocks) == 17
    dense = compute_distance(q, g, "cosine")
    np.testing.assert_allclose(blocks(3, 9).numpy(), dense[3:9].numpy(), rtol=0, atol=1e-12)
    a = evaluate_rank(blocks, qp, gp, qc, gc, max_rank=10, chunk_size=5)
    b = evaluate_rank(dense, qp, gp, qc, gc, max_rank=10)
    np.testing.assert_array_equal(a["cmc"], b["cmc"])
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-15)


def test_normalize_features():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    n = normalize_features(x)
    np.testing.assert_allclose(n.numpy(), [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]])
    h = normalize_features(torch.tensor([[300.0, 400.0]], dtype=torch.float16))
    assert h.dtype == torch.float16  # computed in float32 (300² overflows half), kept half
    np.testing.assert_allclose(h.float().numpy(), [[0.6, 0.8]], atol=1e-3, rtol=0)


def test_bad_inputs_are_explained():
    q, g = feats(6)
    with pytest.raises(EvaluationInputError, match="Did you mean 'cosine'"):
        compute_distance(q, g, "cosin")
    with pytest.raises(ValueError, match="widths differ"):
        compute_distance(q, g[:, :-1])
    with pytest.raises(ValueError, match="2-D"):
        compute_distance(q[0], g)
    with pytest.raises(ValueError, match="floating-point"):
        compute_distance(q.astype(np.int64), g)
    with pytest.raises(ValueError, match="chunk_size"):
        compute_distance(q, g, chunk_size=0)
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        compute_distance(q.tolist(), g)
