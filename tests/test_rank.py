"""evaluate_rank: CMC / mAP / mINP against a plain per-query reference and hand examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from occreid.evaluation import EvaluationInputError, RankResult, evaluate_rank
from occreid.evaluation import rank as rank_mod
from occreid.utils import OccReIDError

GOLDEN = Path(__file__).parent / "data" / "dpm_retrieval.pt"  # official DPM code (shared golden vectors)


# ------------------------------------------------------------------------------------------
# plain reference: TransReID eval_func / torchreid eval_market1501, one query at a time,
# extended with mINP, trapezoid AP, a pessimistic tie order and CMC padding.


def reference_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50,
                   cross_camera=True, ap_mode="noninterp", tie_break="stable",
                   sort_kind="stable"):
    distmat = np.asarray(distmat, dtype=np.float64)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    all_cmc, all_ap, all_inp, first, valid = [], [], [], [], []
    for qi in range(distmat.shape[0]):
        matches_row = (g_pids == q_pids[qi]).astype(np.int64)
        if tie_break == "pessimistic":  # sort by distance, then non-matches before matches
            order = np.lexsort((matches_row, distmat[qi]))
        else:
            order = np.argsort(distmat[qi], kind=sort_kind)
        matches = matches_row[order]
        if cross_camera:
            remove = (g_pids[order] == q_pids[qi]) & (g_camids[order] == q_camids[qi])
        else:
            remove = np.zeros(len(order), dtype=bool)
        orig_cmc = matches[~remove]
        if not np.any(orig_cmc):
            valid.append(False)
            continue
        valid.append(True)
        cmc = orig_cmc.cumsum()
        cmc[cmc > 1] = 1
        cmc = cmc[:max_rank].astype(np.float64)
        if len(cmc) < max_rank:  # pad with the last value (the reference crashes instead)
            cmc = np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1])])
        all_cmc.append(cmc)
        hits = np.where(orig_cmc == 1)[0]  # 0-based positions of the true matches
        num_rel = orig_cmc.sum()
        if ap_mode == "trapezoid":  # official Market-1501 compute_mAP
            ap = 0.0
            for i, r in enumerate(hits):
                prec = (i + 1) / (r + 1)
                old = i / r if r != 0 else 1.0
                ap += (1.0 / num_rel) * (old + prec) / 2
        else:
            tmp = orig_cmc.cumsum() / (np.arange(len(orig_cmc)) + 1.0)
            ap = (tmp * orig_cmc).sum() / num_rel
        all_ap.append(ap)
        all_inp.append(num_rel / (hits[-1] + 1))
        first.append(hits[0] + 1)
    nv = len(all_ap)
    return {
        "cmc": np.sum(all_cmc, axis=0) / nv if nv else None,
        "mAP": float(np.mean(all_ap)) if nv else None,
        "mINP": float(np.mean(all_inp)) if nv else None,
        "ap": np.array(all_ap), "inp": np.array(all_inp), "first": np.array(first),
        "valid": np.array(valid), "num_valid": nv,
    }


def random_problem(seed, nq=30, ng=120, n_ids=12, n_cams=4, noise=1.0, dim=8):
    """Features with identity structure, gallery distractors (pid -1 and 0) and
    same-camera entries; a few query ids absent from the gallery."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_ids + 3, dim))
    q_pids = rng.integers(0, n_ids + 2, nq)  # ids n_ids, n_ids+1 never in the gallery
    g_pids = rng.integers(0, n_ids, ng)
    g_pids[: ng // 10] = -1  # distractors
    q_cams, g_cams = rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)
    qf = centers[q_pids] + noise * rng.normal(size=(nq, dim))
    gf = centers[np.clip(g_pids, 0, None)] + noise * rng.normal(size=(ng, dim))
    dist = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    return dist, q_pids, g_pids, q_cams, g_cams


