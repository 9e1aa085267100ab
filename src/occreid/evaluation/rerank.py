"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), memory-bounded.

Notation of the paper, over all M = nq + ng images (queries first, then gallery):

- d(i, j): squared Euclidean distance of the features as given (L2-normalise them first for
  TransReID's setting), divided by its row maximum (the reference code's normalisation);
- N(i, k): the k nearest images of i (i itself included, usually first), k + 1 entries;
- R(i, k) = {j ∈ N(i, k) : i ∈ N(j, k)} (k-reciprocal neighbours);
- R*(i, k1) = R(i, k1) ∪ R(c, ⌊k1/2⌉) for every c ∈ R(i, k1) with
  |R(c, ⌊k1/2⌉) ∩ R(i, k1)| > 2/3 · |R(c, ⌊k1/2⌉)| (⌊·⌉ rounds half to even, like
  ``np.around``);
- V[i, j] = exp(−d(i, j)) / Σ_{j′ ∈ R*(i)} exp(−d(i, j′)) for j ∈ R*(i), else 0;
- local query expansion: V[i] ← mean of V[n] over the k2 nearest images n of i (skipped
  when k2 = 1);
- Jaccard distance d_J(i, j) = 1 − Σ_k min(V[i,k], V[j,k]) / Σ_k max(V[i,k], V[j,k]), computed
  as 1 − s / (2 − s) with s = Σ_k min (rows of V sum to 1);
- final distance d*(i, j) = (1 − λ) d_J(i, j) + λ d(i, j), returned for
  queries × gallery.

Defaults are the paper's and torchreid's/fast-reid's: k1 = 20, k2 = 6, λ = 0.3. TransReID (and
FED/DPM, which inherit its ``R1_mAP_eval``) hard-code **k1 = 50, k2 = 15**, λ = 0.3 when
re-ranking is switched on; pass those to reproduce its numbers.

Memory (no M × M matrix is ever built; the reference code needs about 22 · M² bytes, 8–10 GB
for Market-1501, where this one adds about 1 GB: docs/benchmarks.md):

- one block of distance rows, ``chunk_size × M`` floats at a time, for the neighbour lists
  (top-k only, never a full argsort) and the row maxima;
- neighbour lists [M, max(k1 + 1, k2)] int64; reciprocal masks [M, k1 + 1] bool;
- V as sparse index/value arrays, O(M · |R*|) entries (|R*| is a few times k1), and the
  expanded V, O(M · k2 · |R*|) entries before merging duplicates;
- the query × gallery result [nq, ng] and the pairs of the sparse min-sum, bounded to a few
  million per step.

Differences from the reference implementation, which do not change the maths: V and the
Jaccard distance are float32 here (float16 there), float64 inputs stay float64, and ties in
the neighbour order are broken by ``torch.topk`` instead of numpy's unstable argsort.
"""

from __future__ import annotations

import logging
from typing import Any, List, Tuple

import numpy as np
import torch

from .distance import EvaluationInputError, _check_chunk, _compute_dtype, _pair_on_one_device

__all__ = ["re_ranking"]

logger = logging.getLogger(__name__)

# element budget for the temporaries of one step (bool / int64 / float entries)
_BUDGET = 1 << 22


def _reciprocal_mask(nn: torch.Tensor, k: int, rows: slice) -> torch.Tensor:
    """For i in ``rows``: mask[i, a] = i ∈ N(N(i, k)[a], k), i.e. N(i,k)[a] ∈ R(i, k).

    nn: [M, ≥ k] neighbour lists. Returns bool [len(rows), k].
    """
    fwd = nn[rows, :k]  # [c, k] N(i, k)
    back = nn[fwd, :k]  # [c, k, k] N(j, k) for j ∈ N(i, k)
    me = torch.arange(rows.start, rows.stop, device=nn.device).view(-1, 1, 1)
    return (back == me).any(dim=2)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise EvaluationInputError(f"{name} must be an int ≥ 1, got {value!r}")
    return int(value)


def _neighbours(x: torch.Tensor, n_keep: int, nq: int, chunk: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunked pass over the M × M distances.

    Returns the sorted nearest-neighbour lists [M, n_keep], the row maxima [M] and the
    row-normalised query × gallery block d(i, j) [nq, ng].
    """
    m = x.shape[0]
    x_sq = x.pow(2).sum(dim=1)  # [M]
    nn = torch.empty((m, n_keep), dtype=torch.int64, device=x.device)
    row_max = torch.empty(m, dtype=x.dtype, device=x.device)
    orig_qg = torch.empty((nq, m - nq), dtype=x.dtype, device=x.device)
    for s in range(0, m, chunk):
        e = min(s + chunk, m)
        # squared Euclidean rows i ∈ [s, e): ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j  -> [c, M]
        dist = torch.addmm(x_sq[s:e, None] + x_sq[None, :], x[s:e], x.t(), beta=1, alpha=-2)
        row_max[s:e] = dist.max(dim=1).values
        nn[s:e] = torch.topk(dist, n_keep, dim=1, largest=False, sorted=True).indices
        if s < nq:
            qe = min(e, nq)
            orig_qg[s:qe] = dist[: qe - s, nq:] / row_max[s:qe, None]
    return nn, row_max, orig_qg


