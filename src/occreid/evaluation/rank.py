"""Ranking metrics for re-identification: CMC, mAP and mINP (Market-1501 protocol).

Protocol (torchreid ``eval_market1501``, TransReID ``eval_func``, fast-reid ``eval_market1501``):

1. rank the gallery by increasing distance for each query;
2. drop the "junk": gallery items with the query's pid **and** camid (``cross_camera=True``);
   everything else stays, including same-camera items of other ids and distractors;
3. a query with no true match left is skipped (it counts in neither CMC nor mAP); here the
   skipped queries are counted and reported;
4. with ``R`` the true matches of query q and ``rank(k)`` the 1-based position of its k-th
   true match (k = 1..|R|) in the filtered list:

   - ``CMC_q(r) = [rank(1) ≤ r]``, r = 1..max_rank; CMC = mean over valid queries;
   - non-interpolated AP: ``AP_q = (1/|R|) Σ_k k / rank(k)`` (precision at each hit, full
     list, no cut-off; torchreid/TransReID/fast-reid);
   - trapezoid AP (official Market-1501 script): ``(1/|R|) Σ_k (p_before(k) + p_at(k)) / 2``
     with ``p_at(k) = k / rank(k)``, ``p_before(k) = (k − 1) / (rank(k) − 1)`` and
     ``p_before = 1`` when ``rank(k) = 1``;
   - INP (Ye et al., TPAMI 2021): ``INP_q = |R| / rank(|R|)``; mINP = mean over valid queries.

How it is computed (no argsort of the gallery, no [nq, ng] index or match matrix). AP, CMC
and INP only need the positions of the true matches. For the true match p of query q, with
k its 1-based position among q's true matches ordered by (distance, gallery index),

    rank(p) = k + #{non-matches j: d_j < d_p} + (non-matches tied with p placed before it),

so it is enough to *count*, for each true match, the entries of its row below it. Per block
of c queries (vectorised over the block; the only Python loops are over blocks and over the
≈ log2 halvings of a vectorised binary search):

- the same-pid gallery items of each query (true matches and junk, a few dozen) come from a
  grouping of the gallery by pid made once per call, not from a [c, ng] comparison;
- CPU, ``sparse`` path (a trained model): only entries at a distance ≤ the query's hardest
  true match can be ranked before a true match; they are selected (usually a small part of
  the row), sorted per row as (row, value) keys, and each true match is searched in its
  row's sorted entries;
- CPU, ``dense`` path (a bad model, where most of the row is selected): one sort of the
  values of each row (numpy's vectorised sort, several times faster than an argsort and
  than ``torch.sort``) and the same searches;
- the path is chosen per block from a sample of the block (the fraction of entries at a
  distance ≤ the hardest true match); the same-pid items are subtracted from the counts by
  a sort of their own;
- blocks are ranked by a pool of CPU threads (``num_threads``): numpy releases the GIL and
  no thread waits for another inside a block, so a core taken by another job slows the
  pool down in proportion instead of stalling it (as per-operation thread barriers do);
- GPU tensors use a torch kernel: the non-matches at a distance ≤ the hardest true match
  are searched in the sorted true-match distances (``b = searchsorted(...)`` = the number
  of true matches before each), and a histogram of ``b`` per query and a cumulative sum
  give rank(k).

Memory is O(c · ng) per block (one sorted copy of the block on the dense path).

Ties (equal distances) are resolved by a documented rule instead of by the sort algorithm:

- ``tie_break="stable"`` (default): equal distances keep gallery order (as a stable argsort
  would rank them); deterministic, but it depends on the gallery order;
- ``tie_break="pessimistic"``: a true match is ranked after every non-match at the same
  distance (a worst case that cannot be gamed by gallery order, e.g. by constant outputs).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .distance import EvaluationInputError

__all__ = ["RankResult", "evaluate_rank", "BlockDistance"]

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
#: ``block(start, stop) -> [stop - start, ng]`` distances for queries ``start:stop``.
BlockDistance = Callable[[int, int], Union[torch.Tensor, np.ndarray]]

_AP_MODES = ("noninterp", "trapezoid")
_TIE_BREAKS = ("stable", "pessimistic")
# elements per piece of the per-entry searches (bounds memory whatever the input)
_PIECE = 1 << 22
# CPU: above 1/_DENSE_FRACTION of a block at a distance ≤ its rows' hardest true match, one
# sort per row is cheaper than sorting those entries (measured crossover ≈ 0.14 at
# Occluded-Duke and Market sizes)
_DENSE_FRACTION = 7
# torch (GPU) kernel: above 1/_TORCH_DENSE_FRACTION relevant entries, one dense search
_TORCH_DENSE_FRACTION = 4
# every _SAMPLE_STRIDE-th gallery column estimates that fraction (CPU path choice)
_SAMPLE_STRIDE = 16
# tests force a CPU path: None (per block), "sparse", "dense" or "torch"
_FORCE_PATH: Optional[str] = None


@dataclass(frozen=True, eq=False)
class RankResult(Mapping[str, Any]):
    """Result of :func:`evaluate_rank`; also a read-only mapping (``res["mAP"]``, ``dict(res)``).

    Attributes:
        cmc: float64 [max_rank], fraction of valid queries whose first true match is at rank
            ≤ r (index r − 1). Padded with 1 beyond a query's filtered gallery length.
        mAP, mINP: means over valid queries, in [0, 1].
        rank1, rank5, rank10: CMC at ranks 1, 5, 10 (exact even when max_rank < 10).
        num_valid_queries, num_skipped_queries: queries with / without a true match left.
        ap, inp, first_match_rank: per valid query (float64, float64, int64 1-based), only
            with ``return_per_query=True``, else ``None`` (and absent from the mapping).
        valid_mask: bool [nq] over all queries, only with ``return_per_query=True``.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    rank1: float
    rank5: float
    rank10: float
    num_valid_queries: int
    num_skipped_queries: int
    ap: Optional[np.ndarray] = None
    inp: Optional[np.ndarray] = None
    first_match_rank: Optional[np.ndarray] = None
    valid_mask: Optional[np.ndarray] = None
    _keys: Tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        names = ["mAP", "mINP", "rank1", "rank5", "rank10", "cmc",
                 "num_valid_queries", "num_skipped_queries"]
        names += [k for k in ("ap", "inp", "first_match_rank", "valid_mask")
                  if getattr(self, k) is not None]
        object.__setattr__(self, "_keys", tuple(names))

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def summary(self) -> str:
        """One log line: ``mAP 31.7% | mINP 1.7% | R1 74.4% | R5 94.3% | R10 97.0% | ...``."""
        return (f"mAP {self.mAP:.1%} | mINP {self.mINP:.1%} | R1 {self.rank1:.1%} | "
                f"R5 {self.rank5:.1%} | R10 {self.rank10:.1%} | valid queries "
                f"{self.num_valid_queries}/{self.num_valid_queries + self.num_skipped_queries}")

    def to_dict(self) -> dict:
        """Plain-Python copy (lists, floats, ints) for JSON."""
        out = {}
        for k in self._keys:
            v = getattr(self, k)
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return out