def assert_matches_reference(res, ref, per_query=True):
    np.testing.assert_allclose(res["cmc"], ref["cmc"], rtol=0, atol=1e-12)
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    assert res["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)
    assert res["num_valid_queries"] == ref["num_valid"]
    assert res["num_skipped_queries"] == len(ref["valid"]) - ref["num_valid"]
    if per_query:
        np.testing.assert_array_equal(res["valid_mask"], ref["valid"])
        np.testing.assert_array_equal(res["first_match_rank"], ref["first"])
        np.testing.assert_allclose(res["ap"], ref["ap"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(res["inp"], ref["inp"], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# agreement with the reference


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("ap_mode", ["noninterp", "trapezoid"])
def test_random_problems_match_reference(seed, ap_mode):
    dist, qp, gp, qc, gc = random_problem(seed)
    res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20, ap_mode=ap_mode,
                        chunk_size=7, return_per_query=True)
    ref = reference_eval(dist, qp, gp, qc, gc, max_rank=20, ap_mode=ap_mode)
    assert res["num_skipped_queries"] > 0  # the problem really has queries to skip
    assert_matches_reference(res, ref)
    # without ties the unstable (TransReID/torchreid default) argsort gives the same answer
    ref_qs = reference_eval(dist, qp, gp, qc, gc, max_rank=20, ap_mode=ap_mode,
                            sort_kind="quicksort")
    assert res["mAP"] == pytest.approx(ref_qs["mAP"], abs=1e-12)


@pytest.mark.parametrize("seed", [4, 5])
def test_heavy_ties_match_stable_and_pessimistic_references(seed):
    dist, qp, gp, qc, gc = random_problem(seed, nq=25, ng=90, n_ids=6)
    dist = np.round(dist / dist.max() * 6)  # 7 distinct values: ties everywhere
    for tie in ("stable", "pessimistic"):
        res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=15, tie_break=tie,
                            chunk_size=4, return_per_query=True)
        assert_matches_reference(res, reference_eval(dist, qp, gp, qc, gc, max_rank=15,
                                                     tie_break=tie))


def test_stable_tie_resolution_in_small_pieces(monkeypatch):
    """The sparse tie resolution works piece by piece (bounded memory on all-tied input)."""
    dist, qp, gp, qc, gc = random_problem(6, nq=20, ng=70, n_ids=5)
    dist = np.round(dist / dist.max() * 3)
    full = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10, return_per_query=True)
    monkeypatch.setattr(rank_mod, "_PIECE", 5)
    pieces = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10, return_per_query=True)
    np.testing.assert_array_equal(full["first_match_rank"], pieces["first_match_rank"])
    np.testing.assert_array_equal(full["ap"], pieces["ap"])
    assert_matches_reference(pieces, reference_eval(dist, qp, gp, qc, gc, max_rank=10))


PATHS = ["sparse", "dense", "torch", None]  # None: chosen per block


@pytest.fixture(params=PATHS, ids=lambda p: p or "auto")
def path(request, monkeypatch):
    """Force one evaluator path (numpy sparse / numpy dense / torch kernel / per block)."""
    monkeypatch.setattr(rank_mod, "_FORCE_PATH", request.param)
    return request.param


@pytest.mark.parametrize("torch_dense_fraction", [0, 10**9])  # per entry / dense search
def test_torch_search_variants_agree(monkeypatch, torch_dense_fraction):
    """The torch kernel searches relevant entries per entry or in one dense pass."""
    monkeypatch.setattr(rank_mod, "_FORCE_PATH", "torch")
    monkeypatch.setattr(rank_mod, "_TORCH_DENSE_FRACTION", torch_dense_fraction)
    for seed, rounding in ((16, None), (17, 4)):
        dist, qp, gp, qc, gc = random_problem(seed, nq=20, ng=80, n_ids=6)
        if rounding:
            dist = np.round(dist / dist.max() * rounding)
        for tie in ("stable", "pessimistic"):
            res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=15, tie_break=tie,
                                return_per_query=True)
            assert_matches_reference(res, reference_eval(dist, qp, gp, qc, gc, max_rank=15,
                                                         tie_break=tie))