def _expanded_sets(nn: torch.Tensor, rows: slice, recip: torch.Tensor,
                   recip_h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """R*(i, k1) for i in ``rows`` as a sorted padded index array and its validity mask.

    recip: [M, k1+1] membership of N(i, k1) in R(i, k1); recip_h: [M, kh+1] for ⌊k1/2⌉.
    Returns idx [c, L] (padding = M) and valid [c, L].
    """
    m = nn.shape[0]
    k1p, khp = recip.shape[1], recip_h.shape[1]
    fwd = nn[rows, :k1p]  # [c, K1] candidates N(i, k1)
    in_r = recip[rows]  # [c, K1]  candidate ∈ R(i, k1)
    cand_h = nn[fwd, :khp]  # [c, K1, Kh] N(c, k1/2) of each candidate
    cand_h_in = recip_h[fwd]  # [c, K1, Kh] ... ∈ R(c, k1/2)
    # |R(c, k1/2) ∩ R(i, k1)|: membership of each R(c, k1/2) entry in R(i, k1)
    member = (cand_h.unsqueeze(3) == fwd.view(fwd.shape[0], 1, 1, k1p)) \
        & in_r.view(fwd.shape[0], 1, 1, k1p)  # [c, K1, Kh, K1]
    inter = (member.any(dim=3) & cand_h_in).sum(dim=2)  # [c, K1]
    size_h = cand_h_in.sum(dim=2)  # [c, K1] |R(c, k1/2)|
    accept = in_r & (3 * inter > 2 * size_h)  # the 2/3 rule, exact in integers
    # union: R(i, k1) plus the accepted candidates' R(c, k1/2)
    idx = torch.cat([fwd.masked_fill(~in_r, m),
                     cand_h.masked_fill(~(cand_h_in & accept.unsqueeze(2)), m).flatten(1)],
                    dim=1)  # [c, K1 + K1·Kh]
    idx, _ = torch.sort(idx, dim=1)
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
    valid = (idx < m) & ~dup
    # compact: move the unique entries to the front, then cut to the longest row
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    idx, valid = idx.gather(1, order), valid.gather(1, order)
    width = max(int(valid.sum(dim=1).max()), 1)
    return idx[:, :width], valid[:, :width]


def _encode_v(x: torch.Tensor, x_sq: torch.Tensor, row_max: torch.Tensor, rows: slice,
              idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """V[i, R*(i)] = softmax(−d(i, R*(i))), values [c, L] (0 where not valid)."""
    m = x.shape[0]
    safe = idx.clamp(max=m - 1)
    xi = x[rows]  # [c, D]
    dots = torch.empty(idx.shape, dtype=x.dtype, device=x.device)  # x_j·x_i -> [c, L]
    sub = max(1, _BUDGET // (idx.shape[1] * x.shape[1]))  # gathered x[j] is [sub, L, D]
    for s in range(0, idx.shape[0], sub):
        dots[s:s + sub] = torch.bmm(x[safe[s:s + sub]], xi[s:s + sub].unsqueeze(2)).squeeze(2)
    dist = (x_sq[rows, None] + x_sq[safe] - 2 * dots) / row_max[rows, None]
    w = torch.exp(-dist) * valid
    return w / w.sum(dim=1, keepdim=True)


def re_ranking(qf: Any, gf: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
               chunk_size: int = 1024) -> torch.Tensor:
    """k-reciprocal re-ranked distances (queries × gallery), see the module docstring.

    Args:
        qf, gf: query [nq, d] and gallery [ng, d] features (numpy or torch, same device).
            The base distance is squared Euclidean on the features as given: L2-normalise
            them first for TransReID's setting.
        k1, k2, lambda_value: the paper's k1 (reciprocal neighbours), k2 (query expansion)
            and λ (weight of the original distance). TransReID uses k1=50, k2=15, λ=0.3.
        chunk_size: rows of the M × M distance computed at a time (memory ∝ chunk × M).

    Returns:
        float32 tensor [nq, ng] (float64 for float64 input) on the features' device.
    """
    k1 = _check_positive_int(k1, "k1")
    k2 = _check_positive_int(k2, "k2")
    chunk = _check_chunk(chunk_size)
    lam = float(lambda_value)
    if not 0.0 <= lam <= 1.0:
        raise EvaluationInputError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    q, g = _pair_on_one_device(qf, gf)
    nq, ng = q.shape[0], g.shape[0]
    if nq == 0 or ng == 0:
        raise EvaluationInputError(
            f"re-ranking needs at least one query and one gallery image, got {nq} and {ng}")
    dtype = _compute_dtype(q, g)
    x = torch.cat([q.to(dtype), g.to(dtype)])  # [M, D], queries first
    m = x.shape[0]
    dev = x.device
    # neighbour list lengths; the reference slices initial_rank, so cap them at M
    k1p = min(k1 + 1, m)
    kh = int(round(k1 / 2))  # round half to even, as np.around
    khp = min(kh + 1, m)
    k2p = min(k2, m)
    n_keep = max(k1p, k2p)

    nn, row_max, orig_qg = _neighbours(x, n_keep, nq, chunk)
    x_sq = x.pow(2).sum(dim=1)

    # reciprocal masks, in row pieces so that the [c, k, k] lookups stay small
    step = max(1, _BUDGET // (k1p * k1p))
    recip = torch.cat([_reciprocal_mask(nn, k1p, slice(s, min(s + step, m)))
                       for s in range(0, m, step)])  # [M, K1]
    recip_h = torch.cat([_reciprocal_mask(nn, khp, slice(s, min(s + step, m)))
                         for s in range(0, m, step)])  # [M, Kh]

    # V as sparse rows: (row, col, value)
    v_rows: List[torch.Tensor] = []
    v_cols: List[torch.Tensor] = []
    v_vals: List[torch.Tensor] = []
    step = max(1, min(chunk, _BUDGET // (k1p * khp * k1p)))
    for s in range(0, m, step):
        rows = slice(s, min(s + step, m))
        idx, valid = _expanded_sets(nn, rows, recip, recip_h)
        vals = _encode_v(x, x_sq, row_max, rows, idx, valid)
        r = torch.arange(rows.start, rows.stop, device=dev).unsqueeze(1).expand_as(idx)
        v_rows.append(r[valid])
        v_cols.append(idx[valid])
        v_vals.append(vals[valid])
    rows_v, cols_v, vals_v = torch.cat(v_rows), torch.cat(v_cols), torch.cat(v_vals)

    if k2 != 1:  # local query expansion: V_qe[i] = mean_{n ∈ N(i, k2)} V[n]
        rows_v, cols_v, vals_v = _query_expansion(rows_v, cols_v, vals_v, nn[:, :k2p], m)

    jaccard = _jaccard_query_gallery(rows_v, cols_v, vals_v, nq, m)  # [nq, ng]
    return jaccard.mul_(1 - lam).add_(orig_qg, alpha=lam)  # (1 − λ)·d_J + λ·d, in place


def _query_expansion(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                     nn_k2: torch.Tensor, m: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse V_qe = A·V with A[i, n] = 1/k2 for n ∈ N(i, k2); returns sorted (row, col)."""
    k2 = nn_k2.shape[1]
    counts = torch.bincount(rows, minlength=m)  # nonzeros per row of V (rows are sorted)
    starts = torch.cumsum(counts, 0) - counts
    out_r, out_c, out_v = [], [], []
    per_row = int(counts.max()) * k2
    step = max(1, _BUDGET // max(per_row, 1))
    for s in range(0, m, step):
        e = min(s + step, m)
        src = nn_k2[s:e].reshape(-1)  # source rows n, [c·k2]
        dst = torch.arange(s, e, device=rows.device).repeat_interleave(k2)
        n_ent = counts[src]
        tot = int(n_ent.sum())
        rep = torch.repeat_interleave(torch.arange(src.numel(), device=rows.device), n_ent,
                                      output_size=tot)
        within = torch.arange(tot, device=rows.device) - \
            torch.repeat_interleave(torch.cumsum(n_ent, 0) - n_ent, n_ent, output_size=tot)
        pos = starts[src[rep]] + within  # entry of V being copied
        # merge duplicate (row, col) pairs: unique keys are sorted by row, then column
        key, inverse = torch.unique(dst[rep] * m + cols[pos], sorted=True, return_inverse=True)
        merged = torch.zeros(key.numel(), dtype=vals.dtype, device=vals.device)
        merged.index_add_(0, inverse, vals[pos] / k2)
        out_r.append(key // m)
        out_c.append(key % m)
        out_v.append(merged)
    return torch.cat(out_r), torch.cat(out_c), torch.cat(out_v)


def _jaccard_query_gallery(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                           nq: int, m: int) -> torch.Tensor:
    """d_J(i, j) = 1 − s/(2 − s), s = Σ_k min(V[i,k], V[j,k]) for queries i × gallery j.

    Sparse join on the shared columns k (the reference's inverted index, vectorised): every
    query entry (i, k) meets every gallery entry (j, k), in pieces of about ``_BUDGET`` pairs.
    """
    ng = m - nq
    dev = vals.device
    is_q = rows < nq
    # gallery entries grouped by column k
    g_rows, g_cols, g_vals = rows[~is_q], cols[~is_q], vals[~is_q]
    order = torch.argsort(g_cols, stable=True)
    g_rows, g_cols, g_vals = g_rows[order], g_cols[order], g_vals[order]
    col_count = torch.bincount(g_cols, minlength=m)
    col_start = torch.cumsum(col_count, 0) - col_count
    q_rows, q_cols, q_vals = rows[is_q], cols[is_q], vals[is_q]
    n_pairs = col_count[q_cols]  # gallery partners of each query entry
    sim = torch.zeros(nq * ng, dtype=vals.dtype, device=dev)
    # split the query entries into pieces of at most ~_BUDGET pairs (whole entries)
    n_entries = q_rows.numel()
    cuts = [0, n_entries]
    if n_entries:
        csum = torch.cumsum(n_pairs, 0)
        total = int(csum[-1])
        if total > _BUDGET:
            targets = torch.arange(_BUDGET, total, _BUDGET, device=dev)
            cuts += (torch.searchsorted(csum, targets) + 1).tolist()
        cuts = sorted(set(min(c, n_entries) for c in cuts))
    for a, b in zip(cuts[:-1], cuts[1:]):
        npair = n_pairs[a:b]
        tot = int(npair.sum())
        if tot == 0:
            continue
        rep = torch.repeat_interleave(torch.arange(a, b, device=dev), npair, output_size=tot)
        within = torch.arange(tot, device=dev) - \
            torch.repeat_interleave(torch.cumsum(npair, 0) - npair, npair, output_size=tot)
        gpos = col_start[q_cols[rep]] + within
        pair_min = torch.minimum(q_vals[rep], g_vals[gpos])
        flat = q_rows[rep] * ng + (g_rows[gpos] - nq)
        sim.index_add_(0, flat, pair_min)
    sim = sim.view(nq, ng)
    return torch.div(sim, sim - 2).add_(1)  # 1 − s / (2 − s)
