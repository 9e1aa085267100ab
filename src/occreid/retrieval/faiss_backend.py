"""faiss inner-product indexes over L2-normalised gallery features (optional dependency).

Install with ``pip install occreid[faiss]`` (``faiss-cpu``; install ``faiss-gpu`` instead to
search on a GPU: the index is then moved to GPU 0 when one is visible, ``gpu="auto"``).

Kinds (all with ``METRIC_INNER_PRODUCT``, i.e. cosine on unit-length features):

===========  =========================================================  =====================
kind         faiss index                                                result
===========  =========================================================  =====================
``flat``     ``IndexFlatIP``: brute force                               exact
``ivf``      ``IndexIVFFlat``: ``nlist`` k-means cells, ``nprobe``      approximate
             visited per query (defaults: nlist ≈ 4·√N, nprobe 32)
``ivfpq``    ``IndexIVFPQ``: IVF + product quantisation (``pq_m``       approximate, compact
             bytes per vector), for galleries that do not fit in RAM
``hnsw``     ``IndexHNSWFlat`` (M = ``hnsw_m``, efSearch ``ef_search``)  approximate, CPU only
===========  =========================================================  =====================

A faiss factory string (``"IVF4096,PQ64"``, ``"OPQ64,IVF4096,PQ64"``) is accepted as ``kind``
for anything else. :meth:`FaissSearcher.to_bytes` / :meth:`FaissSearcher.from_bytes`
serialise the trained index into the gallery index file.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..utils.io import OccReIDError

logger = logging.getLogger(__name__)

__all__ = ["FAISS_KINDS", "FaissSearcher", "faiss_available", "require_faiss"]

FAISS_KINDS = ("flat", "ivf", "ivfpq", "hnsw")

ArrayLike = Union[np.ndarray, torch.Tensor]


def faiss_available() -> bool:
    """True when the ``faiss`` module can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def require_faiss():
    """Import faiss, or raise :class:`OccReIDError` saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise OccReIDError(
            "the faiss backend needs the faiss package: pip install 'occreid[faiss]' (faiss-cpu) "
            "or faiss-gpu; exact search (backend='exact') needs nothing extra"
        ) from None
    return faiss


def _f32(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _gpu_count(faiss) -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None and hasattr(faiss, "StandardGpuResources") else 0


class FaissSearcher:
    """A faiss inner-product index with occreid's defaults.

    Args:
        kind: ``"flat"``, ``"ivf"``, ``"ivfpq"``, ``"hnsw"`` or a faiss factory string.
        nlist: IVF cells (default ``4·√N`` clipped to [1, N/39], so each cell has training points).
        nprobe: IVF cells visited per query (default 32).
        pq_m: PQ sub-quantisers for ``ivfpq`` (default: the largest divisor of D that is <= D/8).
        hnsw_m, ef_construction, ef_search: HNSW parameters (32, 80, 128).
        train_size: at most this many gallery vectors train the quantiser (default 64·nlist).
        gpu: ``"auto"`` (GPU 0 when faiss has GPU support and sees a GPU), ``True`` or ``False``.
        seed: k-means / sampling seed.
    """

    def __init__(
        self,
        kind: str = "flat",
        *,
        nlist: Optional[int] = None,
        nprobe: int = 32,
        pq_m: Optional[int] = None,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        train_size: Optional[int] = None,
        gpu: Union[str, bool] = "auto",
        seed: int = 0,
    ) -> None:
        if kind not in FAISS_KINDS and "," not in kind and not kind.startswith(("IVF", "HNSW", "Flat", "PQ", "OPQ")):
            raise OccReIDError(
                f"unknown faiss index kind {kind!r}; use one of {', '.join(FAISS_KINDS)} or a faiss "
                "factory string such as 'IVF4096,PQ64'"
            )
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.kind = kind
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.pq_m = pq_m
        self.hnsw_m = int(hnsw_m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self.train_size = train_size
        self.gpu = gpu
        self.seed = int(seed)
        self.index: Any = None  # the CPU index (what is serialised)
        self._search_index: Any = None  # the same index on the GPU, when used
        self.dim: Optional[int] = None

    # ------------------------------------------------------------------------ properties
    @property
    def exact(self) -> bool:
        """True for brute-force (``flat``) search: results equal exact search."""
        return self.kind == "flat" or self.kind == "Flat"

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def describe(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"kind": self.kind, "ntotal": self.ntotal, "exact": self.exact}
        if self.kind in ("ivf", "ivfpq") or self.kind.startswith(("IVF", "OPQ")):
            d.update(nlist=self.nlist, nprobe=self.nprobe)
        if self.kind == "ivfpq":
            d["pq_m"] = self.pq_m
        if self.kind == "hnsw":
            d.update(hnsw_m=self.hnsw_m, ef_search=self.ef_search)
        d["on_gpu"] = self._search_index is not None and self._search_index is not self.index
        return d

    def __repr__(self) -> str:
        return f"FaissSearcher({', '.join(f'{k}={v!r}' for k, v in self.describe().items())})"

    # ----------------------------------------------------------------------------- build
    def _factory(self, n: int, d: int) -> str:
        if self.kind == "flat":
            return "Flat"
        if self.kind in ("ivf", "ivfpq"):
            if self.nlist is None:
                self.nlist = int(max(1, min(4 * math.sqrt(n), n // 39 if n >= 39 else 1)))
            if self.kind == "ivf":
                return f"IVF{self.nlist},Flat"
            if self.pq_m is None:
                self.pq_m = max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)
            return f"IVF{self.nlist},PQ{self.pq_m}"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        return self.kind

    def build(self, features: ArrayLike, chunk_size: int = 131072) -> "FaissSearcher":
        """Train (when the index needs it) and add ``features`` [N, D] (rows L2-normalised)."""
        faiss = require_faiss()
        x = features
        n, d = int(x.shape[0]), int(x.shape[1])
        if n == 0:
            raise OccReIDError("cannot build a faiss index over an empty gallery")
        self.dim = d
        factory = self._factory(n, d)
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if self.kind == "hnsw":
            index.hnsw.efConstruction = self.ef_construction
        if not index.is_trained:
            nlist = self.nlist or 1
            limit = int(self.train_size or max(64 * nlist, 10000))
            rng = np.random.default_rng(self.seed)
            sel = np.sort(rng.choice(n, size=min(n, limit), replace=False))
            train = _f32(x[torch.as_tensor(sel)] if isinstance(x, torch.Tensor) else x[sel])
            logger.info("faiss: training %s on %d of %d vectors", factory, len(sel), n)
            cp = getattr(index, "cp", None)
            if cp is not None:
                cp.seed = self.seed
            index.train(train)
        for start in range(0, n, chunk_size):
            index.add(_f32(x[start : start + chunk_size]))
        self.index = index
        self._prepare_search()
        return self

    def _prepare_search(self) -> None:
        faiss = require_faiss()
        index = self.index
        self.dim = int(index.d)
        ivf = None
        try:
            ivf = faiss.extract_index_ivf(index)
        except Exception:  # not an IVF index
            ivf = None
        if ivf is not None:
            ivf.nprobe = self.nprobe
            self.nlist = int(ivf.nlist)
        if self.kind == "hnsw":
            index.hnsw.efSearch = self.ef_search
        use_gpu = self.gpu is True or (self.gpu == "auto" and _gpu_count(faiss) > 0)
        if use_gpu and self.kind != "hnsw":
            if _gpu_count(faiss) == 0:
                raise OccReIDError("gpu=True but faiss has no GPU support or sees no GPU; install faiss-gpu")
            self._res = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._res, 0, index)
            if ivf is not None:
                faiss.GpuParameterSpace().set_index_parameter(self._search_index, "nprobe", self.nprobe)
        else:
            self._search_index = index

    def set_nprobe(self, nprobe: int) -> None:
        """Cells visited per query (IVF kinds)."""
        self.nprobe = int(nprobe)
        if self.index is not None:
            self._prepare_search()

    # ---------------------------------------------------------------------------- search
    def search(self, queries: ArrayLike, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scores [Q, k] float32, indices [Q, k] int64)``, best first; index -1 (score -inf)
        where an approximate index found fewer than ``k`` vectors."""
        if self.index is None:
            raise OccReIDError("the faiss index has not been built; call build(features) first")
        q = _f32(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise OccReIDError(f"queries must be [Q, {self.dim}], got shape {tuple(q.shape)}")
        k = int(min(k, self.ntotal))
        scores, idx = self._search_index.search(q, k)
        scores = torch.from_numpy(scores)
        idx = torch.from_numpy(idx).long()
        scores[idx < 0] = float("-inf")
        return scores, idx

    # --------------------------------------------------------------------------- storage
    def state(self) -> Dict[str, Any]:
        """Parameters + the serialised CPU index (a uint8 tensor), for the gallery index file."""
        faiss = require_faiss()
        data = faiss.serialize_index(self.index)
        return {
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "pq_m": self.pq_m,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "seed": self.seed,
            "data": torch.from_numpy(np.asarray(data, dtype=np.uint8).copy()),
        }

    @classmethod
    def from_state(cls, state: Dict[str, Any], gpu: Union[str, bool] = "auto") -> "FaissSearcher":
        faiss = require_faiss()
        params = {k: state[k] for k in ("nlist", "nprobe", "pq_m", "hnsw_m", "ef_construction", "ef_search", "seed")}
        s = cls(state["kind"], gpu=gpu, **params)
        s.index = faiss.deserialize_index(state["data"].numpy())
        s._prepare_search()
        return s