def quality_problem(seed, noise, nq=40, ng=300, n_ids=25, n_cams=5, dim=16):
    """A small version of bench/eval_speed.py's sweep: noisy identity centres (noise sets
    the model quality) with camera offsets; some query ids are not in the gallery."""
    rng = np.random.default_rng(seed)
    g_pids = np.concatenate([np.arange(n_ids), rng.integers(0, n_ids, ng - n_ids)])
    g_cams = rng.integers(0, n_cams, ng)
    q_pids = rng.integers(0, n_ids + 2, nq)
    q_cams = rng.integers(0, n_cams, nq)
    centers = rng.normal(size=(n_ids + 2, dim))
    shift = 0.5 * rng.normal(size=(n_cams, dim))
    qf = centers[q_pids] + shift[q_cams] + noise * rng.normal(size=(nq, dim))
    gf = centers[g_pids] + shift[g_cams] + noise * rng.normal(size=(ng, dim))
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    return (1 - qf @ gf.T).astype(np.float32), q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("point", [0.1, 0.6, 1.0, 1.5, 3.0, "random"])
def test_every_path_matches_reference_over_the_quality_sweep(path, point):
    dist, qp, gp, qc, gc = quality_problem(20, 1.0 if point == "random" else point)
    if point == "random":
        dist = np.random.default_rng(21).random(dist.shape, dtype=np.float32)
    for ap_mode in ("noninterp", "trapezoid"):
        res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=30, chunk_size=16,
                            ap_mode=ap_mode, return_per_query=True)
        ref = reference_eval(dist, qp, gp, qc, gc, max_rank=30, ap_mode=ap_mode)
        assert res["num_skipped_queries"] > 0
        assert_matches_reference(res, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32])
def test_every_path_heavy_ties_both_rules(path, dtype):
    dist, qp, gp, qc, gc = random_problem(22, nq=25, ng=90, n_ids=6)
    dist = np.round(dist / dist.max() * 5).astype(dtype)  # 6 distinct values
    for tie in ("stable", "pessimistic"):
        res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=15, tie_break=tie,
                            chunk_size=6, return_per_query=True)
        assert_matches_reference(res, reference_eval(dist, qp, gp, qc, gc, max_rank=15,
                                                     tie_break=tie))


def test_every_path_all_distances_equal(path):
    """A constant model: every entry tied with every true match."""
    _, qp, gp, qc, gc = random_problem(23, nq=12, ng=40, n_ids=4)
    dist = np.ones((12, 40), dtype=np.float32)
    for tie in ("stable", "pessimistic"):
        res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=40, tie_break=tie,
                            return_per_query=True)
        assert_matches_reference(res, reference_eval(dist, qp, gp, qc, gc, max_rank=40,
                                                     tie_break=tie))


def test_every_path_signed_zeros_negative_and_infinite_distances(path):
    """-0.0 equals +0.0 (a tie, kept in gallery order), negative distances (e.g. negated
    similarities) and ±inf rank like any value."""
    dist, qp, gp, qc, gc = random_problem(24, nq=20, ng=60, n_ids=5)
    dist = (np.round(dist / dist.max() * 8) - 4).astype(np.float32)  # -4..4, ties at 0
    zero = dist == 0
    dist[zero & (np.arange(60) % 2 == 0)] = -0.0
    assert np.signbit(dist[zero]).any() and (~np.signbit(dist[zero])).any()
    dist[:, ::7] = np.inf
    dist[:, 3::11] = -np.inf
    for tie in ("stable", "pessimistic"):
        res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20, tie_break=tie,
                            return_per_query=True)
        assert_matches_reference(res, reference_eval(dist, qp, gp, qc, gc, max_rank=20,
                                                     tie_break=tie))


@pytest.mark.parametrize("max_rank", [1, 3, 50])
def test_every_path_short_gallery_and_small_max_rank(path, max_rank):
    dist, qp, gp, qc, gc = random_problem(25, nq=15, ng=9, n_ids=3)
    res = evaluate_rank(dist.astype(np.float32), qp, gp, qc, gc, max_rank=max_rank,
                        return_per_query=True)
    ref = reference_eval(dist.astype(np.float32), qp, gp, qc, gc, max_rank=max_rank)
    assert res.cmc.shape == (max_rank,)
    assert_matches_reference(res, ref)
    one = evaluate_rank(dist[:, :1], qp, gp[:1], qc, gc[:1], max_rank=max_rank,
                        cross_camera=False, return_per_query=True)  # one gallery item
    assert_matches_reference(one, reference_eval(dist[:, :1], qp, gp[:1], qc, gc[:1],
                                                 max_rank=max_rank, cross_camera=False))


