"""Speed and memory of ``occreid.evaluation.evaluate_rank`` against the plain per-query loop.

For each problem size it builds random features with identity/camera structure, computes
one cosine distance matrix (float32), then times

- ``evaluate_rank`` (chunked, vectorised, CMC + mAP + mINP), and
- the reference: TransReID's ``eval_func`` algorithm (numpy argsort of the whole matrix, then
  one Python iteration per query), written out below,

checks that both give the same CMC and mAP (to 1e-6), and prints the times, the speed-up and
the peak resident memory added by one call of each (measured in a fresh process). Nothing
is asserted about time.

    python bench/eval_speed.py              # Occluded-Duke and Market-1501 sizes
    python bench/eval_speed.py --small      # a quick run (a few seconds)
    python bench/eval_speed.py --msmt       # also MSMT17 size, lazily (no dense matrix)
    python bench/eval_speed.py --sizes --msmt --threads 1   # MSMT17 size only, one thread
    python bench/eval_speed.py --sizes market1501 --rerank  # also k-reciprocal re-ranking
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from occreid.evaluation import (DistanceBlocks, compute_distance, evaluate_rank,
                                normalize_features, re_ranking)

SIZES: Dict[str, Tuple[int, int, int, int]] = {  # queries, gallery, ids, cameras
    "occluded_duke": (2210, 17661, 702, 8),
    "market1501": (3368, 15913, 751, 6),
    "small": (300, 2000, 100, 6),
    "msmt17": (11659, 82161, 3060, 15),
}


def reference_eval_func(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                        q_camids: np.ndarray, g_camids: np.ndarray, max_rank: int = 50,
                        sort_kind: str = "quicksort") -> Tuple[np.ndarray, float]:
    """TransReID ``utils/metrics.py::eval_func``, re-written: one Python iteration per query."""
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1, kind=sort_kind)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap = [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw_cmc = matches[q_idx][~remove]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = raw_cmc.sum()
        precision = raw_cmc.cumsum() / (np.arange(len(raw_cmc)) + 1.0)
        all_ap.append((precision * raw_cmc).sum() / num_rel)
    assert all_cmc, "all query identities do not appear in gallery"
    cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_cmc)
    return cmc, float(np.mean(all_ap))


def make_problem(nq: int, ng: int, n_ids: int, n_cams: int, dim: int = 256,
                 noise: float = 2.0, seed: int = 0):
    """Features = identity centre + camera offset + noise; every query id is in the gallery.

    With the default noise the Market-sized problem has R1 ≈ 0.74 and mAP ≈ 0.34, the
    operating point of the measurements in docs/specs (ecosystem §2.5). The evaluator's time
    depends on it: the deeper the hardest true matches, the more gallery entries it must
    place (see docs/benchmarks.md).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_ids, dim)).astype(np.float32)
    cam_shift = 0.5 * rng.normal(size=(n_cams, dim)).astype(np.float32)
    g_pids = np.concatenate([np.arange(n_ids), rng.integers(0, n_ids, ng - n_ids)])
    g_cams = rng.integers(0, n_cams, ng)
    q_pids = rng.integers(0, n_ids, nq)
    q_cams = rng.integers(0, n_cams, nq)

    def feats(pids, cams):
        x = centers[pids] + cam_shift[cams]
        return x + noise * rng.normal(size=x.shape).astype(np.float32)

    return feats(q_pids, q_cams), feats(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def _fix_malloc_thresholds() -> None:
    """Make glibc map and unmap every large block, so that RSS peaks are real.

    By default glibc raises its mmap threshold after the first large free and then serves
    big arrays from freed heap memory, which hides them from RSS. The fixed threshold costs
    page faults, so it is only set in the child process that measures memory.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, disables the dynamic rule
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def best_time(fn: Callable[[], object], repeats: int) -> Tuple[object, float]:
    """(result of the last call, best wall time in s)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _peak_child(which: str, name: str, noise: float, chunk_size: int, threads: int,
                queue) -> None:
    """Spawned process: rebuild the problem, then the RSS peak added by one call (MiB)."""
    torch.set_num_threads(threads)
    _fix_malloc_thresholds()
    nq, ng, n_ids, n_cams = SIZES[name]
    qf, gf, qp, gp, qc, gcam = make_problem(nq, ng, n_ids, n_cams, noise=noise)
    if which == "rerank":
        qn, gn = normalize_features(qf), normalize_features(gf)
        fn = lambda: re_ranking(qn, gn, chunk_size=chunk_size)  # noqa: E731
    elif which == "blocks":
        blocks = DistanceBlocks(qf, gf, "cosine")
        fn = lambda: evaluate_rank(blocks, qp, gp, qc, gcam, chunk_size=chunk_size)  # noqa
    else:
        dist = compute_distance(qf, gf, "cosine").numpy()
        if which == "ours":
            fn = lambda: evaluate_rank(dist, qp, gp, qc, gcam, chunk_size=chunk_size)  # noqa
        else:
            fn = lambda: reference_eval_func(dist, qp, gp, qc, gcam)  # noqa
    gc.collect()
    base = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark (Linux)
            fh.write("5")
    except OSError:
        queue.put(float("nan"))
        return
    fn()
    queue.put((_rss_kib("VmHWM") - base) / 1024)


def peak_mib(which: str, name: str, noise: float, chunk_size: int) -> float:
    """Peak RSS added by one call, measured in a fresh process (nan if unsupported)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child,
                       args=(which, name, noise, chunk_size, torch.get_num_threads(), queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def run_size(name: str, repeats: int, chunk_size: int, noise: float,
             with_reference: bool = True, memory: bool = True) -> None:
    nq, ng, n_ids, n_cams = SIZES[name]
    qf, gf, qp, gp, qc, gcam = make_problem(nq, ng, n_ids, n_cams, noise=noise)
    print(f"\n== {name}: {nq} queries x {ng} gallery, {n_ids} ids, {n_cams} cameras, "
          f"dim {qf.shape[1]} ==")
    if not with_reference:  # MSMT17 size: lazy distances, no dense [nq, ng] matrix
        blocks = DistanceBlocks(qf, gf, "cosine")
        res, t_ours = best_time(
            lambda: evaluate_rank(blocks, qp, gp, qc, gcam, chunk_size=chunk_size), 1)
        mem = peak_mib("blocks", name, noise, chunk_size) if memory else float("nan")
        print(res.summary())
        print(f"evaluate_rank (DistanceBlocks, distances included): {t_ours:.2f} s, "
              f"peak +{mem:.0f} MiB")
        return
    t0 = time.perf_counter()
    dist = compute_distance(qf, gf, "cosine").numpy()  # float32 [nq, ng]
    print(f"compute_distance (cosine, float32): {time.perf_counter() - t0:.2f} s, "
          f"matrix {dist.nbytes / 2**20:.0f} MiB")

    # alternate the two, so that both see the same background load; keep the best of each
    t_ours = t_ref = float("inf")
    for _ in range(repeats):
        res, t = best_time(
            lambda: evaluate_rank(dist, qp, gp, qc, gcam, chunk_size=chunk_size), 1)
        t_ours = min(t_ours, t)
        ref, t = best_time(lambda: reference_eval_func(dist, qp, gp, qc, gcam), 1)
        t_ref = min(t_ref, t)
    cmc_ref, map_ref = ref
    d_cmc = float(np.abs(res["cmc"][: len(cmc_ref)] - cmc_ref).max())
    d_map = abs(res["mAP"] - map_ref)
    if d_cmc > 1e-6 or d_map > 1e-6:
        # equal distances are ranked by numpy's unstable quicksort in the reference; the
        # evaluator's documented order is the stable one
        cmc_s, map_s = reference_eval_func(dist, qp, gp, qc, gcam, sort_kind="stable")
        print(f"  (reference with quicksort differs by CMC {d_cmc:.1e}, mAP {d_map:.1e}: "
              "ties; comparing with the stable-sort reference)")
        d_cmc = float(np.abs(res["cmc"][: len(cmc_s)] - cmc_s).max())
        d_map = abs(res["mAP"] - map_s)
    ok = d_cmc <= 1e-6 and d_map <= 1e-6
    print(res.summary())
    print(f"agreement: max |dCMC| {d_cmc:.1e}, |dmAP| {d_map:.1e} -> "
          f"{'EQUAL' if ok else 'MISMATCH'}")
    mem_ours = peak_mib("ours", name, noise, chunk_size) if memory else float("nan")
    mem_ref = peak_mib("reference", name, noise, chunk_size) if memory else float("nan")
    print(f"evaluate_rank (chunk {chunk_size}, + mINP): {t_ours:.2f} s, "
          f"peak +{mem_ours:.0f} MiB")
    print(f"reference per-query loop:       {t_ref:.2f} s, peak +{mem_ref:.0f} MiB")
    print(f"speed-up: {t_ref / t_ours:.1f}x   (best of {repeats})")
    if not ok:
        raise SystemExit("evaluate_rank and the reference disagree")


def run_rerank(name: str, noise: float, memory: bool) -> None:
    """k-reciprocal re-ranking (k1=20, k2=6, λ=0.3) on L2-normalised features: time, memory."""
    nq, ng, n_ids, n_cams = SIZES[name]
    qf, gf, qp, gp, qc, gcam = make_problem(nq, ng, n_ids, n_cams, noise=noise)
    qn, gn = normalize_features(qf), normalize_features(gf)
    print(f"\n== re-ranking, {name}: M = {nq + ng} images ==")
    before = evaluate_rank(compute_distance(qn, gn), qp, gp, qc, gcam)
    dist, t = best_time(lambda: re_ranking(qn, gn), 1)
    after = evaluate_rank(dist, qp, gp, qc, gcam)
    mem = peak_mib("rerank", name, noise, 1024) if memory else float("nan")
    print(f"before: {before.summary()}")
    print(f"after:  {after.summary()}")
    print(f"re_ranking: {t:.1f} s, peak +{mem:.0f} MiB "
          f"(a dense M x M float32 matrix alone would be {(nq + ng) ** 2 * 4 / 2**30:.1f} GiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="one small problem, quick check")
    ap.add_argument("--msmt", action="store_true", help="also MSMT17 size (evaluator only)")
    ap.add_argument("--sizes", nargs="*", choices=["occluded_duke", "market1501", "small"],
                    default=None, help="problem sizes to run against the reference")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per call (best kept)")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--noise", type=float, default=2.0,
                    help="feature noise (2.0: R1≈0.74; 6: an untrained model, ~random ranks)")
    ap.add_argument("--rerank", action="store_true",
                    help="also time k-reciprocal re-ranking at the chosen sizes")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the peak-memory runs (each one rebuilds the problem)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if Path("/proc/loadavg").exists() \
        else "n/a"
    print(f"date {datetime.date.today()}  python {platform.python_version()}  "
          f"torch {torch.__version__}  numpy {np.__version__}  "
          f"torch threads {torch.get_num_threads()}  cpus {os.cpu_count()}  "
          f"{platform.machine()}  load average {load}  noise {args.noise}")
    names = args.sizes if args.sizes is not None else (
        ["small"] if args.small else ["occluded_duke", "market1501"])
    for name in names:
        run_size(name, args.repeats, args.chunk_size, args.noise,
                 memory=not args.no_memory)
    if args.msmt:
        run_size("msmt17", 1, args.chunk_size, args.noise, with_reference=False,
                 memory=not args.no_memory)
    if args.rerank:
        for name in names:
            run_rerank(name, args.noise, memory=not args.no_memory)


if __name__ == "__main__":
    main()
