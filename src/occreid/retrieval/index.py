"""Gallery index: features + paths (+ ids) of a gallery, saved in one file, searched exactly or
with faiss.

Distances
---------
Features are stored L2-normalised, so for the baseline and FED the score is the cosine
similarity ``s_ij = q̂_i · ĝ_j`` (squared Euclidean distance ``2 - 2 s`` ranks the same). DPM
uses its query-conditioned masked cosine (dpm-official.md §7; DPM paper Sec. 3.4): the query's
HMG mask ``m_i`` multiplies every gallery feature::

    s_ij = x_i · normalize(m_i ⊙ ĝ_j) = a_i · ĝ_j / ‖m_i ⊙ ĝ_j‖,   a_i = x_i ⊙ m_i

with ``x_i = q̂_i`` (official) or the masked query with ``mask_query``; with
``mask_norm="normalize_then_mask"`` the denominator is 1. Reported scores are these similarities
(higher = closer; the evaluator's arccos / 1 - s distances rank identically).

Search backends
---------------
* ``"exact"`` (default without faiss): chunked brute force in torch, a running top-k over
  gallery blocks, so memory stays O(Q · block). DPM: the two GEMMs of
  :class:`occreid.evaluation.masked_distance.MaskedCosineDistance` per block.
* ``"faiss"``: the index's :class:`~occreid.retrieval.faiss_backend.FaissSearcher` (exact
  ``flat``, approximate ``ivf`` / ``ivfpq`` / ``hnsw``). For DPM the numerator ``a_i · ĝ_j`` is a
  maximum-inner-product search over the same gallery vectors, so one faiss index serves every
  query mask: faiss returns ``K' = rescore · k`` candidates by numerator, which are **re-scored
  exactly** with the masked cosine and the best ``k`` kept. Because ``ĝ_j`` has unit length,
  ``‖m_i ⊙ ĝ_j‖ >= min_c m_ic``, so any gallery item outside the candidates scores at most
  ``u_i = max(t_i, 0) / min_c m_ic`` where ``t_i`` is the smallest candidate numerator. With an
  exact (``flat``) index a query whose k-th re-scored similarity is ``>= u_i`` is therefore
  **certified exact**; the others are searched again by brute force (``exact_fallback``), so a
  flat faiss index returns exact DPM results. With an approximate index the result's recall is
  measured (``bench/search.py``, ``tests/test_retrieval.py``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..data.base import IMAGE_EXTENSIONS, MARKET_NAME_RE
from ..utils.io import OccReIDError, atomic_save, read_image, safe_torch_load
from .faiss_backend import FaissSearcher, faiss_available

logger = logging.getLogger(__name__)

__all__ = [
    "INDEX_FORMAT",
    "BACKENDS",
    "GalleryIndex",
    "SearchResult",
    "exact_topk",
    "masked_numerator_queries",
    "masked_rescore",
    "list_gallery_images",
]

INDEX_FORMAT = "occreid-index"
INDEX_VERSION = 1
BACKENDS = ("auto", "exact", "faiss")
DISTANCES = ("cosine", "dpm_masked_cosine")

_NORM_EPS = 1e-12  # F.normalize's eps, as in occreid.losses.arcface.masked_cosine
_BLOCK_ELEMENTS = 1 << 24  # 64 MB of float32 per temporary score / candidate block

ArrayLike = Union[torch.Tensor, np.ndarray]


# --------------------------------------------------------------------------------------------
# Search primitives
# --------------------------------------------------------------------------------------------


def _merge_topk(best_s, best_i, s, offset: int, k: int):
    kk = min(k, s.shape[1])
    bs, bi = s.topk(kk, dim=1)
    bi = bi + offset
    if best_s is None:
        return bs, bi
    cat_s = torch.cat([best_s, bs], 1)
    cat_i = torch.cat([best_i, bi], 1)
    top_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
    return top_s, cat_i.gather(1, pos)


def exact_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    query_masks: Optional[torch.Tensor] = None,
    mask_norm: str = "mask_then_normalize",
    mask_query: bool = False,
    block_size: Optional[int] = None,
    gallery_normalized: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` by cosine (or DPM masked cosine when ``query_masks`` is given).

    Args:
        queries: [Q, D]; gallery: [N, D] (both are L2-normalised here).
        query_masks: DPM query masks [Q, D]; None for plain cosine.
        block_size: gallery rows per block (default: keeps a block's scores near 64 MB).
        gallery_normalized: the gallery rows already have unit length (skip normalising them).

    Returns ``(scores [Q, k'], indices [Q, k'])`` best first, ``k' = min(k, N)``.
    """
    q = F.normalize(queries.float(), dim=1)
    g = gallery
    n = int(g.shape[0])
    k = int(min(k, n))
    if block_size is None:
        block_size = min(1 << 16, max(1024, _BLOCK_ELEMENTS // max(1, q.shape[0])))
    renorm = mask_norm == "mask_then_normalize"
    if query_masks is not None:
        m = query_masks.to(q.device).float()
        a = masked_numerator_queries(q, m, mask_norm=mask_norm, mask_query=mask_query)  # [Q, D]
        m2 = m.square()
        sq_buf = torch.empty(min(block_size, n), g.shape[1], device=q.device)  # reused: no page faults per block
    best_s = best_i = None
    for start in range(0, n, block_size):
        gb = g[start : start + block_size].to(q.device).float()
        if not gallery_normalized:
            gb = F.normalize(gb, dim=1)
        if query_masks is None:
            s = q @ gb.t()  # [Q, b] cosine
        else:
            # S = (A Ĝᵀ) ⊘ sqrt(M² (Ĝ²)ᵀ): the two GEMMs of MaskedCosineDistance (dpm-official.md §7),
            # on gallery blocks that are already unit length
            s = a @ gb.t()
            if renorm:
                sq = torch.mul(gb, gb, out=sq_buf[: gb.shape[0]])  # Ĝ² of the block
                s = s / (m2 @ sq.t()).clamp_min(_NORM_EPS * _NORM_EPS).sqrt()
        best_s, best_i = _merge_topk(best_s, best_i, s, start, k)
    if best_s is None:
        return torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
    return best_s, best_i


def masked_numerator_queries(
    queries: torch.Tensor, masks: torch.Tensor, *, mask_norm: str = "mask_then_normalize", mask_query: bool = False
) -> torch.Tensor:
    """``a_i = x_i ⊙ m_i`` [Q, D]: the vector whose inner product with a unit gallery feature
    ``ĝ_j`` is the numerator of DPM's masked cosine (same steps as
    :func:`occreid.losses.arcface.masked_cosine`)."""
    x = F.normalize(queries.float(), dim=1, eps=_NORM_EPS)
    m = masks.float()
    if mask_query:
        x = x * m
        if mask_norm == "mask_then_normalize":
            x = F.normalize(x, dim=1, eps=_NORM_EPS)
    return x * m


def masked_rescore(
    numerator_queries: torch.Tensor,
    masks: torch.Tensor,
    gallery: torch.Tensor,
    candidates: torch.Tensor,
    *,
    mask_norm: str = "mask_then_normalize",
) -> torch.Tensor:
    """DPM masked cosine of each query with its own candidates.

    ``s_iq = (a_i · ĝ_c) / sqrt(max(m_i² · ĝ_c², eps²))`` for ``c = candidates[i, q]``
    (the denominator is 1 for ``normalize_then_mask``); ``-inf`` where ``candidates`` is -1.

    Args:
        numerator_queries: ``a`` [Q, D] from :func:`masked_numerator_queries`.
        masks: query masks [Q, D].
        gallery: unit-length gallery features [N, D].
        candidates: gallery indices [Q, K].

    Returns: [Q, K] float32.
    """
    qn, kc = candidates.shape
    d = gallery.shape[1]
    out = torch.empty(qn, kc, dtype=torch.float32, device=numerator_queries.device)
    step = max(1, _BLOCK_ELEMENTS // max(1, kc * d))
    renorm = mask_norm == "mask_then_normalize"
    for s in range(0, qn, step):
        cand = candidates[s : s + step]
        valid = cand >= 0
        gc = gallery[cand.clamp_min(0).cpu()].to(out.device).float()  # [b, K, D]
        num = torch.einsum("bd,bkd->bk", numerator_queries[s : s + step], gc)
        if renorm:
            m2 = masks[s : s + step].float().square()
            den = torch.einsum("bd,bkd->bk", m2, gc.square()).clamp_min(_NORM_EPS * _NORM_EPS).sqrt()
            num = num / den
        out[s : s + step] = num.masked_fill(~valid.to(out.device), float("-inf"))
    return out


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """Top-k gallery items per query, best first.

    Attributes:
        indices: gallery rows [Q, k] (int64; -1 where an approximate index found fewer).
        scores: similarities [Q, k] (cosine, or DPM's masked cosine; higher = closer).
        certified: [Q] bool for DPM searched through faiss: True where the result is proven
            exact (see the module docstring); None otherwise.
        backend: ``"exact"`` or ``"faiss:<kind>"``.
        paths: gallery paths per query (filled by :meth:`GalleryIndex.search`).
        pids: gallery person ids [Q, k] when the index knows them.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    certified: Optional[torch.Tensor] = None
    backend: str = "exact"
    paths: List[List[str]] = field(default_factory=list)
    pids: Optional[torch.Tensor] = None

    def to_dicts(self) -> List[List[Dict[str, Any]]]:
        """``[[{"rank", "index", "score", "path", "pid"}, ...] per query]`` (JSON-friendly)."""
        out = []
        for i in range(self.indices.shape[0]):
            row = []
            for j in range(self.indices.shape[1]):
                idx = int(self.indices[i, j])
                if idx < 0:
                    continue
                item = {"rank": j + 1, "index": idx, "score": float(self.scores[i, j])}
                if self.paths:
                    item["path"] = self.paths[i][j]
                if self.pids is not None:
                    item["pid"] = int(self.pids[i, j])
                row.append(item)
            out.append(row)
        return out


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------


def list_gallery_images(folder: Union[str, os.PathLike]) -> List[str]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise OccReIDError(f"gallery folder not found: {root} (expected a folder of images)")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    if not out:
        raise OccReIDError(
            f"no images found under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
        )
    return sorted(out)


def _market_ids(paths: Sequence[str]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """pids and 0-based camids when every file name is Market-style (``0002_c1s1_...``)."""
    pids, cams = [], []
    for p in paths:
        m = MARKET_NAME_RE.search(os.path.basename(p))
        if m is None:
            return None, None
        try:
            pids.append(int(m.group(1)))
            cams.append(int(m.group(2)) - 1)
        except ValueError:
            return None, None
    return torch.tensor(pids, dtype=torch.long), torch.tensor(cams, dtype=torch.long)


class GalleryIndex:
    """Features, paths and (optionally) person/camera ids of a gallery, with search.

    Args:
        features: [N, D] gallery features (stored L2-normalised, float32).
        paths: N image paths (or any labels).
        pids, camids: [N] ints, when known.
        extras: other per-image outputs to keep (DPM ``"mask"``, FED ``"part_scores"``), stored
            as float16.
        model: the model description (``fingerprint``, ``method``, ``backbone``, ``feature_dim``,
            ``img_size``, ``weights``); checked by :meth:`check_model`.
        retrieval: ``{"distance": "cosine"}`` or ``{"distance": "dpm_masked_cosine",
            "mask_norm": ..., "mask_query": ...}`` (:attr:`occreid.FeatureExtractor.retrieval`).
        normalized: the rows already have unit length (kept as they are, no copy).

    Build one from a trained model with :meth:`build` / :meth:`from_folder`, or the command
    ``occreid index``. :meth:`add_faiss` attaches a faiss index (saved with the gallery).
    """

    def __init__(
        self,
        features: ArrayLike,
        paths: Optional[Sequence[str]] = None,
        *,
        pids: Optional[ArrayLike] = None,
        camids: Optional[ArrayLike] = None,
        extras: Optional[Mapping[str, ArrayLike]] = None,
        model: Optional[Mapping[str, Any]] = None,
        retrieval: Optional[Mapping[str, Any]] = None,
        normalized: bool = False,
    ) -> None:
        feats = torch.as_tensor(features)
        if feats.dim() != 2 or not feats.is_floating_point():
            raise OccReIDError(f"gallery features must be a float array [N, D], got {tuple(feats.shape)} {feats.dtype}")
        n = int(feats.shape[0])
        feats = feats.detach().cpu().float()
        self.features = feats if normalized else F.normalize(feats, dim=1)
        self.paths = [str(p) for p in paths] if paths is not None else [str(i) for i in range(n)]
        if len(self.paths) != n:
            raise OccReIDError(f"got {n} features but {len(self.paths)} paths")
        self.pids = self._ids(pids, "pids", n)
        self.camids = self._ids(camids, "camids", n)
        self.extras = {k: torch.as_tensor(v).detach().cpu().half() for k, v in (extras or {}).items()}
        for k, v in self.extras.items():
            if v.shape[0] != n:
                raise OccReIDError(f"extra {k!r} has {v.shape[0]} rows for {n} gallery items")
        self.model: Dict[str, Any] = dict(model or {})
        self.retrieval: Dict[str, Any] = dict(retrieval or {"distance": "cosine"})
        if self.retrieval.get("distance") not in DISTANCES:
            raise OccReIDError(f"unknown retrieval distance {self.retrieval.get('distance')!r}; expected {DISTANCES}")
        self.faiss = None  # Optional[FaissSearcher]
        self.skipped: List[str] = []  # image paths left out by build(skip_unreadable=True)

    @staticmethod
    def _ids(x, name: str, n: int) -> Optional[torch.Tensor]:
        if x is None:
            return None
        t = torch.as_tensor(x).long().reshape(-1)
        if t.shape[0] != n:
            raise OccReIDError(f"{name} has {t.shape[0]} entries for {n} gallery items")
        return t

    # ------------------------------------------------------------------------------ info
    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def is_masked(self) -> bool:
        """True for DPM indexes (query-conditioned masked cosine)."""
        return self.retrieval.get("distance") == "dpm_masked_cosine"

    def __repr__(self) -> str:
        return (
            f"GalleryIndex(size={len(self)}, dim={self.dim}, distance={self.retrieval.get('distance')!r}, "
            f"model={self.model.get('method')}/{self.model.get('backbone')} {self.model.get('fingerprint')}, "
            f"faiss={None if self.faiss is None else self.faiss.kind!r})"
        )

    # ----------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        extractor: Any,
        images: Sequence[Any],
        *,
        paths: Optional[Sequence[str]] = None,
        pids: Optional[ArrayLike] = None,
        camids: Optional[ArrayLike] = None,
        color: str = "RGB",
        keep_extras: bool = True,
        skip_unreadable: bool = False,
    ) -> "GalleryIndex":
        """Extract features of ``images`` with a :class:`occreid.FeatureExtractor` and index them.

        ``paths`` defaults to ``images`` when those are paths. ``camids`` are also passed to SIE
        models. With ``skip_unreadable``, image files that cannot be read (missing, not an image,
        truncated) are left out with a warning each; their paths are in :attr:`skipped`.
        Otherwise the first such file raises :class:`OccReIDError`.
        """
        images = list(images)
        if paths is None:
            paths = [str(p) if isinstance(p, (str, os.PathLike)) else f"image{i}" for i, p in enumerate(images)]
        paths = [str(p) for p in paths]
        if len(paths) != len(images):
            raise OccReIDError(f"got {len(images)} images but {len(paths)} paths")
        cams = None if camids is None else torch.as_tensor(camids).long().reshape(-1)
        pid_t = None if pids is None else torch.as_tensor(pids).long().reshape(-1)
        t0 = time.perf_counter()
        if skip_unreadable:
            out, keep = _extract_skipping(extractor, images, color, cams if extractor.uses_cameras else None)
        else:
            out = extractor.extract(images, color=color, camids=cams if extractor.uses_cameras else None)
            keep = list(range(len(images)))
        skipped = [paths[i] for i in sorted(set(range(len(images))) - set(keep))]
        if skipped and not keep:
            raise OccReIDError(f"none of the {len(images)} images could be read (first: {skipped[0]})")
        if skipped:
            sel = torch.tensor(keep, dtype=torch.long)
            paths = [paths[i] for i in keep]
            pid_t = None if pid_t is None else pid_t[sel]
            cams = None if cams is None else cams[sel]
        logger.info("indexed %d images in %.1f s", len(keep), time.perf_counter() - t0)
        extras = {k: v for k, v in out.items() if k != "feat"} if keep_extras else {}
        index = cls(
            out["feat"],
            paths,
            pids=pid_t,
            camids=cams,
            extras=extras,
            model={
                "fingerprint": extractor.fingerprint,
                "method": extractor.method,
                "backbone": extractor.backbone,
                "feature_dim": extractor.feature_dim,
                "img_size": list(extractor.img_size),
                "weights": extractor.source,
            },
            retrieval=extractor.retrieval,
        )
        index.skipped = skipped
        return index

    @classmethod
    def from_folder(cls, extractor: Any, folder: Union[str, os.PathLike], **kwargs: Any) -> "GalleryIndex":
        """Index every image under ``folder``; Market-style names (``0002_c1s1_...``) give
        pids and camids. ``kwargs`` go to :meth:`build` (e.g. ``skip_unreadable=True``)."""
        paths = list_gallery_images(folder)
        pids, camids = _market_ids(paths)
        return cls.build(extractor, paths, pids=pids, camids=camids, **kwargs)

    def add_faiss(self, kind: str = "flat", **kwargs: Any) -> "GalleryIndex":
        """Build a faiss index (:class:`~occreid.retrieval.faiss_backend.FaissSearcher`
        arguments) over the gallery features; used by ``search(backend="auto"|"faiss")``."""
        t0 = time.perf_counter()
        self.faiss = FaissSearcher(kind, **kwargs).build(self.features)
        logger.info("faiss %s index over %d vectors built in %.1f s", kind, len(self), time.perf_counter() - t0)
        return self

    # ---------------------------------------------------------------------------- checks
    def check_model(self, extractor: Any) -> None:
        """Raise :class:`OccReIDError` unless ``extractor`` is the model this index was built with."""
        want = self.model.get("fingerprint")
        got = getattr(extractor, "fingerprint", None)
        if want is not None and got != want:
            raise OccReIDError(
                f"this gallery index was built with another model: index model "
                f"{self.model.get('method')}/{self.model.get('backbone')} fingerprint {want} "
                f"(weights {self.model.get('weights')}), but the query model is "
                f"{getattr(extractor, 'method', '?')}/{getattr(extractor, 'backbone', '?')} fingerprint {got} "
                f"(weights {getattr(extractor, 'source', None)}). Features of different models are not "
                "comparable: search with the weights the index was built with, or rebuild the index "
                "with `occreid index --weights <these weights> ...`"
            )

    # ---------------------------------------------------------------------------- search
    def search(
        self,
        queries: Union[ArrayLike, Mapping[str, ArrayLike]],
        k: int = 10,
        *,
        query_masks: Optional[ArrayLike] = None,
        backend: str = "auto",
        rescore: int = 10,
        exact_fallback: bool = True,
    ) -> SearchResult:
        """Top-``k`` gallery items for each query.

        Args:
            queries: query features [Q, D], or the dict returned by
                :meth:`occreid.FeatureExtractor.extract` (its ``"mask"`` is used for DPM).
            k: results per query (at most the gallery size).
            query_masks: DPM query masks [Q, D] (required for a DPM index unless in ``queries``).
            backend: ``"exact"``, ``"faiss"`` (needs :meth:`add_faiss`) or ``"auto"`` (faiss when
                attached, else exact).
            rescore: DPM through faiss: candidates per result (``K' = rescore · k``).
            exact_fallback: DPM through an exact faiss index: re-search uncertified queries by
                brute force, so the result is exact.
        """
        if backend not in BACKENDS:
            raise OccReIDError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(queries, Mapping):
            if query_masks is None:
                query_masks = queries.get("mask")
            queries = queries["feat"]
        q = torch.as_tensor(queries).detach().float().cpu()
        if q.dim() == 1:
            q = q.unsqueeze(0)
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise OccReIDError(
                f"query features must be [Q, {self.dim}] (the width of this index's model "
                f"{self.model.get('method')}/{self.model.get('backbone')}), got shape {tuple(q.shape)}; "
                "the query model differs from the one the index was built with"
            )
        if k < 1:
            raise OccReIDError(f"k must be >= 1, got {k}")
        masks = None
        if self.is_masked:
            if query_masks is None:
                raise OccReIDError(
                    "this index uses DPM's query-mask distance: pass the query masks (the 'mask' of "
                    "FeatureExtractor.extract) as query_masks, or pass the whole extract() dict"
                )
            masks = torch.as_tensor(query_masks).detach().float().cpu()
            if masks.shape != q.shape:
                raise OccReIDError(f"query_masks must have the shape of the queries {tuple(q.shape)}, got {tuple(masks.shape)}")
        use_faiss = backend == "faiss" or (backend == "auto" and self.faiss is not None)
        if use_faiss and self.faiss is None:
            raise OccReIDError("backend='faiss' but this index has no faiss index: call add_faiss(kind) "
                               "or build it with `occreid index --faiss flat|ivf|hnsw`")
        q = F.normalize(q, dim=1)
        k = int(min(k, len(self)))
        certified = None
        if not use_faiss:
            opts = self._mask_opts()
            scores, idx = exact_topk(q, self.features, k, query_masks=masks, gallery_normalized=True, **opts)
            name = "exact"
        elif masks is None:
            scores, idx = self.faiss.search(q, k)
            name = f"faiss:{self.faiss.kind}"
        else:
            scores, idx, certified = self._faiss_masked(q, masks, k, rescore, exact_fallback)
            name = f"faiss:{self.faiss.kind}+rescore"
        res = SearchResult(indices=idx, scores=scores, certified=certified, backend=name)
        res.paths = [[self.paths[j] if j >= 0 else "" for j in row] for row in idx.tolist()]
        if self.pids is not None:
            res.pids = torch.where(idx >= 0, self.pids[idx.clamp_min(0)], torch.full_like(idx, -1))
        return res

    def _mask_opts(self) -> Dict[str, Any]:
        if not self.is_masked:
            return {}
        return {
            "mask_norm": self.retrieval.get("mask_norm", "mask_then_normalize"),
            "mask_query": bool(self.retrieval.get("mask_query", False)),
        }

    def _faiss_masked(self, q, masks, k: int, rescore: int, exact_fallback: bool):
        """DPM through faiss: MIPS candidates by numerator, exact re-scoring, certificate."""
        opts = self._mask_opts()
        n = len(self)
        kc = int(min(n, max(k, rescore * k)))
        a = masked_numerator_queries(q, masks, **opts)  # [Q, D]
        num, cand = self.faiss.search(a, kc)  # numerators a·ĝ, best first
        s = masked_rescore(a, masks, self.features, cand, mask_norm=opts["mask_norm"])  # [Q, K']
        scores, pos = s.topk(k, dim=1)
        idx = cand.gather(1, pos)
        if not self.faiss.exact:
            return scores, idx, None
        if opts["mask_norm"] != "mask_then_normalize" or kc >= n:
            certified = torch.ones(q.shape[0], dtype=torch.bool)  # re-scored = numerator / all items seen
        else:
            # any non-candidate j: s_ij <= max(a_i·ĝ_j, 0) / min_c m_ic <= max(t_i, 0) / min_c m_ic
            t = num[:, -1].clamp_min(0)
            m_min = masks.abs().min(dim=1).values
            bound = torch.where(m_min > _NORM_EPS, t / m_min.clamp_min(_NORM_EPS), torch.full_like(t, float("inf")))
            certified = scores[:, -1] >= bound.clamp_max(1.0)
        if exact_fallback and not bool(certified.all()):
            redo = (~certified).nonzero().flatten()
            logger.debug("DPM faiss search: %d of %d queries not certified, searched exactly", len(redo), q.shape[0])
            s2, i2 = exact_topk(q[redo], self.features, k, query_masks=masks[redo], gallery_normalized=True, **opts)
            scores[redo], idx[redo] = s2, i2
            certified = certified.clone()
            certified[redo] = True
        return scores, idx, certified

    # --------------------------------------------------------------------------- storage
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the index (and its faiss index, if any) to one file, atomically.

        Image paths (and the model weights) are stored absolute and relative to the index
        file's folder; :meth:`load` resolves them against the index file, so the index works
        from any working folder, and keeps working when it is moved together with its images
        (or alone, while the images stay where they were). Entries that are not paths of
        existing files (labels) are stored as they are.
        """
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        paths, rel = _store_paths(self.paths, folder)
        model = dict(self.model)
        if model.get("weights"):
            (model["weights"],), (model["weights_rel"],) = _store_paths([model["weights"]], folder)
        obj = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "occreid_version": __version__,
            "features": self.features,
            "paths": paths,
            "paths_rel": rel,
            "folder": folder,
            "pids": self.pids,
            "camids": self.camids,
            "extras": dict(self.extras),
            "model": model,
            "retrieval": dict(self.retrieval),
            "faiss": None if self.faiss is None else self.faiss.state(),
        }
        return atomic_save(obj, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, faiss_gpu: Union[str, bool] = "auto") -> "GalleryIndex":
        """Read an index written by :meth:`save` / ``occreid index``."""
        p = Path(path)
        if not p.is_file():
            raise OccReIDError(f"gallery index not found: {p} (build one with `occreid index --weights CKPT --images DIR --out {p}`)")
        obj = safe_torch_load(p, "gallery index", "a file written by `occreid index` or GalleryIndex.save")
        if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT:
            hint = ""
            if isinstance(obj, dict) and obj.get("format") == "occreid-checkpoint":
                hint = " It is a model checkpoint: pass it as --weights, and build an index with `occreid index`."
            raise OccReIDError(f"{p} is not an occreid gallery index.{hint}")
        if int(obj.get("version", 0)) > INDEX_VERSION:
            raise OccReIDError(f"{p} was written by a newer occreid (index version {obj['version']}); upgrade occreid")
        paths, weights = _resolve_stored_paths(obj, p)
        model = dict(obj.get("model") or {})
        if weights is not None:
            model["weights"] = weights
        model.pop("weights_rel", None)
        index = cls(
            obj["features"],
            paths,
            pids=obj.get("pids"),
            camids=obj.get("camids"),
            extras=obj.get("extras") or {},
            model=model,
            retrieval=obj.get("retrieval") or {"distance": "cosine"},
            normalized=True,
        )
        if obj.get("faiss") is not None:
            if faiss_available():
                index.faiss = FaissSearcher.from_state(obj["faiss"], gpu=faiss_gpu)
            else:
                logger.warning("%s holds a faiss index but faiss is not installed; searching exactly", p)
        return index


# --------------------------------------------------------------------------------------------
# Extraction that skips unreadable files
# --------------------------------------------------------------------------------------------

_CHUNK_BATCHES = 16  # images are extracted in chunks of this many batches; a chunk that fails is probed


def _readable(item: Any) -> Optional[str]:
    """None when ``item`` (a path) decodes, else the reason; non-path items count as readable."""
    if not isinstance(item, (str, os.PathLike)):
        return None
    try:
        read_image(item)
    except OccReIDError as exc:
        return str(exc)
    return None


def _extract_skipping(extractor: Any, images: List[Any], color: str, cams: Optional[torch.Tensor]):
    """``extractor.extract`` in chunks; in a chunk that raises :class:`OccReIDError` every file
    is tried alone and the unreadable ones are left out (a warning each). Returns ``(outputs,
    kept indices)``."""
    chunk = max(1, int(getattr(extractor, "batch_size", 64)) * _CHUNK_BATCHES)
    keep: List[int] = []
    parts: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, len(images), chunk):
        ids = list(range(start, min(len(images), start + chunk)))
        for attempt in range(2):
            try:
                out = extractor.extract([images[i] for i in ids], color=color,
                                        camids=None if cams is None else cams[ids])
                break
            except OccReIDError:
                if attempt:
                    raise
                bad = {i: why for i in ids if (why := _readable(images[i])) is not None}
                if not bad:
                    raise
                for why in bad.values():
                    logger.warning("skipping an unreadable image: %s", why)
                ids = [i for i in ids if i not in bad]
                if not ids:
                    out = None
                    break
        if out is None:
            continue
        keep.extend(ids)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        return extractor.extract([], color=color), keep
    return {k: torch.cat(v, 0) for k, v in parts.items()}, keep


# --------------------------------------------------------------------------------------------
# Stored paths
# --------------------------------------------------------------------------------------------


def _store_paths(paths: Sequence[str], folder: str) -> Tuple[List[str], List[Optional[str]]]:
    """``(absolute, relative to folder)`` for the entries that name existing files; labels
    (entries that are not existing files) are kept as they are, with ``None`` as relative path."""
    absolute: List[str] = []
    rel: List[Optional[str]] = []
    for p in paths:
        p = str(p)
        if os.path.isabs(p) or os.path.exists(p):
            a = os.path.abspath(p)
            absolute.append(a)
            try:
                rel.append(Path(os.path.relpath(a, folder)).as_posix())
            except ValueError:  # another drive (Windows)
                rel.append(None)
        else:
            absolute.append(p)
            rel.append(None)
    return absolute, rel


def _resolve_stored_paths(obj: Mapping[str, Any], index_file: Path) -> Tuple[List[str], Optional[str]]:
    """Gallery paths and weights of a loaded index, resolved against the index file's folder.

    Relative paths are used when the index moved together with its files, the stored absolute
    ones when only the index moved. An index without relative paths (written before they were
    stored) keeps its paths, made absolute against the index folder when they do not exist
    from the working folder.
    """
    here = os.path.dirname(os.path.abspath(index_file))
    paths = [str(p) for p in obj["paths"]]
    rel = obj.get("paths_rel")
    model = obj.get("model") or {}
    weights = model.get("weights")

    def choose(absolute: Optional[str], relative: Optional[str]) -> Optional[str]:
        if absolute is None:
            return None
        if relative is None:
            if not os.path.isabs(absolute) and not os.path.exists(absolute):
                joined = os.path.normpath(os.path.join(here, absolute))
                return joined if os.path.exists(joined) else absolute
            return absolute
        moved = os.path.normpath(os.path.join(here, relative))
        return moved if os.path.exists(moved) or not os.path.exists(absolute) else absolute

    if rel is not None and len(rel) == len(paths):
        # decide once, on the first path that is a file path, whether the files moved with the index
        first = next((i for i, r in enumerate(rel) if r is not None), None)
        use_rel = True
        if first is not None:
            moved = os.path.normpath(os.path.join(here, rel[first]))
            use_rel = os.path.exists(moved) or not os.path.exists(paths[first])
        if use_rel:
            paths = [os.path.normpath(os.path.join(here, r)) if r is not None else a for a, r in zip(paths, rel)]
    elif paths and not os.path.isabs(paths[0]) and not os.path.exists(paths[0]) and \
            os.path.exists(os.path.join(here, paths[0])):  # an older index, used from another folder
        paths = [a if os.path.isabs(a) else os.path.normpath(os.path.join(here, a)) for a in paths]
    if weights is not None:
        weights = choose(str(weights), model.get("weights_rel"))
    return paths, weights