def test_every_path_skipped_queries_and_skipped_blocks(path):
    """Blocks where no query has a same-pid item, or only junk, next to normal blocks."""
    dist, qp, gp, qc, gc = random_problem(26, nq=24, ng=70, n_ids=6)
    qp = qp.copy()
    qp[:8] = 99  # block 0: identity absent from the gallery
    qp[8:16] = gp[0]
    qc = qc.copy()
    qc[8:16] = gc[0]
    gp = gp.copy()
    gp[gp == gp[0]] = gp[0]
    gc = np.where(gp == gp[0], gc[0], gc)  # block 1: only junk (same pid, same camera)
    res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10, chunk_size=8,
                        return_per_query=True)
    assert not res.valid_mask[:16].any() and res.num_skipped_queries >= 16
    assert_matches_reference(res, reference_eval(dist, qp, gp, qc, gc, max_rank=10))


def test_every_path_cross_camera_off_and_many_matches(path):
    """cross_camera=False, and a distractor identity with most of the gallery."""
    dist, qp, gp, qc, gc = random_problem(27, nq=20, ng=120, n_ids=5)
    gp = gp.copy()
    gp[:80] = 0
    qp = qp.copy()
    qp[::3] = 0
    for cross in (True, False):
        res = evaluate_rank(dist.astype(np.float32), qp, gp, qc, gc, max_rank=20,
                            cross_camera=cross, chunk_size=7, return_per_query=True)
        assert_matches_reference(res, reference_eval(dist.astype(np.float32), qp, gp, qc,
                                                     gc, max_rank=20, cross_camera=cross))


def test_every_path_tie_resolution_in_small_pieces(path, monkeypatch):
    dist, qp, gp, qc, gc = random_problem(28, nq=20, ng=70, n_ids=5)
    dist = np.round(dist / dist.max() * 3).astype(np.float32)
    full = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10, return_per_query=True)
    monkeypatch.setattr(rank_mod, "_PIECE", 5)
    pieces = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10, return_per_query=True)
    np.testing.assert_array_equal(full["first_match_rank"], pieces["first_match_rank"])
    np.testing.assert_array_equal(full["ap"], pieces["ap"])
    assert_matches_reference(pieces, reference_eval(dist, qp, gp, qc, gc, max_rank=10))


def test_every_path_nan_names_the_query(path):
    dist, qp, gp, qc, gc = random_problem(29)
    bad = dist.astype(np.float32)
    bad[13, 5] = np.nan
    with pytest.raises(EvaluationInputError, match="query 13"):
        evaluate_rank(bad, qp, gp, qc, gc, chunk_size=4)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_thread_count_does_not_change_results(num_threads):
    dist, qp, gp, qc, gc = quality_problem(30, 1.0, nq=70)
    base = evaluate_rank(dist, qp, gp, qc, gc, chunk_size=8, num_threads=1,
                         return_per_query=True)
    res = evaluate_rank(dist, qp, gp, qc, gc, chunk_size=8, num_threads=num_threads,
                        return_per_query=True)
    for key in ("cmc", "ap", "inp", "first_match_rank", "valid_mask"):
        np.testing.assert_array_equal(res[key], base[key])
    calls = []  # a block function is still called once per block, in order

    def block(start, stop):
        calls.append(start)
        return dist[start:stop]

    lazy = evaluate_rank(block, qp, gp, qc, gc, chunk_size=8, num_threads=num_threads,
                         return_per_query=True)
    assert calls == list(range(0, 70, 8))
    np.testing.assert_array_equal(lazy["ap"], base["ap"])


