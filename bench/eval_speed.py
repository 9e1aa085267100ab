"""Speed of ``occreid.evaluation.evaluate_rank`` against TransReID's per-query ``eval_func``,
swept over model quality.

For each problem size it builds random features with identity/camera structure (identity
centre + camera offset + noise; the noise sets the model quality, from mAP ≈ 1.0 down to
≈ 0.02) plus one point of uniform random distances (an untrained or broken model), computes
one float32 cosine distance matrix per point, then times

- ``evaluate_rank`` (chunked, CMC + mAP + mINP), and
- the reference: TransReID's ``utils/metrics.py::eval_func`` re-stated below (numpy argsort
  of the whole matrix, then one Python iteration per query; CMC + mAP),

alternating the two (median of ``--repeats`` runs each). Every point is also checked
(untimed) against the same per-query reference with a stable sort and mINP: CMC, mAP, mINP,
per-query AP/INP/first-match rank and the number of skipped queries must agree to 1e-12.
Nothing is asserted about time. ``--busy N`` runs N busy-loop processes (``while True:
pass``) during the measurements, to show the speed on a machine another job is using.

    python bench/eval_speed.py                     # Occluded-Duke and Market sizes, full sweep
    python bench/eval_speed.py --busy 1            # the same with one core taken
    python bench/eval_speed.py --small             # a quick check (a few seconds)
    python bench/eval_speed.py --sizes market1501 --points 2.0 random
    python bench/eval_speed.py --sizes --msmt      # MSMT17 size only, lazily (no dense matrix)
    python bench/eval_speed.py --sizes market1501 --points 2.0 --rerank   # + re-ranking
    python bench/eval_speed.py --memory            # + peak RSS of one call (fresh processes)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from occreid.evaluation import (DistanceBlocks, compute_distance, evaluate_rank,
                                normalize_features, re_ranking)

# queries, gallery, gallery ids, query ids (a subset of the gallery ids), cameras
SIZES: Dict[str, Tuple[int, int, int, int, int]] = {
    "occluded_duke": (2210, 17661, 1110, 519, 8),
    "market1501": (3368, 15913, 751, 750, 6),
    "small": (300, 2000, 100, 90, 6),
    "msmt17": (11659, 82161, 3060, 3060, 15),
}
# feature noise of the sweep (mAP ≈ 1.0, 0.7, 0.5, 0.3, 0.15, 0.05, 0.02 at both sizes);
# "random": uniform random distances
POINTS = ["0.8", "1.6", "1.8", "2.0", "2.3", "2.7", "3.3", "random"]
SKIPPED_FRACTION = 0.01  # queries whose identity is not in the gallery (skipped by both)


# ------------------------------------------------------------------------------------------
# the reference


def transreid_eval_func(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                        q_camids: np.ndarray, g_camids: np.ndarray, max_rank: int = 50,
                        sort_kind: str = "quicksort", with_minp: bool = False,
                        exact_cmc: bool = False) -> dict:
    """TransReID's ``eval_func``, one Python iteration per query (transreid-backbone.md §5.1).

    With the defaults it is the official algorithm: numpy's default (unstable) argsort of
    the whole matrix, an int32 match matrix, same-pid-same-camera removal per query,
    skipped queries without a match left, cumsum CMC cut at ``max_rank`` (lowered to the
    gallery size), AP from the precision at each hit, CMC averaged in float32. The options
    only serve the untimed check: ``sort_kind="stable"`` (occreid's documented tie order),
    ``with_minp`` (INP = |R| / rank of the last hit, per query) and ``exact_cmc`` (float64).
    """
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1, kind=sort_kind)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp, first, valid = [], [], [], [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        keep = np.invert(remove)
        orig_cmc = matches[q_idx][keep]
        if not np.any(orig_cmc):
            valid.append(False)
            continue
        valid.append(True)
        cmc = orig_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = orig_cmc.sum()
        tmp_cmc = orig_cmc.cumsum() / (np.arange(orig_cmc.shape[0]) + 1.0)
        all_ap.append((tmp_cmc * orig_cmc).sum() / num_rel)
        if with_minp:
            hits = np.flatnonzero(orig_cmc)
            all_inp.append(num_rel / (hits[-1] + 1.0))
            first.append(hits[0] + 1)
    assert all_cmc, "Error: all query identities do not appear in gallery"
    stack = np.asarray(all_cmc).astype(np.float64 if exact_cmc else np.float32)
    out = {"cmc": stack.sum(0) / len(all_cmc), "mAP": float(np.mean(all_ap)),
           "num_valid": len(all_cmc), "ap": np.asarray(all_ap), "valid": np.asarray(valid)}
    if with_minp:
        out.update(mINP=float(np.mean(all_inp)), inp=np.asarray(all_inp),
                   first=np.asarray(first))
    return out


# ------------------------------------------------------------------------------------------
# problems


def make_problem(name: str, noise: float, dim: int = 256, seed: int = 0):
    """Features = identity centre + camera offset + noise; 1 % of the queries have an
    identity that is not in the gallery (skipped)."""
    nq, ng, n_ids, n_qids, n_cams = SIZES[name]
    rng = np.random.default_rng(seed)
    g_pids = np.concatenate([np.arange(n_ids), rng.integers(0, n_ids, ng - n_ids)])
    g_cams = rng.integers(0, n_cams, ng)
    q_pids = rng.integers(0, n_qids, nq)
    q_pids[rng.random(nq) < SKIPPED_FRACTION] = n_ids  # not in the gallery
    q_cams = rng.integers(0, n_cams, nq)
    centers = rng.normal(size=(n_ids + 1, dim)).astype(np.float32)
    cam_shift = 0.5 * rng.normal(size=(n_cams, dim)).astype(np.float32)

    def feats(pids, cams):
        x = centers[pids] + cam_shift[cams]
        return x + noise * rng.normal(size=x.shape).astype(np.float32)

    return feats(q_pids, q_cams), feats(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def point_problem(name: str, point: str):
    """(float32 distance matrix, q_pids, g_pids, q_cams, g_cams) for one sweep point."""
    if point == "random":
        _, _, qp, gp, qc, gc = make_problem(name, 1.0, dim=1)
        nq, ng = SIZES[name][:2]
        dist = np.random.default_rng(1).random((nq, ng), dtype=np.float32)
        return dist, qp, gp, qc, gc
    qf, gf, qp, gp, qc, gc = make_problem(name, float(point))
    return compute_distance(qf, gf, "cosine").numpy(), qp, gp, qc, gc


# ------------------------------------------------------------------------------------------
# measurement helpers


class _PathLog(logging.Handler):
    """Keeps evaluate_rank's debug line (which path each block took)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "paths" in msg:
            self.last = msg.split("paths ", 1)[1]


def timed(fn: Callable[[], object]) -> Tuple[object, float]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _fix_malloc_thresholds() -> None:
    """Make glibc map and unmap every large block, so that RSS peaks are real."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _peak_child(which: str, name: str, point: str, chunk_size: int, threads: int,
                queue) -> None:
    """Spawned process: rebuild the problem, then the RSS peak added by one call (MiB)."""
    torch.set_num_threads(threads)
    logging.getLogger("occreid.evaluation.rank").setLevel(logging.ERROR)  # skipped-query note
    _fix_malloc_thresholds()
    if which == "rerank":
        qf, gf, *_ = make_problem(name, float(point))
        qn, gn = normalize_features(qf), normalize_features(gf)
        fn = lambda: re_ranking(qn, gn, chunk_size=chunk_size)  # noqa: E731
    elif which == "blocks":
        qf, gf, qp, gp, qc, gcam = make_problem(name, float(point))
        blocks = DistanceBlocks(qf, gf, "cosine")
        fn = lambda: evaluate_rank(blocks, qp, gp, qc, gcam, chunk_size=chunk_size)  # noqa
    else:
        dist, qp, gp, qc, gcam = point_problem(name, point)
        if which == "ours":
            fn = lambda: evaluate_rank(dist, qp, gp, qc, gcam, chunk_size=chunk_size)  # noqa
        else:
            fn = lambda: transreid_eval_func(dist, qp, gp, qc, gcam)  # noqa
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


def peak_mib(which: str, name: str, point: str, chunk_size: int) -> float:
    """Peak RSS added by one call, measured in a fresh process (nan if unsupported)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(which, name, point, chunk_size,
                                                 torch.get_num_threads(), queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------------------
# the sweep


def check_point(dist, qp, gp, qc, gc, res_quick: dict, chunk_size: int,
                num_threads: Optional[int]) -> str:
    """Untimed agreement check; returns a short verdict, raises SystemExit on a mismatch."""
    ours = evaluate_rank(dist, qp, gp, qc, gc, chunk_size=chunk_size, return_per_query=True,
                         num_threads=num_threads)
    ref = transreid_eval_func(dist, qp, gp, qc, gc, sort_kind="stable", with_minp=True,
                              exact_cmc=True)
    diffs = {
        "cmc": float(np.abs(ours.cmc - ref["cmc"]).max()),
        "mAP": abs(ours.mAP - ref["mAP"]),
        "mINP": abs(ours.mINP - ref["mINP"]),
        "ap": float(np.abs(ours.ap - ref["ap"]).max()),
        "inp": float(np.abs(ours.inp - ref["inp"]).max()),
    }
    same = (all(v <= 1e-12 for v in diffs.values())
            and ours.num_valid_queries == ref["num_valid"]
            and np.array_equal(ours.valid_mask, ref["valid"])
            and np.array_equal(ours.first_match_rank, ref["first"]))
    if not same:
        raise SystemExit(f"evaluate_rank and the stable per-query reference disagree: {diffs}")
    # the timed (quicksort) reference differs only where ties are ordered differently
    d_quick = max(float(np.abs(ours.cmc[: len(res_quick["cmc"])] - res_quick["cmc"]).max()),
                  abs(ours.mAP - res_quick["mAP"]))
    verdict = "equal"
    if d_quick > 1e-6:
        verdict = f"equal (quicksort ref: ties, {d_quick:.0e})"
    return verdict + f", {ours.num_skipped_queries} skipped"


def run_sweep(name: str, points: List[str], repeats: int, chunk_size: int,
              num_threads: Optional[int], memory: bool, rows: list) -> None:
    nq, ng, n_ids, n_qids, n_cams = SIZES[name]
    print(f"\n== {name}: {nq} queries x {ng} gallery, {n_ids} gallery ids ({n_qids} query "
          f"ids), {n_cams} cameras; load average {load_average()} ==", flush=True)
    print(f"{'point':>7} {'mAP':>6} {'R1':>6} {'evaluate_rank':>14} {'reference':>10} "
          f"{'speed-up':>8}  runs (ours | reference)  paths, check")
    path_log = _PathLog()
    rank_logger = logging.getLogger("occreid.evaluation.rank")
    rank_logger.addHandler(path_log)
    rank_logger.setLevel(logging.DEBUG)
    try:
        for point in points:
            dist, qp, gp, qc, gc = point_problem(name, point)
            t_ours, t_ref = [], []
            for _ in range(repeats):  # alternate: both see the same background load
                res, t = timed(lambda: evaluate_rank(dist, qp, gp, qc, gc,
                                                     chunk_size=chunk_size,
                                                     num_threads=num_threads))
                t_ours.append(t)
                ref, t = timed(lambda: transreid_eval_func(dist, qp, gp, qc, gc))
                t_ref.append(t)
            paths = path_log.last
            verdict = check_point(dist, qp, gp, qc, gc, ref, chunk_size, num_threads)
            m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
            mem = ""
            if memory:
                mem = (f", peak +{peak_mib('ours', name, point, chunk_size):.0f} / "
                       f"+{peak_mib('reference', name, point, chunk_size):.0f} MiB")
            label = point if point == "random" else f"n={point}"
            print(f"{label:>7} {res.mAP:6.3f} {res.rank1:6.3f} {m_ours:12.3f} s {m_ref:8.2f} s "
                  f"{m_ref / m_ours:7.1f}x  "
                  f"{'/'.join(f'{t:.2f}' for t in t_ours)} | "
                  f"{'/'.join(f'{t:.2f}' for t in t_ref)}  {paths}, {verdict}{mem}",
                  flush=True)
            rows.append((name, label, res.mAP, m_ours, m_ref, m_ref / m_ours))
            del dist
    finally:
        rank_logger.removeHandler(path_log)


def run_msmt(chunk_size: int, memory: bool) -> None:
    """MSMT17 size with lazy distances (no dense [nq, ng] matrix); no reference."""
    qf, gf, qp, gp, qc, gcam = make_problem("msmt17", 2.0)
    print(f"\n== msmt17: {len(qp)} x {len(gp)}, DistanceBlocks (distances included) ==")
    blocks = DistanceBlocks(qf, gf, "cosine")
    res, t = timed(lambda: evaluate_rank(blocks, qp, gp, qc, gcam, chunk_size=chunk_size))
    mem = peak_mib("blocks", "msmt17", "2.0", chunk_size) if memory else float("nan")
    print(res.summary())
    print(f"evaluate_rank (DistanceBlocks): {t:.2f} s, peak +{mem:.0f} MiB")


def run_rerank(name: str, point: str, memory: bool) -> None:
    """k-reciprocal re-ranking (k1=20, k2=6, λ=0.3) on L2-normalised features: time, memory."""
    qf, gf, qp, gp, qc, gcam = make_problem(name, float(point))
    qn, gn = normalize_features(qf), normalize_features(gf)
    print(f"\n== re-ranking, {name}, noise {point}: M = {len(qp) + len(gp)} images ==")
    before = evaluate_rank(compute_distance(qn, gn), qp, gp, qc, gcam)
    dist, t = timed(lambda: re_ranking(qn, gn))
    after = evaluate_rank(dist, qp, gp, qc, gcam)
    mem = peak_mib("rerank", name, point, 1024) if memory else float("nan")
    print(f"before: {before.summary()}")
    print(f"after:  {after.summary()}")
    print(f"re_ranking: {t:.1f} s, peak +{mem:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the small problem only, quick check")
    ap.add_argument("--sizes", nargs="*", choices=["occluded_duke", "market1501", "small"],
                    default=None, help="problem sizes of the sweep")
    ap.add_argument("--points", nargs="+", default=POINTS,
                    help="feature noise values and/or 'random' (default: the full sweep)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--eval-threads", type=int, default=None,
                    help="evaluate_rank(num_threads=...) (default: torch's thread count)")
    ap.add_argument("--busy", type=int, default=0,
                    help="run this many busy-loop processes during the measurements")
    ap.add_argument("--msmt", action="store_true", help="also MSMT17 size (evaluator only)")
    ap.add_argument("--rerank", action="store_true", help="also time k-reciprocal re-ranking")
    ap.add_argument("--memory", action="store_true",
                    help="also the peak RSS of one call of each (fresh processes; slow)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        time.sleep(1.0 if busy else 0.0)
        print(f"date {datetime.date.today()}  python {platform.python_version()}  "
              f"torch {torch.__version__}  numpy {np.__version__}  torch threads "
              f"{torch.get_num_threads()}  cpus {os.cpu_count()}  {platform.machine()}  "
              f"busy-loop processes {len(busy)}  load average {load_average()}")
        names = args.sizes if args.sizes is not None else (
            ["small"] if args.small else ["occluded_duke", "market1501"])
        rows: list = []
        for name in names:
            run_sweep(name, args.points, args.repeats, args.chunk_size, args.eval_threads,
                      args.memory, rows)
        if rows:
            worst = min(rows, key=lambda r: r[5])
            print(f"\nworst case: {worst[5]:.1f}x ({worst[0]}, {worst[1]}, mAP {worst[2]:.3f}: "
                  f"{worst[3]:.3f} s vs {worst[4]:.2f} s)")
        if args.msmt:
            run_msmt(args.chunk_size, args.memory)
        if args.rerank:
            for name in names:
                run_rerank(name, args.points[0] if args.points[0] != "random" else "2.0",
                           args.memory)
    finally:
        for proc in busy:  # only the processes started here
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
