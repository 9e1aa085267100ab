"""Gallery index and search: exact top-k (cosine and DPM masked cosine) against plain references,
faiss (exact and approximate), DPM re-scoring with its exactness certificate, the index file,
model checks, and the index/search commands."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from occreid.retrieval import GalleryIndex, exact_topk, masked_numerator_queries, masked_rescore
from occreid.utils.io import OccReIDError

from test_inference import make_tiny_checkpoint

# faiss is optional (the test extra installs it): only the tests that use it need it
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss-cpu is not installed")


def clustered(n: int, d: int, ids: int, noise: float, seed: int):
    """Unit vectors around ``ids`` random centres (a re-id gallery's structure)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, d, generator=g)
    lab = torch.randint(0, ids, (n,), generator=g)
    return F.normalize(centres[lab] + noise * torch.randn(n, d, generator=g), dim=1), centres


def reference_dpm_similarity(q, m, g, mask_query=False, renorm=True):
    """dpm-official.md §7 written as the official per-query loop: s_ij = q̂_i · normalize(m_i ⊙ ĝ_j)."""
    rows = []
    gn = F.normalize(g.double(), dim=1)
    for i in range(q.shape[0]):
        qi = F.normalize(q[i].double(), dim=0)
        mi = m[i].double()
        if mask_query:
            qi = qi * mi
            if renorm:
                qi = F.normalize(qi, dim=0)
        gi = gn * mi
        if renorm:
            gi = F.normalize(gi, dim=1)
        rows.append(gi @ qi)
    return torch.stack(rows).float()


def random_masks(q: int, d: int, seed: int, spread: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(spread * torch.randn(q, d, generator=g))


def same_sets(a_idx, b_idx):
    return all(set(x) == set(y) for x, y in zip(a_idx.tolist(), b_idx.tolist()))


# ---------------------------------------------------------------------------------- exact search


def test_exact_topk_cosine_matches_full_matrix_with_block_merging():
    g, _ = clustered(1000, 16, 50, 0.5, 0)
    q = torch.randn(7, 16)
    s, i = exact_topk(q, g * 3.0, 10, block_size=97)  # unnormalised gallery, odd blocks
    ref = F.normalize(q, dim=1) @ g.t()
    rs, ri = ref.topk(10, dim=1)
    assert torch.equal(i, ri)
    assert torch.allclose(s, rs, atol=1e-6)
    s_all, _ = exact_topk(q, g, 5000)  # k larger than the gallery
    assert s_all.shape == (7, 1000)


@pytest.mark.parametrize("mask_query,mask_norm", [(False, "mask_then_normalize"), (True, "mask_then_normalize"),
                                                  (False, "normalize_then_mask")])
def test_exact_topk_dpm_matches_the_official_loop(mask_query, mask_norm):
    g, _ = clustered(600, 24, 30, 0.6, 1)
    q = torch.randn(6, 24)
    m = random_masks(6, 24, 2)
    s, i = exact_topk(q, g, 8, query_masks=m, mask_query=mask_query, mask_norm=mask_norm, block_size=64)
    ref = reference_dpm_similarity(q, m, g, mask_query, renorm=mask_norm == "mask_then_normalize")
    rs, ri = ref.topk(8, dim=1)
    assert torch.equal(i, ri)
    assert torch.allclose(s, rs, atol=1e-5)
    # the masked ranking is not the plain cosine ranking (the masks matter)
    _, ci = exact_topk(q, g, 8)
    assert not torch.equal(ci, i)


def test_masked_rescore_equals_reference_for_candidates():
    g, _ = clustered(200, 12, 10, 0.5, 3)
    q = torch.randn(4, 12)
    m = random_masks(4, 12, 4)
    cand = torch.randint(0, 200, (4, 9))
    cand[1, 3] = -1
    a = masked_numerator_queries(q, m)
    s = masked_rescore(a, m, g, cand)
    ref = reference_dpm_similarity(q, m, g)
    expect = ref.gather(1, cand.clamp_min(0))
    assert s[1, 3] == float("-inf")
    ok = cand >= 0
    assert torch.allclose(s[ok], expect[ok], atol=1e-5)


# ---------------------------------------------------------------------------------------- faiss


@needs_faiss
def test_faiss_flat_equals_exact_and_ivf_recall():
    g, centres = clustered(4000, 32, 200, 0.7, 5)
    q = F.normalize(centres[:20] + 0.7 * torch.randn(20, 32, generator=torch.Generator().manual_seed(6)), dim=1)
    index = GalleryIndex(g)
    ex = index.search(q, 10, backend="exact")
    index.add_faiss("flat")
    fl = index.search(q, 10)
    assert fl.backend == "faiss:flat"
    assert torch.equal(fl.indices, ex.indices) and torch.allclose(fl.scores, ex.scores, atol=1e-5)
    index.add_faiss("ivf", nlist=32, nprobe=8)
    ivf = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ivf.indices.tolist(), ex.indices.tolist())])
    print(f"IVF32 nprobe 8 recall@10 on 4,000 x 32: {recall:.3f}")
    assert recall >= 0.9
    index.faiss.set_nprobe(32)  # every cell: exact again
    assert same_sets(index.search(q, 10).indices, ex.indices)