def test_cpu_path_is_chosen_per_block(caplog):
    """A good model takes the sparse path, uniform random distances the dense one."""
    dist, qp, gp, qc, gc = quality_problem(31, 0.1, nq=64, ng=600, n_ids=60)
    rnd = np.random.default_rng(0).random(dist.shape, dtype=np.float32)
    with caplog.at_level("DEBUG", logger="occreid.evaluation.rank"):
        evaluate_rank(dist, qp, gp, qc, gc, chunk_size=32)
        evaluate_rank(rnd, qp, gp, qc, gc, chunk_size=32)
    good, bad = [r.getMessage() for r in caplog.records if "paths" in r.getMessage()]
    assert "{'sparse': 2}" in good and "{'dense': 2}" in bad


def test_integer_and_infinite_distances():
    dist, qp, gp, qc, gc = random_problem(18, nq=15, ng=50, n_ids=5)
    as_int = np.round(dist * 10).astype(np.int64)  # integer ranks/quantised scores
    for tie in ("stable", "pessimistic"):
        res = evaluate_rank(as_int, qp, gp, qc, gc, max_rank=10, tie_break=tie,
                            return_per_query=True)
        assert_matches_reference(res, reference_eval(as_int, qp, gp, qc, gc, max_rank=10,
                                                     tie_break=tie))
    inf = dist.copy()
    inf[:, ::3] = np.inf  # e.g. a masked-out gallery item: ranked last, still ranked
    res = evaluate_rank(inf, qp, gp, qc, gc, max_rank=10, return_per_query=True)
    assert_matches_reference(res, reference_eval(inf, qp, gp, qc, gc, max_rank=10))


def test_cross_camera_false_keeps_same_camera_matches():
    dist, qp, gp, qc, gc = random_problem(7)
    res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20, cross_camera=False,
                        return_per_query=True)
    assert_matches_reference(res, reference_eval(dist, qp, gp, qc, gc, max_rank=20,
                                                 cross_camera=False))
    on = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20)
    assert res["num_valid_queries"] >= on["num_valid_queries"]
    # camids are optional once the camera filter is off
    none = evaluate_rank(dist, qp, gp, None, None, max_rank=20, cross_camera=False)
    np.testing.assert_array_equal(none["cmc"], res["cmc"])
    with pytest.raises(ValueError, match="camids"):
        evaluate_rank(dist, qp, gp, None, None)


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
def test_chunk_size_does_not_change_results(chunk):
    dist, qp, gp, qc, gc = random_problem(8)
    base = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20, return_per_query=True)
    res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20, chunk_size=chunk,
                        return_per_query=True)
    for key in ("first_match_rank", "valid_mask", "cmc"):
        np.testing.assert_array_equal(res[key], base[key])
    for key in ("ap", "inp"):  # sums over the padded match lists: equal up to rounding
        np.testing.assert_allclose(res[key], base[key], rtol=0, atol=1e-15)
    assert res["mAP"] == pytest.approx(base["mAP"], abs=1e-15)


def test_torch_numpy_list_and_dtype_inputs_agree():
    dist, qp, gp, qc, gc = random_problem(9)
    base = evaluate_rank(dist.astype(np.float32), qp, gp, qc, gc, max_rank=20)
    t = evaluate_rank(torch.from_numpy(dist.astype(np.float32)), torch.from_numpy(qp),
                      torch.from_numpy(gp), torch.from_numpy(qc), torch.from_numpy(gc),
                      max_rank=20)
    lists = evaluate_rank(dist.astype(np.float32),
                          qp.tolist(), gp.tolist(), qc.tolist(), gc.tolist(), max_rank=20)
    strings = evaluate_rank(dist.astype(np.float32), [f"p{p}" for p in qp],
                            [f"p{p}" for p in gp], [f"c{c}" for c in qc],
                            [f"c{c}" for c in gc], max_rank=20)
    for other in (t, lists, strings):
        np.testing.assert_array_equal(other["cmc"], base["cmc"])
        assert other["mAP"] == base["mAP"]
    # half precision: evaluated exactly as its float32 up-cast
    half = dist.astype(np.float16)
    h = evaluate_rank(torch.from_numpy(half), qp, gp, qc, gc, max_rank=20)
    h32 = evaluate_rank(half.astype(np.float32), qp, gp, qc, gc, max_rank=20)
    assert h["mAP"] == h32["mAP"]
    # requires_grad tensors are fine (no autograd involved)
    g = evaluate_rank(torch.tensor(dist, requires_grad=True), qp, gp, qc, gc, max_rank=20)
    assert g["mAP"] == pytest.approx(base["mAP"], abs=1e-6)