# ------------------------------------------------------------------------------------------
# input handling


def _ids_to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise EvaluationInputError(f"{name} must be 1-D (one id per image), got shape {arr.shape}")
    return arr


def _encode_ids(q: Any, g: Any, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Query/gallery ids (numpy, torch, lists; ints, integral floats or strings) -> int64."""
    qa, ga = _ids_to_numpy(q, "q_" + name), _ids_to_numpy(g, "g_" + name)
    kinds = {qa.dtype.kind, ga.dtype.kind} - {"b", "i", "u"}
    if kinds <= {"f"} and kinds:
        both = np.concatenate([qa.astype(np.float64), ga.astype(np.float64)])
        if not np.all(np.isfinite(both)) or not np.all(both == np.round(both)):
            raise EvaluationInputError(
                f"{name} must be integers (or strings); got non-integral float values in "
                f"q_{name}/g_{name}")
        qa, ga = qa.astype(np.int64), ga.astype(np.int64)
    elif kinds:  # strings / objects: encode jointly so equal labels get equal codes
        _, codes = np.unique(np.concatenate([qa.astype(str), ga.astype(str)]),
                             return_inverse=True)
        qa, ga = codes[: len(qa)], codes[len(qa):]
    return (torch.from_numpy(np.ascontiguousarray(qa, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(ga, dtype=np.int64)))


def _to_block_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise EvaluationInputError(f"{what} must hold real numbers, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise EvaluationInputError(
            f"{what} must be a numpy array or torch tensor, got {type(x).__name__}")
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # exact and order-preserving; CPU kernels for half are slow or missing
    elif x.dtype == torch.bool or x.is_complex():
        raise EvaluationInputError(f"{what} must hold real numbers, got dtype {x.dtype}")
    return x


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EvaluationInputError(f"{name} must be an int ≥ {minimum}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------
# the CPU kernels (numpy): counting ranks of the true matches


class _Gallery:
    """Gallery ids grouped once per call: the same-pid items of a query without an [c, ng]
    comparison (their gallery indices in increasing order)."""

    def __init__(self, g_pid: np.ndarray, g_cam: Optional[np.ndarray]) -> None:
        self.pid, self.cam, self.ng = g_pid, g_cam, int(g_pid.size)
        self.order = np.argsort(g_pid, kind="stable")
        self.uniq, self.start, self.count = np.unique(g_pid[self.order], return_index=True,
                                                      return_counts=True)

    def matches(self, qp: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(first slot in ``order``, number of same-pid gallery items) per query."""
        if self.uniq.size == 0:
            z = np.zeros(qp.size, dtype=np.int64)
            return z, z
        i = np.minimum(np.searchsorted(self.uniq, qp), self.uniq.size - 1)
        found = self.uniq[i] == qp
        return np.where(found, self.start[i], 0), np.where(found, self.count[i], 0)


def _top_value(dtype: np.dtype) -> Any:
    return np.inf if dtype.kind == "f" else np.iinfo(dtype).max


def _seg_search(sorted_flat: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray,
                x: np.ndarray, right: bool) -> np.ndarray:
    """Vectorised binary search of each x[t] in its own sorted segment
    ``sorted_flat[seg_start[t] : seg_start[t] + seg_len[t]]``: the number of segment values
    < x[t] (``right``: ≤ x[t]). The loop runs over the ⌈log2(len + 1)⌉ halvings."""
    lo = np.zeros(x.shape, dtype=np.int64)
    hi = seg_len.astype(np.int64, copy=True)
    if x.size == 0:
        return lo
    top = np.maximum(seg_len - 1, 0)
    for _ in range(int(seg_len.max()).bit_length()):
        mid = (lo + hi) >> 1
        v = sorted_flat[seg_start + np.minimum(mid, top)]
        go = (v <= x) if right else (v < x)
        go &= lo < hi
        lo = np.where(go, mid + 1, lo)
        hi = np.where(go, hi, np.minimum(hi, mid))
    return lo


def _f32_keys(v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Order-preserving int64 keys (row, float32 value): row in the high 32 bits, the
    value's IEEE bits mapped to an unsigned order in the low 32 (-0.0 is folded into +0.0
    first, so that equal floats get equal keys)."""
    b = (v + np.float32(0.0)).view(np.int32).astype(np.int64)
    u = np.where(b < 0, ~b & 0xFFFFFFFF, b | 0x80000000)  # negatives reversed, below positives
    return (rows.astype(np.int64) << 32) | u


def _counts_dense(d: np.ndarray, pr: np.ndarray, pv: np.ndarray) -> Tuple[np.ndarray, ...]:
    """#{j: d[r, j] < v} and #{j: d[r, j] ≤ v} for each needle (r, v): one sort per row."""
    c, ng = d.shape
    flat = np.sort(d, axis=1).reshape(-1)
    start = pr * ng
    length = np.full(pr.shape, ng, dtype=np.int64)
    return (_seg_search(flat, start, length, pv, right=False),
            _seg_search(flat, start, length, pv, right=True))


def _counts_sparse(d: np.ndarray, last: np.ndarray, has_pos: np.ndarray, pr: np.ndarray,
                   pv: np.ndarray) -> Tuple[np.ndarray, ...]:
    """The same counts from the entries at a distance ≤ the row's hardest true match only
    (every entry ranked before some true match is one of them)."""
    c = d.shape[0]
    mask = d <= last[:, None]
    mask[~has_pos] = False  # skipped queries: nothing to place
    per_row = np.count_nonzero(mask, axis=1)
    v = d[mask]  # row-major: grouped by row
    rows = np.repeat(np.arange(c, dtype=np.int64), per_row)
    seg_start = np.cumsum(per_row) - per_row
    if v.dtype == np.float32:  # one int64 sort of (row, value) keys
        keys = np.sort(_f32_keys(v, rows))
        needles = _f32_keys(pv, pr)
        base = seg_start[pr]
        return (np.searchsorted(keys, needles, side="left") - base,
                np.searchsorted(keys, needles, side="right") - base)
    vs = v[np.lexsort((v, rows))]
    return (_seg_search(vs, seg_start[pr], per_row[pr], pv, right=False),
            _seg_search(vs, seg_start[pr], per_row[pr], pv, right=True))


def _rank_block_numpy(d: np.ndarray, qp: np.ndarray, qc: Optional[np.ndarray],
                      gal: _Gallery, stable: bool, ap_mode: str,
                      path: str = "auto") -> Tuple[np.ndarray, ...]:
    """Metrics for one block of queries on the CPU, by counting (no argsort).

    For the true match p of query q (at distance d_p, gallery index j_p), with k its
    1-based position among q's true matches ordered by (distance, gallery index):

        rank(p) = k + #{non-matches j: d_j < d_p} + X,
        X = #{non-matches j: d_j = d_p, j < j_p}   (stable)
          = #{non-matches j: d_j = d_p}             (pessimistic),

    where "non-matches" are the gallery items of another pid (junk is removed, true
    matches are counted by k). #{all j: d_j < d_p} and #{all j: d_j ≤ d_p} come from a
    sort of the row (``dense``) or of its entries at a distance ≤ the hardest true match
    (``sparse``, a good model: a small part of the row); the same-pid items (true matches
    and junk, a few dozen) are subtracted from a sort of their own.

    Returns n_pos [c] (0 = skipped), first [c] (1-based rank of the first true match), ap
    [c] float64, inp [c] float64, the chosen path; entries of skipped queries are 0.
    """
    c, ng = d.shape
    zeros_f = np.zeros(c, dtype=np.float64)
    zeros_i = np.zeros(c, dtype=np.int64)
    start, count = gal.matches(qp)
    m_max = int(count.max()) if c else 0
    if m_max == 0:
        return zeros_i, zeros_i.copy(), zeros_f, zeros_f.copy(), "none"

    # -- the same-pid gallery items of each query, [c, M], gallery indices increasing
    slot = np.arange(m_max)
    in_row = slot < count[:, None]
    gidx = gal.order[np.where(in_row, start[:, None] + slot, 0)]
    dm = np.take_along_axis(d, gidx, axis=1)
    pos = in_row & (gal.cam[gidx] != qc[:, None]) if qc is not None else in_row
    n_pos = np.count_nonzero(pos, axis=1).astype(np.int64)
    p_max = int(n_pos.max())
    if p_max == 0:
        return n_pos, zeros_i.copy(), zeros_f, zeros_f.copy(), "none"
    top = _top_value(d.dtype)

    # -- true matches first, by (distance, gallery index): slot k-1 holds the k-th one
    order = np.lexsort((np.where(pos, dm, top), ~pos), axis=1)[:, :p_max]
    sp_d = np.take_along_axis(dm, order, axis=1)
    sp_j = np.take_along_axis(gidx, order, axis=1)
    pr, pk = np.nonzero(np.arange(p_max) < n_pos[:, None])  # row-major: k increases per row
    pv, pj = sp_d[pr, pk], sp_j[pr, pk]

    # -- #{same-pid items j: d_j < d_p} and (≤): their own sort, searched per row
    ms = np.sort(np.where(in_row, dm, top), axis=1).reshape(-1)
    m_lt = _seg_search(ms, pr * m_max, count[pr], pv, right=False)
    m_le = _seg_search(ms, pr * m_max, count[pr], pv, right=True)

    # -- #{all items j: d_j < d_p} and (≤)
    has_pos = n_pos > 0
    last = sp_d[np.arange(c), np.maximum(n_pos - 1, 0)]  # hardest true match of each row
    if path == "auto":
        # the fraction of the row at a distance ≤ the hardest true match, from a sample
        sample = d[has_pos, ::_SAMPLE_STRIDE]
        frac = float(np.count_nonzero(sample <= last[has_pos, None])) / max(sample.size, 1)
        path = "dense" if frac * _DENSE_FRACTION > 1.0 else "sparse"
    if path == "dense":
        a_lt, a_le = _counts_dense(d, pr, pv)
    else:
        a_lt, a_le = _counts_sparse(d, last, has_pos, pr, pv)
    nm_lt = a_lt - m_lt  # non-matches strictly before
    nm_eq = (a_le - a_lt) - (m_le - m_lt)  # non-matches at the same distance
    if stable:
        extra = np.zeros_like(nm_eq)
        tied = np.flatnonzero(nm_eq)
        if tied.size:  # rare: place tied non-matches by gallery index, piece by piece
            extra[tied] = _tied_before(d, qp, gal.pid, pr[tied], pv[tied], pj[tied])
    else:
        extra = nm_eq

    k = pk + 1
    rank = k + nm_lt + extra  # 1-based, increasing in k within a row
    rank_f, k_f = rank.astype(np.float64), k.astype(np.float64)
    prec_at = k_f / rank_f
    if ap_mode == "trapezoid":
        prec_before = np.where(rank > 1, (k_f - 1) / np.maximum(rank_f - 1, 1.0), 1.0)
        terms = (prec_at + prec_before) / 2
    else:
        terms = prec_at
    ap = np.bincount(pr, weights=terms, minlength=c) / np.maximum(n_pos, 1)
    row_first = np.cumsum(n_pos) - n_pos  # index of each row's first needle
    first = np.where(has_pos, rank[np.minimum(row_first, rank.size - 1)], 0)
    last_rank = rank[np.maximum(row_first + n_pos - 1, 0)]
    inp = np.where(has_pos, n_pos / np.where(has_pos, last_rank, 1), 0.0)
    return n_pos, first.astype(np.int64), ap, inp, path


def _tied_before(d: np.ndarray, qp: np.ndarray, g_pid: np.ndarray, rows: np.ndarray,
                 v: np.ndarray, j: np.ndarray) -> np.ndarray:
    """#{non-matches i of row r with d[r, i] = v and i < j} for each (r, v, j)."""
    ng = d.shape[1]
    out = np.empty(rows.shape, dtype=np.int64)
    idx = np.arange(ng)
    piece = max(1, _PIECE // max(ng, 1))
    for s in range(0, rows.size, piece):  # pieces bound memory on all-tied inputs
        r, e = rows[s:s + piece], slice(s, s + piece)
        hit = (d[r] == v[e, None]) & (idx < j[e, None]) & (g_pid != qp[r][:, None])
        out[e] = np.count_nonzero(hit, axis=1)
    return out


# ------------------------------------------------------------------------------------------
# the torch kernel (GPU tensors): search of the relevant entries in the sorted true matches


def _rank_block_torch(d: torch.Tensor, qp: torch.Tensor, qc: Optional[torch.Tensor],
                gp: torch.Tensor, gc: Optional[torch.Tensor], stable: bool,
                ap_mode: str) -> Tuple[torch.Tensor, ...]:
    """Metrics for one block of queries.

    Args:
        d: [c, ng] distances; qp/qc: [c] query ids/cams; gp/gc: [ng]; cams None = no junk.
    Returns:
        n_pos [c] (0 = skipped), first [c] (1-based rank of first true match), ap [c] f64,
        inp [c] f64; entries of skipped queries are 0.
    """
    c, ng = d.shape
    dev = d.device
    match = gp.unsqueeze(0) == qp.unsqueeze(1)  # [c, ng] same identity
    if qc is not None:
        pos = match & (gc.unsqueeze(0) != qc.unsqueeze(1))  # true matches minus junk
    else:
        pos = match
    # true matches, row-major (so gallery indices increase within a row)
    rows, cols = pos.nonzero(as_tuple=True)
    n_pos = torch.bincount(rows, minlength=c)  # |R| per query, [c]
    p_max = int(n_pos.max()) if c else 0
    zeros_f = torch.zeros(c, dtype=torch.float64, device=dev)
    if p_max == 0:
        return n_pos, torch.zeros(c, dtype=torch.int64, device=dev), zeros_f, zeros_f.clone()

    # -- true-match distances, padded with +inf to [c, P + 1], in increasing gallery order
    row_start = torch.cumsum(n_pos, 0) - n_pos
    slot = torch.arange(rows.numel(), device=dev) - row_start[rows]
    pad = float("inf") if d.is_floating_point() else torch.iinfo(d.dtype).max
    # one spare padding column so that pos_d[:, b] exists for every b ≤ |R| (tie check)
    pos_d = torch.full((c, p_max + 1), pad, dtype=d.dtype, device=dev)
    pos_d[rows, slot] = d[rows, cols]
    pos_j = torch.full((c, p_max + 1), ng, dtype=torch.int64, device=dev)
    pos_j[rows, slot] = cols
    # stable sort: ties keep gallery order; real +inf matches stay before the padding
    pos_d, order = torch.sort(pos_d, dim=1, stable=True)  # [c, P + 1]
    pos_j = pos_j.gather(1, order)

    # -- only non-matches with d_i ≤ (hardest true match's distance) can be ranked before a
    #    true match; the others (usually the vast majority) never enter a rank. Skipped
    #    queries (|R| = 0) get the lowest value, so at most entries at -inf stay relevant
    #    for them, which is harmless: every metric of a skipped query is masked out.
    lowest = float("-inf") if d.is_floating_point() else torch.iinfo(d.dtype).min
    last_d = pos_d.gather(1, (n_pos - 1).clamp(min=0).unsqueeze(1))  # [c, 1]
    last_d = last_d.masked_fill(n_pos.unsqueeze(1) == 0, lowest)
    relevant = (d <= last_d) & ~match  # [c, ng]
    d = d.contiguous()
    flat = torch.nonzero(relevant.view(-1)).squeeze(1)  # flat indices q·ng + i, [n]
    r = torch.div(flat, ng, rounding_mode="floor")  # query row of each entry
    v = d.view(-1).take(flat)  # its distance

    # -- b = number of true matches ranked before non-match (r, i)
    #    pessimistic: matches with d_p < d_i  (matches at equal distance come after i)
    #    (the padding is the largest value, never < d_i, so b ≤ |R|)
    width = p_max + 1
    if flat.numel() * _TORCH_DENSE_FRACTION > d.numel():  # most relevant: one dense search
        b = torch.searchsorted(pos_d, d).view(-1).take(flat)
    else:
        b = torch.empty_like(flat)
        piece = max(1, _PIECE // width)
        for s in range(0, flat.numel(), piece):  # search each entry in its own query's row
            b[s:s + piece] = torch.searchsorted(pos_d[r[s:s + piece]],
                                                v[s:s + piece].unsqueeze(1)).squeeze(1)
    cell = r * width + b  # flat index into [c, P + 1]
    if stable:
        # a tie between non-match i and matches at equal distance: i goes before those
        # matches with a larger gallery index. Tied entries are usually few: resolve sparsely.
        tied = torch.nonzero(pos_d.view(-1).take(cell) == v).squeeze(1)  # d_i = next match's
        if tied.numel():
            r_t = r[tied]
            b_t = _resolve_stable_ties(b[tied], r_t, flat[tied] - r_t * ng, pos_d, pos_j,
                                       n_pos, ng)
            cell[tied] = r_t * width + b_t

    # -- histogram of b per query, then cumsum:
    #    cnt[q, k] = #non-matches with b ≤ k = #non-matches ranked before the (k+1)-th match
    hist = torch.bincount(cell, minlength=c * width).view(c, width)
    cnt = torch.cumsum(hist, dim=1, dtype=torch.int64)[:, :p_max]  # [c, P]
    k = torch.arange(1, p_max + 1, device=dev)  # 1..P
    rank = k.unsqueeze(0) + cnt  # [c, P] 1-based rank of the k-th true match
    valid_slot = k.unsqueeze(0) <= n_pos.unsqueeze(1)  # [c, P]

    rank_f = rank.to(torch.float64)
    k_f = k.to(torch.float64).unsqueeze(0)
    prec_at = k_f / rank_f  # precision at the k-th hit
    if ap_mode == "trapezoid":
        prec_before = torch.where(rank > 1, (k_f - 1) / (rank_f - 1).clamp(min=1.0),
                                  torch.ones_like(rank_f))
        terms = (prec_at + prec_before) / 2
    else:
        terms = prec_at
    n_pos_f = n_pos.to(torch.float64)
    safe_n = n_pos_f.clamp(min=1.0)
    ap = (terms * valid_slot).sum(dim=1) / safe_n
    last = rank.gather(1, (n_pos - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    inp = torch.where(n_pos > 0, n_pos_f / last.to(torch.float64), zeros_f)
    first = torch.where(n_pos > 0, rank[:, 0], torch.zeros_like(rank[:, 0]))
    return n_pos, first, ap, inp


def _resolve_stable_ties(b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         pos_d: torch.Tensor, pos_j: torch.Tensor, n_pos: torch.Tensor,
                         ng: int) -> torch.Tensor:
    """Stable order for non-matches (rows, cols) tied with true matches.

    Returns b + #{true matches p with d_p == d_i and gallery index j_p < i}. Within a group
    of equal true-match distances the matches are sorted by gallery index, so with g = first
    slot of the group, key = g·(ng+1) + j increases along each row and
    ``searchsorted(key, g·(ng+1) + i)`` = g + #{group members with j < i}; for a tied entry,
    b is exactly g.
    """
    c, width = pos_d.shape
    group = torch.searchsorted(pos_d, pos_d)  # first slot with the same distance, [c, P+1]
    key = group * (ng + 1) + pos_j
    padding = torch.arange(width, device=b.device).unsqueeze(0) >= n_pos.unsqueeze(1)
    key = key.masked_fill(padding, torch.iinfo(torch.int64).max)
    out = torch.empty_like(b)
    piece = max(1, _PIECE // width)
    for s in range(0, b.numel(), piece):  # pieces bound memory on all-tied inputs
        query_key = (b[s:s + piece] * (ng + 1) + cols[s:s + piece]).unsqueeze(1)  # [n, 1]
        out[s:s + piece] = torch.searchsorted(key[rows[s:s + piece]], query_key).squeeze(1)
    return out


# ------------------------------------------------------------------------------------------
# public entry point


def _nan_error(query: int) -> EvaluationInputError:
    return EvaluationInputError(
        f"distances contain NaN (first at query {query}); NaN cannot be ranked — "
        "check the features for NaN/inf (e.g. fp16 overflow) before evaluating")


def _cpu_workers(num_threads: Optional[int]) -> int:
    """Threads over blocks on the CPU: ``num_threads``, else torch's intra-op thread count,
    at most the number of CPUs this process may use."""
    if num_threads is None:
        num_threads = torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(int(num_threads), cpus))


def _cpu_block(d: np.ndarray, start: int, qp: np.ndarray, qc: Optional[np.ndarray],
               gal: _Gallery, stable: bool, ap_mode: str) -> Tuple[Any, ...]:
    """NaN check + :func:`_rank_block_numpy` for the block of queries ``start:``."""
    if d.dtype.kind == "f" and d.size and np.isnan(d.min()):
        raise _nan_error(start + int(np.flatnonzero(np.isnan(d).any(axis=1))[0]))
    return _rank_block_numpy(d, qp, qc, gal, stable, ap_mode, _FORCE_PATH or "auto")


def evaluate_rank(distmat: Union[ArrayLike, BlockDistance], q_pids: ArrayLike,
                  g_pids: ArrayLike, q_camids: Optional[ArrayLike],
                  g_camids: Optional[ArrayLike], max_rank: int = 50, *,
                  cross_camera: bool = True, ap_mode: str = "noninterp",
                  tie_break: str = "stable", chunk_size: int = 256,
                  return_per_query: bool = False,
                  device: Union[str, torch.device, None] = None,
                  num_threads: Optional[int] = None) -> RankResult:
    """CMC, mAP and mINP of a ranking under the Market-1501 protocol (see module docstring).

    Args:
        distmat: distances [nq, ng] (numpy or torch, any real dtype, CPU or GPU; smaller =
            more similar), **or** a block function ``block(start, stop)`` returning the
            [stop − start, ng] distances of queries ``start:stop`` (e.g. DPM's
            query-conditioned masked distance, or :class:`DistanceBlocks`). An object with
            ``num_queries`` and ``__call__`` is accepted too. A block function is called
            once per chunk, in order, so the full matrix never exists.
        q_pids, g_pids: identities (numpy, torch or lists; ints or strings).
        q_camids, g_camids: cameras; may be ``None`` only with ``cross_camera=False``.
        max_rank: length of the returned CMC. It is **not** lowered to the gallery size:
            ranks beyond a query's filtered gallery repeat its last CMC value (1).
        cross_camera: drop gallery items with the query's pid and camid (standard). False:
            keep them (every same-pid gallery item is a true match).
        ap_mode: ``"noninterp"`` (torchreid/TransReID/fast-reid) or ``"trapezoid"`` (the
            official Market-1501 evaluation script).
        tie_break: ``"stable"`` (equal distances keep gallery order) or ``"pessimistic"``
            (true matches after equal-distance non-matches).
        chunk_size: queries per block. On the CPU, temporaries take about 5–7 bytes per
            block entry (chunk_size × ng) and per thread (measured: +13 to +55 MiB at
            Occluded-Duke size with 2 threads, docs/benchmarks.md); the torch (GPU) kernel
            up to ~60 bytes when every entry must be placed (an untrained model).
        return_per_query: also return ``ap``, ``inp``, ``first_match_rank`` (per valid
            query) and ``valid_mask`` (over all queries).
        device: where to compute; default: the distance tensor's device (CPU for numpy).
        num_threads: CPU only: blocks ranked in parallel by a thread pool (numpy releases
            the GIL; no thread waits on another inside a block, so a busy core slows the
            pool down gracefully). Default: ``torch.get_num_threads()``, at most the CPUs
            available. Results do not depend on it.

    Raises:
        EvaluationInputError (a ValueError): inconsistent shapes or ids, NaN distances, bad
            options, or no query with a true match left.
    """
    max_rank = _check_int(max_rank, "max_rank", 1)
    chunk_size = _check_int(chunk_size, "chunk_size", 1)
    if ap_mode not in _AP_MODES:
        raise EvaluationInputError(f"ap_mode must be one of {_AP_MODES}, got {ap_mode!r}")
    if tie_break not in _TIE_BREAKS:
        raise EvaluationInputError(f"tie_break must be one of {_TIE_BREAKS}, got {tie_break!r}")

    q_pid, g_pid = _encode_ids(q_pids, g_pids, "pids")
    nq, ng = q_pid.numel(), g_pid.numel()
    if cross_camera:
        if q_camids is None or g_camids is None:
            raise EvaluationInputError(
                "q_camids and g_camids are required with cross_camera=True (same-pid "
                "same-camera gallery items are removed); pass cross_camera=False to skip it")
        q_cam, g_cam = _encode_ids(q_camids, g_camids, "camids")
        if q_cam.numel() != nq or g_cam.numel() != ng:
            raise EvaluationInputError(
                f"camid lengths ({q_cam.numel()}, {g_cam.numel()}) differ from pid lengths "
                f"({nq}, {ng}); give one pid and one camid per image")
    else:
        q_cam = g_cam = None
    if nq == 0:
        raise EvaluationInputError("no queries: q_pids is empty")

    dense: Optional[torch.Tensor] = None
    block_fn: Optional[BlockDistance] = None
    if isinstance(distmat, (np.ndarray, torch.Tensor)):
        dense = _to_block_tensor(distmat, "distmat")
        if dense.dim() != 2 or tuple(dense.shape) != (nq, ng):
            raise EvaluationInputError(
                f"distmat must be [num_query, num_gallery] = [{nq}, {ng}] (from the pid "
                f"lengths), got shape {tuple(dense.shape)}")
    elif callable(distmat):
        block_fn = distmat
        n_declared = getattr(distmat, "num_queries", None)
        if n_declared is not None and int(n_declared) != nq:
            raise EvaluationInputError(
                f"the block distance declares num_queries={n_declared} but q_pids has {nq} "
                "entries")
    else:
        raise EvaluationInputError(
            "distmat must be a numpy array, a torch tensor, or a callable "
            f"block(start, stop) -> [stop - start, num_gallery]; got {type(distmat).__name__}")

    dev = torch.device(device) if device is not None else (
        dense.device if dense is not None else None)

    stable = tie_break == "stable"
    n_blocks = -(-nq // chunk_size)
    workers = min(_cpu_workers(num_threads), n_blocks)
    q_pid_np, g_pid_np = q_pid.numpy(), g_pid.numpy()
    q_cam_np = q_cam.numpy() if q_cam is not None else None
    gallery: Optional[_Gallery] = None
    ids_dev = None
    outputs: List[Any] = []  # per block: a tuple, or a Future of one (CPU thread pool)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for start in range(0, nq, chunk_size):
            stop = min(start + chunk_size, nq)
            if dense is not None:
                d = dense[start:stop]
            else:
                d = _to_block_tensor(block_fn(start, stop), f"block({start}, {stop})")
                if tuple(d.shape) != (stop - start, ng):
                    raise EvaluationInputError(
                        f"block({start}, {stop}) returned shape {tuple(d.shape)}, expected "
                        f"[{stop - start}, {ng}] (queries start:stop × all gallery items)")
            if dev is not None:
                d = d.to(dev)
            if d.device.type == "cpu" and _FORCE_PATH != "torch":  # numpy, by counting
                if gallery is None:
                    gallery = _Gallery(g_pid_np, g_cam.numpy() if g_cam is not None else None)
                args = (d.numpy(), start, q_pid_np[start:stop],
                        q_cam_np[start:stop] if q_cam_np is not None else None, gallery,
                        stable, ap_mode)
                if pool is None:
                    outputs.append(_cpu_block(*args))
                else:
                    outputs.append(pool.submit(_cpu_block, *args))
                    # bounded memory: at most `workers` blocks in flight beyond this one
                    if len(outputs) > workers and isinstance(outputs[-workers - 1], Future):
                        outputs[-workers - 1] = outputs[-workers - 1].result()
                continue
            if ids_dev != d.device:  # move the ids once, to wherever the distances live
                ids_dev = d.device
                gp = g_pid.to(ids_dev)
                gc = g_cam.to(ids_dev) if g_cam is not None else None
            # one cheap reduction; NaN (or inf − inf) in the sum triggers the exact check
            if d.is_floating_point() and bool(torch.isnan(d.sum())) and bool(d.isnan().any()):
                raise _nan_error(start + int(torch.isnan(d).any(dim=1).nonzero()[0]))
            qp = q_pid[start:stop].to(ids_dev)
            qc = q_cam[start:stop].to(ids_dev) if q_cam is not None else None
            out = _rank_block_torch(d, qp, qc, gp, gc, stable, ap_mode)
            outputs.append(tuple(t.cpu().numpy() for t in out) + ("torch",))
        outputs = [o.result() if isinstance(o, Future) else o for o in outputs]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if logger.isEnabledFor(logging.DEBUG):
        paths = [o[4] for o in outputs]
        logger.debug("evaluate_rank: %d blocks of %d queries, %d CPU workers; paths %s",
                     n_blocks, chunk_size, workers,
                     {p: paths.count(p) for p in sorted(set(paths))})

    n_pos = np.concatenate([o[0] for o in outputs])
    valid = n_pos > 0
    num_valid = int(valid.sum())
    num_skipped = nq - num_valid
    if num_valid == 0:
        policy = ("gallery items with the query's pid AND camid are removed (cross_camera=True)"
                  if cross_camera else "cross_camera=False")
        raise EvaluationInputError(
            f"all {nq} queries were skipped: none has a true match left in the gallery "
            f"({ng} items; {policy}). Check that query identities appear in the gallery and, "
            "for datasets without real cameras (Occluded-REID, Partial-REID), give query and "
            "gallery different camids (e.g. query=0, gallery=1); or pass cross_camera=False.")
    if num_skipped:
        logger.warning("%d of %d queries have no true match in the gallery after junk removal "
                       "and were skipped (not counted in CMC/mAP/mINP)", num_skipped, nq)

    first = np.concatenate([o[1] for o in outputs]).astype(np.int64)[valid]  # 1-based
    ap = np.concatenate([o[2] for o in outputs]).astype(np.float64)[valid]
    inp = np.concatenate([o[3] for o in outputs]).astype(np.float64)[valid]
    # CMC[r-1] = fraction of valid queries with first match rank ≤ r
    hits = np.bincount(np.minimum(first, max_rank + 1), minlength=max_rank + 2)[1:max_rank + 1]
    cmc = np.cumsum(hits, dtype=np.float64) / num_valid

    def rank_at(r: int) -> float:
        return float(np.count_nonzero(first <= r)) / num_valid

    return RankResult(
        cmc=cmc,
        mAP=float(ap.mean()),
        mINP=float(inp.mean()),
        rank1=rank_at(1),
        rank5=rank_at(5),
        rank10=rank_at(10),
        num_valid_queries=num_valid,
        num_skipped_queries=num_skipped,
        ap=ap if return_per_query else None,
        inp=inp if return_per_query else None,
        first_match_rank=first if return_per_query else None,
        valid_mask=valid if return_per_query else None,
    )