@needs_faiss
def test_dpm_faiss_flat_is_exact_and_certificate_is_sound():
    g, centres = clustered(3000, 32, 150, 0.6, 7)
    q = F.normalize(centres[:40] + 0.6 * torch.randn(40, 32, generator=torch.Generator().manual_seed(8)), dim=1)
    m = random_masks(40, 32, 9, spread=0.7)
    retrieval = {"distance": "dpm_masked_cosine", "mask_norm": "mask_then_normalize", "mask_query": False}
    index = GalleryIndex(g, retrieval=retrieval)
    ref = reference_dpm_similarity(q, m, g)
    rs, ri = ref.topk(10, dim=1)
    exact = index.search({"feat": q, "mask": m}, 10)
    assert exact.backend == "exact" and torch.equal(exact.indices, ri)

    index.add_faiss("flat")
    raw = index.search(q, 10, query_masks=m, rescore=4, exact_fallback=False)
    cert = raw.certified
    assert cert is not None and cert.dtype == torch.bool
    assert 0 < int(cert.sum()) < 40, "the test should exercise both certified and uncertified queries"
    # soundness: every certified query is exactly right
    assert torch.equal(raw.indices[cert], ri[cert])
    full = index.search(q, 10, query_masks=m, rescore=4)  # with the exact fallback
    assert bool(full.certified.all())
    assert torch.equal(full.indices, ri) and torch.allclose(full.scores, rs, atol=1e-5)

    # constant masks: masked cosine = cosine, every query certified by the bound
    const = index.search(q, 10, query_masks=torch.full_like(m, 0.5), exact_fallback=False)
    assert bool(const.certified.all())
    assert torch.equal(const.indices, (q @ g.t()).topk(10, dim=1).indices)


@needs_faiss
def test_dpm_faiss_ivf_recall_and_normalize_then_mask_exact():
    g, centres = clustered(5000, 32, 250, 0.6, 10)
    q = F.normalize(centres[:30] + 0.6 * torch.randn(30, 32, generator=torch.Generator().manual_seed(11)), dim=1)
    m = random_masks(30, 32, 12, spread=1.0)
    index = GalleryIndex(g, retrieval={"distance": "dpm_masked_cosine", "mask_norm": "mask_then_normalize"})
    _, ri = reference_dpm_similarity(q, m, g).topk(10, dim=1)
    index.add_faiss("ivf", nlist=50, nprobe=10)
    approx = index.search(q, 10, query_masks=m)
    assert approx.certified is None  # approximate: no certificate, recall measured instead
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.indices.tolist(), ri.tolist())])
    print(f"DPM via IVF50 nprobe 10 + re-scoring of 100 candidates, recall@10: {recall:.3f}")
    assert recall >= 0.9

    # normalize_then_mask: the masked score *is* the inner product -> exact MIPS
    index.retrieval["mask_norm"] = "normalize_then_mask"
    index.add_faiss("flat")
    res = index.search(q, 10, query_masks=m, exact_fallback=False)
    ref2 = reference_dpm_similarity(q, m, g, renorm=False)
    assert bool(res.certified.all()) and torch.equal(res.indices, ref2.topk(10, dim=1).indices)


# ------------------------------------------------------------------------------ index file/checks


@needs_faiss
def test_save_load_roundtrip_and_errors(tmp_path):
    g, _ = clustered(300, 16, 20, 0.5, 13)
    paths = [f"g/{i:04d}_c1_x.jpg" for i in range(300)]
    index = GalleryIndex(g, paths, pids=torch.arange(300) // 15, camids=torch.zeros(300),
                         extras={"mask": torch.rand(300, 16)}, model={"fingerprint": "abc", "method": "baseline"})
    index.add_faiss("ivf", nlist=8, nprobe=8)
    index.save(tmp_path / "g.idx")
    back = GalleryIndex.load(tmp_path / "g.idx")
    assert back.paths == paths and torch.equal(back.features, index.features)
    assert torch.equal(back.pids, index.pids) and back.extras["mask"].dtype == torch.float16
    assert back.faiss is not None and back.faiss.kind == "ivf" and back.faiss.nprobe == 8
    q = g[:3]
    a, b = index.search(q, 5), back.search(q, 5)
    assert torch.equal(a.indices, b.indices)
    assert b.paths[0][0] == paths[0] and b.pids[0, 0] == 0  # a gallery item finds itself first

    with pytest.raises(OccReIDError, match="gallery index not found"):
        GalleryIndex.load(tmp_path / "missing.idx")
    junk = tmp_path / "junk.idx"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(OccReIDError, match="cannot read gallery index"):
        GalleryIndex.load(junk)
    ck = make_tiny_checkpoint(tmp_path / "model.pth")
    with pytest.raises(OccReIDError, match="not an occreid gallery index.*model checkpoint"):
        GalleryIndex.load(ck)