def test_gallery_permutation_invariance_without_ties():
    dist, qp, gp, qc, gc = random_problem(10)
    perm = np.random.default_rng(0).permutation(len(gp))
    a = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20)
    b = evaluate_rank(dist[:, perm], qp, gp[perm], qc, gc[perm], max_rank=20)
    np.testing.assert_array_equal(a["cmc"], b["cmc"])
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-15)


# ------------------------------------------------------------------------------------------
# callable (block) distances: the hook for query-conditioned distances such as DPM's


def test_callable_block_distance_equals_dense():
    dist, qp, gp, qc, gc = random_problem(11)
    calls = []

    def block(start, stop):
        calls.append((start, stop))
        return torch.from_numpy(dist[start:stop])

    dense = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20, return_per_query=True)
    lazy = evaluate_rank(block, qp, gp, qc, gc, max_rank=20, chunk_size=8,
                         return_per_query=True)
    assert calls == [(0, 8), (8, 16), (16, 24), (24, 30)]
    for key in ("cmc", "ap", "inp", "first_match_rank"):
        np.testing.assert_array_equal(lazy[key], dense[key])

    class Blocks:  # the object form: num_queries + __call__, returning numpy
        num_queries = len(qp)

        def __call__(self, start, stop):
            return dist[start:stop]

    obj = evaluate_rank(Blocks(), qp, gp, qc, gc, max_rank=20)
    assert obj["mAP"] == dense["mAP"]


def test_callable_errors():
    dist, qp, gp, qc, gc = random_problem(12)
    with pytest.raises(ValueError, match=r"returned shape \(5, 119\)"):
        evaluate_rank(lambda s, e: dist[s:e, :-1], qp, gp, qc, gc, chunk_size=5)

    class Wrong:
        num_queries = 3

        def __call__(self, s, e):
            return dist[s:e]

    with pytest.raises(ValueError, match="num_queries=3"):
        evaluate_rank(Wrong(), qp, gp, qc, gc)


# ------------------------------------------------------------------------------------------
# hand-made cases


def _one_query(dist_row, g_pids, g_cams=None, **kw):
    g_pids = np.asarray(g_pids)
    g_cams = np.ones(len(g_pids), dtype=np.int64) if g_cams is None else np.asarray(g_cams)
    return evaluate_rank(np.asarray([dist_row], dtype=np.float64), [7], g_pids, [0], g_cams,
                         return_per_query=True, **kw)


def test_all_distances_equal_stable_vs_pessimistic():
    """Ecosystem §2.6-2: a single true match among 10 equal distances."""
    row = np.zeros(10)
    first = [7] + [1] * 9
    last = [1] * 9 + [7]
    r = _one_query(row, first, max_rank=10)
    assert r.rank1 == 1.0 and r.mAP == 1.0 and r.mINP == 1.0
    r = _one_query(row, last, max_rank=10)
    assert r.rank1 == 0.0 and r.mAP == pytest.approx(0.1) and r.first_match_rank[0] == 10
    for pids in (first, last):  # pessimistic: rank 10 wherever the match is stored
        r = _one_query(row, pids, max_rank=10, tie_break="pessimistic")
        assert r.first_match_rank[0] == 10 and r.mAP == pytest.approx(0.1)
        np.testing.assert_array_equal(r.cmc, [0] * 9 + [1])


