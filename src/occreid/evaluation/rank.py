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

How it is computed (no argsort of the gallery). AP, CMC and INP only need the positions of
the true matches, and ``rank(k) = k + (number of non-matches ranked before the k-th match)``.
Per block of c queries (vectorised over the block; the only Python loop is over blocks):

- gather each query's true-match distances into a padded, sorted [c, P + 1] array (P is
  the largest number of true matches in the block, a few dozen);
- only non-matches at a distance ≤ the query's hardest (last) true match can be ranked
  before a true match: select them (usually a small fraction of the gallery);
- for each, ``b = searchsorted(match_distances, d)`` is the number of true matches ranked
  before it; a histogram of ``b`` per query and a cumulative sum give, for every k, the
  number of non-matches ranked before the k-th true match, hence ``rank(k)``.

Time is O(c · ng) elementwise work plus O(n_rel · log P) searches (n_rel: the selected
entries; when most entries are selected, e.g. for an untrained model, one dense search of
the block is used instead). Memory is O(c · ng) per block; no [nq, ng] index or match
matrix is ever built.

Ties (equal distances) are resolved by a documented rule instead of by the sort algorithm:

- ``tie_break="stable"`` (default): equal distances keep gallery order (as a stable argsort
  would rank them); deterministic, but it depends on the gallery order;
- ``tie_break="pessimistic"``: a true match is ranked after every non-match at the same
  distance (a worst case that cannot be gamed by gallery order, e.g. by constant outputs).
"""

from __future__ import annotations

import logging
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
# above 1/_DENSE_FRACTION relevant entries per block, one dense search is cheaper
_DENSE_FRACTION = 4


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
# the per-block kernel


def _rank_block(d: torch.Tensor, qp: torch.Tensor, qc: Optional[torch.Tensor],
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
    if flat.numel() * _DENSE_FRACTION > d.numel():  # most entries relevant: one dense search
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


def evaluate_rank(distmat: Union[ArrayLike, BlockDistance], q_pids: ArrayLike,
                  g_pids: ArrayLike, q_camids: Optional[ArrayLike],
                  g_camids: Optional[ArrayLike], max_rank: int = 50, *,
                  cross_camera: bool = True, ap_mode: str = "noninterp",
                  tie_break: str = "stable", chunk_size: int = 256,
                  return_per_query: bool = False,
                  device: Union[str, torch.device, None] = None) -> RankResult:
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
        chunk_size: queries per block. Temporaries take about 10 bytes per block entry
            (chunk_size × ng) for a trained model and up to ~60 when every entry must be
            placed (an untrained model): 0.2–1.3 GB at chunk 256 on MSMT17 (82,161 gallery).
        return_per_query: also return ``ap``, ``inp``, ``first_match_rank`` (per valid
            query) and ``valid_mask`` (over all queries).
        device: where to compute; default: the distance tensor's device (CPU for numpy).

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

    n_pos_all: List[torch.Tensor] = []
    first_all: List[torch.Tensor] = []
    ap_all: List[torch.Tensor] = []
    inp_all: List[torch.Tensor] = []
    stable = tie_break == "stable"
    ids_dev = None
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
        if ids_dev != d.device:  # move the ids once, to wherever the distances live
            ids_dev = d.device
            gp = g_pid.to(ids_dev)
            gc = g_cam.to(ids_dev) if g_cam is not None else None
        # one cheap reduction; NaN (or inf − inf) in the sum triggers the exact check
        if d.is_floating_point() and bool(torch.isnan(d.sum())) and bool(d.isnan().any()):
            bad = start + int(torch.isnan(d).any(dim=1).nonzero()[0])
            raise EvaluationInputError(
                f"distances contain NaN (first at query {bad}); NaN cannot be ranked — "
                "check the features for NaN/inf (e.g. fp16 overflow) before evaluating")
        qp = q_pid[start:stop].to(ids_dev)
        qc = q_cam[start:stop].to(ids_dev) if q_cam is not None else None
        n_pos, first, ap, inp = _rank_block(d, qp, qc, gp, gc, stable, ap_mode)
        n_pos_all.append(n_pos.cpu())
        first_all.append(first.cpu())
        ap_all.append(ap.cpu())
        inp_all.append(inp.cpu())

    n_pos = torch.cat(n_pos_all).numpy()
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

    first = torch.cat(first_all).numpy()[valid]  # int64, 1-based
    ap = torch.cat(ap_all).numpy()[valid]
    inp = torch.cat(inp_all).numpy()[valid]
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
