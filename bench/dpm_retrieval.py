"""DPM's query-mask retrieval at Occluded-Duke size: vectorised vs the official per-query loop.

    python bench/dpm_retrieval.py                  # 2,210 queries x 17,661 gallery x 768
    python bench/dpm_retrieval.py --busy 1         # the same with one core taken
    python bench/dpm_retrieval.py --small          # 200 x 2,000, a quick agreement check

Both compute dist_ij = arccos(clip(q̂_i · normalize(m_i ⊙ ĝ_j), −1 + 1e-5, 1 − 1e-5))
(dpm-official.md §7). The reference is a plain loop over queries written here, as the official
``cosine_single`` does it, except that the result goes into a preallocated matrix instead of
being grown by concatenation (which only makes the reference faster). The vectorised path is
``occreid.evaluation.masked_distance.masked_distance_matrix``: the training formula
``occreid.losses.arcface.masked_cosine`` (two matrix products) on pieces of a few MB. The two
are timed alternately (median of ``--repeats`` and ``--ref-repeats`` runs); the script prints
both, the speed-up and the largest difference, and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from occreid.evaluation.masked_distance import masked_distance_matrix


def per_query_reference(qf: torch.Tensor, q_mask: torch.Tensor, gf: torch.Tensor) -> torch.Tensor:
    """The official per-query loop (``cosine_single``), one query at a time."""
    q = F.normalize(qf, dim=1)
    g = F.normalize(gf, dim=1)
    out = torch.empty(q.shape[0], g.shape[0], dtype=q.dtype)
    for i in range(q.shape[0]):
        gm = F.normalize(g * q_mask[i], dim=1)
        s = (gm @ q[i]).clamp(-1 + 1e-5, 1 - 1e-5)
        out[i] = torch.arccos(s)
    return out


def timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def load_average() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nq", type=int, default=2210)
    p.add_argument("--ng", type=int, default=17661)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--small", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the vectorised path (median)")
    p.add_argument("--ref-repeats", type=int, default=3, help="timed runs of the per-query loop (median)")
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes during the measurements")
    args = p.parse_args()
    if args.small:
        args.nq, args.ng = 200, 2000
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    qf = torch.randn(args.nq, args.dim, generator=g)
    gf = torch.randn(args.ng, args.dim, generator=g)
    q_mask = torch.rand(args.nq, args.dim, generator=g)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(1.0 if busy else 0.0)
        print(
            f"# date {datetime.date.today()}, python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}, threads {torch.get_num_threads()}, busy-loop processes {len(busy)}, "
            f"load average {load_average()}; {args.nq} queries x {args.ng} gallery x {args.dim}",
            flush=True,
        )
        masked_distance_matrix(qf[:64], q_mask[:64], gf[:512])  # warm-up (library initialisation)
        t_fast, t_ref = [], []
        fast = ref = None
        for i in range(max(args.repeats, args.ref_repeats)):  # alternate: same background load
            if i < args.repeats:
                del fast
                fast, t = timed(lambda: masked_distance_matrix(qf, q_mask, gf))
                t_fast.append(t)
                print(f"  vectorised run {i + 1}: {t:.2f} s (load average {load_average()})", flush=True)
            if i < args.ref_repeats:
                del ref
                ref, t = timed(lambda: per_query_reference(qf, q_mask, gf))
                t_ref.append(t)
                print(f"  per-query run {i + 1}: {t:.1f} s (load average {load_average()})", flush=True)
    finally:
        for proc in busy:  # only the processes started here
            proc.kill()
            proc.wait()
    diff = (fast.float() - ref).abs().max().item()
    # float32 rounding of either against the float64 values (first 64 queries)
    exact = per_query_reference(qf[:64].double(), q_mask[:64].double(), gf.double())
    err_fast = (fast[:64].double() - exact).abs().max().item()
    err_ref = (ref[:64].double() - exact).abs().max().item()
    m_fast, m_ref = statistics.median(t_fast), statistics.median(t_ref)
    print(f"vectorised (masked_distance_matrix): {m_fast:8.2f} s  (median of {len(t_fast)})")
    print(f"per-query reference loop:            {m_ref:8.2f} s  (median of {len(t_ref)})")
    print(
        f"speed-up {m_ref / m_fast:.1f}x, max |difference| {diff:.2e} "
        f"(vs float64: vectorised {err_fast:.1e}, loop {err_ref:.1e})"
    )


if __name__ == "__main__":
    main()