def test_partial_tie_hand_example():
    # ranked: d=0.1 (non-match), then three at 0.5: gallery 1 match, 2 non-match, 3 match,
    # then 0.9 non-match.
    row = [0.1, 0.5, 0.5, 0.5, 0.9]
    pids = [1, 7, 1, 7, 1]
    s = _one_query(row, pids, max_rank=5)
    np.testing.assert_array_equal(s.first_match_rank, [2])  # stable: 1, [7, 1, 7], 1
    assert s.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert s.mINP == pytest.approx(2 / 4)
    p = _one_query(row, pids, max_rank=5, tie_break="pessimistic")  # 1, 1, 7, 7, 1
    np.testing.assert_array_equal(p.first_match_rank, [3])
    assert p.mAP == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_minp_and_ap_by_hand():
    # true matches at ranks 1, 4 and 6 of 8
    row = np.arange(8, dtype=float)
    pids = [7, 1, 2, 7, 3, 7, 4, 5]
    r = _one_query(row, pids, max_rank=8)
    assert r.mINP == pytest.approx(3 / 6)
    assert r.mAP == pytest.approx((1 / 1 + 2 / 4 + 3 / 6) / 3)
    t = _one_query(row, pids, max_rank=8, ap_mode="trapezoid")
    # (p_before + p_at)/2 per hit: (1+1)/2, (1/3 + 2/4)/2, (2/5 + 3/6)/2
    assert t.mAP == pytest.approx((1.0 + (1 / 3 + 1 / 2) / 2 + (2 / 5 + 1 / 2) / 2) / 3)
    np.testing.assert_array_equal(r.cmc, [1] * 8)


def test_trapezoid_ap_hand_example_two_hits():
    # hits at ranks 1 and 3: noninterp (1 + 2/3)/2 = 5/6, trapezoid (1 + (1/2 + 2/3)/2)/2
    row = [0.1, 0.2, 0.3, 0.4]
    pids = [7, 1, 7, 2]
    assert _one_query(row, pids, max_rank=4).mAP == pytest.approx(5 / 6)
    assert _one_query(row, pids, max_rank=4, ap_mode="trapezoid").mAP == pytest.approx(19 / 24)


def test_junk_is_removed_before_ranking():
    # gallery 0 has the query's pid AND camera (junk): removed, so the match at 1 is rank 1
    row = [0.1, 0.2, 0.3]
    r = _one_query(row, [7, 7, 1], g_cams=[0, 1, 1], max_rank=3)
    np.testing.assert_array_equal(r.first_match_rank, [1])
    assert r.mAP == 1.0
    # a same-camera item of another id is NOT junk
    r = _one_query(row, [1, 7, 2], g_cams=[0, 1, 1], max_rank=3)
    np.testing.assert_array_equal(r.first_match_rank, [2])


def test_gallery_shorter_than_max_rank_pads_cmc():
    """Ecosystem §2.6-1: 60 gallery images, the query loses 8 same-camera images (L=52)."""
    rng = np.random.default_rng(0)
    g_pids = rng.integers(10, 20, 60)
    g_cams = np.full(60, 2)
    g_pids[:8], g_cams[:8] = 7, 0  # same pid, same camera as the query: junk
    g_pids[59] = 7  # the only true match, ranked last
    dist = np.linspace(0, 1, 60)
    r = _one_query(dist, g_pids, g_cams=g_cams, max_rank=55)
    assert r.cmc.shape == (55,)
    np.testing.assert_array_equal(r.cmc, [0] * 51 + [1] * 4)  # rank 52, then padded with 1
    # several queries, tiny gallery, default max_rank 50: monotone and ending at 1
    dist, qp, gp, qc, gc = random_problem(13, nq=10, ng=12, n_ids=3)
    res = evaluate_rank(dist, qp, gp, qc, gc)
    assert res["cmc"].shape == (50,)
    assert np.all(np.diff(res["cmc"]) >= 0) and res["cmc"][-1] == 1.0
    assert_matches_reference(res, reference_eval(dist, qp, gp, qc, gc), per_query=False)


def test_skipped_queries_are_counted():
    dist = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.2, 0.1, 0.3]])
    q_pids, q_cams = [1, 2, 5], [0, 0, 0]
    g_pids, g_cams = [1, 2, 3], [1, 0, 1]  # query 1's match is junk, query 2's id is absent
    r = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3, return_per_query=True)
    assert r.num_valid_queries == 1 and r.num_skipped_queries == 2
    np.testing.assert_array_equal(r.valid_mask, [True, False, False])
    assert r.ap.shape == (1,) and r.mAP == 1.0


