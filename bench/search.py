"""Gallery search at scale: build and query a synthetic gallery (default 1,000,000 × 768, float32).

The gallery has re-id structure: ``--ids`` identity centres (random normal), each gallery
vector = its identity's centre + ``--noise`` · N(0, I), L2-normalised; queries are new samples
of gallery identities. It is generated in chunks into one preallocated float32 tensor (3 GB).

For each backend it prints the build time, the query latency (a batch of ``--queries``
queries, per query, and single queries one at a time) and recall@k against exact search:

- exact: :func:`occreid.retrieval.exact_topk` (torch, chunked brute force), the reference;
- faiss ``flat`` (exact brute force) and ``ivf`` (IVF-Flat, ``--nlist`` cells, several
  ``--nprobe`` values);
- DPM's query-mask distance (random sigmoid masks): exact (two GEMMs per block) and through
  faiss (numerator MIPS, re-scoring of ``rescore · k`` candidates; flat = certified exact
  with brute-force fallback, ivf = approximate).

Nothing is asserted about time. Commands::

    python bench/search.py                      # 1,000,000 x 768 (about 7 GB peak RAM)
    python bench/search.py --n 100000           # a quicker run
    python bench/search.py --n 20000 --dim 64 --queries 50 --nlist 64   # a few seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import time
from typing import Callable, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from occreid.retrieval import GalleryIndex, exact_topk
from occreid.retrieval.faiss_backend import require_faiss


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_gallery(n: int, d: int, ids: int, noise: float, seed: int, chunk: int = 100_000):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, d, generator=g)
    feats = torch.empty(n, d, dtype=torch.float32)
    labels = torch.randint(0, ids, (n,), generator=g)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[labels[s:e]]
        x.add_(torch.randn(e - s, d, generator=g), alpha=noise)
        feats[s:e] = F.normalize(x, dim=1)
    return feats, centres, labels


def make_queries(centres, labels, q: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    who = labels[torch.randint(0, labels.shape[0], (q,), generator=g)]
    x = centres[who] + noise * torch.randn(q, centres.shape[1], generator=g)
    return F.normalize(x, dim=1)


def timed(fn: Callable, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist())]))


def single_latency(fn: Callable[[int], object], n: int) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def row(name: str, build: str, batch_s: float, nq: int, single_s: float, rec: str, note: str = "") -> None:
    print(f"| {name} | {build} | {batch_s:.2f} s | {1000 * batch_s / nq:.2f} ms | {1000 * single_s:.1f} ms | {rec} | {note} |",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--ids", type=int, default=None, help="identities in the gallery (default n / 20)")
    ap.add_argument("--noise", type=float, default=0.6,
                    help="per-coordinate noise around the identity centre (0.6: same-id cosine about 0.74)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--single", type=int, default=5, help="single queries timed one at a time")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", default="8,32,128")
    ap.add_argument("--rescore", type=int, default=10, help="DPM: candidates per result (K' = rescore * k)")
    ap.add_argument("--no-dpm", action="store_true")
    ap.add_argument("--no-flat", action="store_true", help="skip the faiss flat index (saves 3 GB)")
    ap.add_argument("--threads", type=int, default=0, help="torch and faiss threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    faiss = require_faiss()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"date {datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), numpy {np.__version__}, "
          f"load {load:.1f}")
    n, d, nq, k = args.n, args.dim, args.queries, args.k
    args.ids = args.ids or max(1, n // 20)
    t, (gal, centres, labels) = timed(lambda: make_gallery(n, d, args.ids, args.noise, args.seed))
    queries = make_queries(centres, labels, nq, args.noise, args.seed)
    print(f"gallery {n:,} x {d} float32 ({gal.numel() * 4 / 2**30:.2f} GiB, {args.ids:,} ids, noise {args.noise}) "
          f"generated in {t:.1f} s; {nq} queries, k = {k}")
    index = GalleryIndex(gal, normalized=True)
    print()
    print("| search | build | batch of queries | per query (batch) | single query | recall@k vs exact | note |")
    print("|---|---|---|---|---|---|---|")

    t_ex, (s_ex, i_ex) = timed(lambda: exact_topk(queries, gal, k, gallery_normalized=True))
    one = single_latency(lambda i: exact_topk(queries[i : i + 1], gal, k, gallery_normalized=True), args.single)
    row("exact (torch)", "none", t_ex, nq, one, "1 (reference)")

    if not args.no_flat:
        t_b, _ = timed(lambda: index.add_faiss("flat"))
        t_s, res = timed(lambda: index.search(queries, k))
        one = single_latency(lambda i: index.search(queries[i : i + 1], k), args.single)
        row("faiss flat", f"{t_b:.1f} s", t_s, nq, one, f"{recall(res.indices, i_ex):.4f}")
        index.faiss = None
        gc.collect()

    t_b, _ = timed(lambda: index.add_faiss("ivf", nlist=args.nlist, nprobe=8))
    for nprobe in [int(x) for x in args.nprobe.split(",")]:
        index.faiss.set_nprobe(nprobe)
        t_s, res = timed(lambda: index.search(queries, k))
        one = single_latency(lambda i: index.search(queries[i : i + 1], k), args.single)
        row(f"faiss ivf{args.nlist} nprobe {nprobe}", f"{t_b:.1f} s", t_s, nq, one, f"{recall(res.indices, i_ex):.4f}")

    if not args.no_dpm:
        gm = torch.Generator().manual_seed(args.seed + 2)
        masks = torch.sigmoid(1.5 * torch.randn(nq, d, generator=gm))
        index.retrieval = {"distance": "dpm_masked_cosine", "mask_norm": "mask_then_normalize", "mask_query": False}
        t_dx, (s_dx, i_dx) = timed(lambda: exact_topk(queries, gal, k, query_masks=masks, gallery_normalized=True))
        one = single_latency(
            lambda i: exact_topk(queries[i : i + 1], gal, k, query_masks=masks[i : i + 1], gallery_normalized=True),
            args.single,
        )
        row("DPM exact (torch)", "none", t_dx, nq, one, "1 (reference)", "masked cosine, two GEMMs per block")
        overlap = recall(i_dx, i_ex)
        print(f"|  |  |  |  |  | plain-cosine top-{k} overlap with DPM top-{k}: {overlap:.3f} | |")
        for nprobe in [int(x) for x in args.nprobe.split(",")]:
            index.faiss.set_nprobe(nprobe)
            t_s, res = timed(lambda: index.search(queries, k, query_masks=masks, rescore=args.rescore))
            one = single_latency(lambda i: index.search(queries[i : i + 1], k, query_masks=masks[i : i + 1],
                                                        rescore=args.rescore), args.single)
            row(f"DPM faiss ivf{args.nlist} nprobe {nprobe} + re-score", f"{t_b:.1f} s", t_s, nq, one,
                f"{recall(res.indices, i_dx):.4f}", f"{args.rescore * k} candidates")
        if not args.no_flat:
            index.faiss = None
            gc.collect()
            t_b, _ = timed(lambda: index.add_faiss("flat"))
            t_s, res = timed(lambda: index.search(queries, k, query_masks=masks, rescore=args.rescore,
                                                  exact_fallback=False))
            cert = float(res.certified.float().mean())
            t_s2, res2 = timed(lambda: index.search(queries, k, query_masks=masks, rescore=args.rescore))
            row("DPM faiss flat + re-score + fallback", f"{t_b:.1f} s", t_s2, nq, float("nan"),
                f"{recall(res2.indices, i_dx):.4f}", f"{cert:.1%} certified by the bound")


if __name__ == "__main__":
    main()