def test_search_input_errors():
    g, _ = clustered(50, 8, 5, 0.5, 14)
    index = GalleryIndex(g, model={"method": "baseline", "backbone": "vit_nano", "fingerprint": "f1"})
    with pytest.raises(OccReIDError, match=r"query features must be \[Q, 8\]"):
        index.search(torch.randn(2, 16))
    with pytest.raises(OccReIDError, match="no faiss index"):
        index.search(torch.randn(2, 8), backend="faiss")

    class Other:
        fingerprint, method, backbone, source = "f2", "dpm", "vit_nano", "other.pth"

    with pytest.raises(OccReIDError, match="built with another model.*f1.*f2"):
        index.check_model(Other())
    dpm = GalleryIndex(g, retrieval={"distance": "dpm_masked_cosine"})
    with pytest.raises(OccReIDError, match="query masks"):
        dpm.search(torch.randn(2, 8))
    with pytest.raises(OccReIDError, match="2 paths"):
        GalleryIndex(g, ["a", "b"])


# ---------------------------------------------------------------------------- with a real model


def _write_gallery(root: Path, n_ids: int = 4, per_id: int = 3):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for pid in range(1, n_ids + 1):
        base = rng.integers(0, 256, (1, 1, 3))
        for k in range(per_id):
            img = np.clip(base + rng.normal(0, 20, (32, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"{pid:04d}_c{k + 1}s1_{k:06d}_00.jpg")


@needs_faiss
def test_index_and_search_commands(tmp_path, capsys):
    from occreid.cli import main

    ck = make_tiny_checkpoint(tmp_path / "model.pth", "dpm")
    other = make_tiny_checkpoint(tmp_path / "other.pth", "dpm", seed=1)
    _write_gallery(tmp_path / "gallery")
    query = str(tmp_path / "gallery" / "0002_c1s1_000000_00.jpg")
    assert main(["index", "--weights", str(ck), "--images", str(tmp_path / "gallery"), "--out",
                 str(tmp_path / "g.idx"), "--device", "cpu", "--faiss", "flat"]) == 0
    assert "indexed 12 images" in capsys.readouterr().out
    index = GalleryIndex.load(tmp_path / "g.idx")
    assert index.is_masked and index.pids.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert index.camids.tolist()[:3] == [0, 1, 2] and index.extras["mask"].shape == (12, 32)

    assert main(["search", "--index", str(tmp_path / "g.idx"), "--query", query, "--topk", "3",
                 "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    top = res[0]["results"]
    assert len(top) == 3 and top[0]["path"] == query and top[0]["pid"] == 2
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    # same ranking as the Python API, exact backend
    from occreid import FeatureExtractor

    ex = FeatureExtractor(ck, device="cpu")
    api = index.search(ex.extract(query), 3, backend="exact")
    assert [r["index"] for r in top] == api.indices[0].tolist()
    assert np.allclose([r["score"] for r in top], api.scores[0].numpy(), atol=1e-6)
    # DPM scores the query against the *masked* gallery: even the query's own image is below 1
    assert 0.99 < top[0]["score"] < 1.0

    # an index built with another model, a missing image, a non-image file
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "g.idx"), "--weights", str(other), "--query", query]) == 2
    assert "built with another model" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "g.idx"), "--query", str(tmp_path / "none.jpg")]) == 2
    assert "image file not found" in capsys.readouterr().err
    (tmp_path / "fake.jpg").write_text("hello")
    assert main(["search", "--index", str(tmp_path / "g.idx"), "--query", str(tmp_path / "fake.jpg")]) == 2
    assert "not an image file" in capsys.readouterr().err
    assert main(["index", "--weights", str(ck), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "e.idx")]) == 2
    assert "gallery folder not found" in capsys.readouterr().err
    # an index passed where weights are expected
    assert main(["index", "--weights", str(tmp_path / "g.idx"), "--images", str(tmp_path / "gallery"),
                 "--out", str(tmp_path / "e.idx")]) == 2
    assert "is a gallery index" in capsys.readouterr().err