def test_all_skipped_raises_explaining_the_camera_policy():
    dist = np.zeros((2, 3))
    with pytest.raises(ValueError, match="camid") as info:
        evaluate_rank(dist, [1, 2], [1, 2, 3], [0, 0], [0, 0, 0])
    assert "cross_camera=False" in str(info.value)
    assert isinstance(info.value, OccReIDError)  # the CLI reports it as a user error


def test_bad_inputs_are_explained():
    dist, qp, gp, qc, gc = random_problem(14)
    with pytest.raises(ValueError, match=r"\[30, 120\]"):
        evaluate_rank(dist[:, :-1], qp, gp, qc, gc)
    with pytest.raises(ValueError, match="NaN"):
        bad = dist.copy()
        bad[3, 4] = np.nan
        evaluate_rank(bad, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="ap_mode"):
        evaluate_rank(dist, qp, gp, qc, gc, ap_mode="interp")
    with pytest.raises(ValueError, match="tie_break"):
        evaluate_rank(dist, qp, gp, qc, gc, tie_break="optimistic")
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(dist, qp, gp, qc, gc, max_rank=0)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_rank(dist, qp, gp, qc, gc, chunk_size=0)
    with pytest.raises(ValueError, match="camid lengths"):
        evaluate_rank(dist, qp, gp, qc[:-1], gc)
    with pytest.raises(ValueError, match="non-integral"):
        evaluate_rank(dist, qp + 0.5, gp, qc, gc)
    with pytest.raises(ValueError, match="callable"):
        evaluate_rank("dist.npy", qp, gp, qc, gc)
    with pytest.raises(EvaluationInputError, match="no queries"):
        evaluate_rank(np.zeros((0, 3)), [], [1, 2, 3], [], [0, 0, 0])


# ------------------------------------------------------------------------------------------
# result object and golden values from the official code


def test_result_is_a_mapping_with_per_query_fields():
    dist, qp, gp, qc, gc = random_problem(15)
    r = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20)
    assert isinstance(r, RankResult)
    assert set(r) == {"mAP", "mINP", "rank1", "rank5", "rank10", "cmc",
                      "num_valid_queries", "num_skipped_queries"}
    assert r["rank1"] == r.cmc[0] and r["rank10"] == r.cmc[9]
    assert 0 <= r.mINP <= r.mAP <= 1
    assert r.cmc.dtype == np.float64 and r.cmc.shape == (20,)
    json.dumps(r.to_dict())
    assert "mAP" in r.summary() and "valid queries" in r.summary()
    full = evaluate_rank(dist, qp, gp, qc, gc, max_rank=20, return_per_query=True)
    assert {"ap", "inp", "first_match_rank", "valid_mask"} <= set(full)
    assert full.ap.mean() == pytest.approx(full.mAP)
    assert full.valid_mask.shape == (30,) and full.ap.shape == (full.num_valid_queries,)
    # rank-k keys stay exact when max_rank is small
    short = evaluate_rank(dist, qp, gp, qc, gc, max_rank=3)
    assert short.rank10 == r.rank10 and short.cmc.shape == (3,)


def test_official_dpm_retrieval_golden_metrics():
    """CMC/mAP of the official eval_func on its own distance matrix (dpm_retrieval.pt)."""
    g = torch.load(GOLDEN, weights_only=True)
    args = (g["in.q_pids"], g["in.g_pids"], g["in.q_camids"], g["in.g_camids"])
    r = evaluate_rank(g["out.distmat"], *args, max_rank=12, return_per_query=True)
    assert torch.equal(torch.as_tensor(r.cmc, dtype=torch.float32), g["out.cmc"])
    assert r.mAP == pytest.approx(127 / 198, abs=1e-12)
    np.testing.assert_allclose(r.ap, [11 / 18, 31 / 99, 1.0], atol=1e-12)
    assert r.num_skipped_queries == 2
    long = evaluate_rank(g["out.distmat"], *args)  # default max_rank 50 > 12 gallery items
    np.testing.assert_array_equal(long.cmc[:12], r.cmc)
    assert np.all(long.cmc[12:] == 1.0)
