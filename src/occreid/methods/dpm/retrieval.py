"""DPM's query-mask retrieval distance (dpm-official.md §7), batched.

The official test code (``utils/metrics.py::cosine_single``) loops over queries. For query i it
multiplies **every gallery feature** by that query's mask, re-normalises, and takes the cosine
with the (unmasked) query; gallery masks are computed but ignored. The gallery plays the role
the prototypes W play in training::

    s_ij = q̂_i · normalize(m_i ⊙ ĝ_j)
    dist_ij = arccos(clip(s_ij, −1 + 1e-5, 1 − 1e-5))

Here the same numbers come from two matrix products, S = ((Q̂ ⊙ M) Ĝᵀ) ⊘ sqrt(M² (Ĝ²)ᵀ).

**One formula.** The function is the masked cosine of training,
:func:`occreid.losses.arcface.masked_cosine`, with the gallery in the prototypes' place
(``masked_cosine(qf, q_mask, gf)``), including its options (``mask_norm``, ``mask_query`` =
its ``mask_feature``), its eps (F.normalize's max(‖v‖, eps), and max(‖m ⊙ ĝ‖², eps²) under
the square root) and its dtypes (float64 if an input is float64, else float32). Two backends
compute it:

- ``"torch"`` (any device, the default off the CPU): calls ``masked_cosine`` itself, on
  pieces of the gallery;
- ``"numpy"`` (the default on the CPU): the same steps in the same order with numpy arrays,
  with the gallery-side work (ĝ and ĝ²) done once per instance instead of once per block of
  queries, results written in place into the output and one reused buffer (no temporary is
  page-faulted afresh per block, which on the development VMs costs as much as the
  arithmetic), and numpy's BLAS for the two products (OpenBLAS in the numpy wheels: 1.4–1.5×
  the throughput of torch's MKL sgemm on the AMD development CPUs, docs/benchmarks.md).

``tests/test_dpm_retrieval.py`` checks both against ``masked_cosine`` for every option and
dtype, including zero masks and zero features (equal to float rounding of the matrix
products: 1e-14 in float64; the torch backend is bit-identical on one piece).

:class:`MaskedCosineDistance` is the block callable that
:func:`occreid.evaluation.evaluate_rank` accepts as ``distmat`` (``num_queries`` and
``__call__(start, stop) -> [stop - start, G]``), so the full Nq × G matrix never has to exist;
:func:`masked_distance_matrix` computes the whole matrix.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ...losses.arcface import MASK_NORMS, masked_cosine

__all__ = ["BACKENDS", "CHUNK_ELEMENTS", "DEN_PIECE_ELEMENTS", "MASKED_DISTANCES", "MaskedCosineDistance", "masked_distance_matrix"]

#: ``"arccos"`` (official): arccos of the clipped cosine; ``"cosine"``: 1 − cosine. Both rank
#: identically (up to ties created by the clip).
MASKED_DISTANCES = ("arccos", "cosine")

#: ``"auto"``: numpy on the CPU, torch elsewhere; see the module docstring.
BACKENDS = ("auto", "numpy", "torch")

_ARCCOS_CLIP = 1e-5  # official clip of the cosine before arccos
_NORM_EPS = 1e-12  # F.normalize's eps, as in masked_cosine

#: torch backend: entries of one piece (each temporary of masked_cosine): 2**21 float32 = 8 MiB
CHUNK_ELEMENTS = 1 << 21
#: numpy backend: entries of the reused denominator buffer (2**23 float32 = 32 MiB, at least
#: 256 query rows): large enough for the matrix products to run at full speed
DEN_PIECE_ELEMENTS = 1 << 23
_DEN_MIN_ROWS = 256

ArrayLike = Union[Tensor, np.ndarray]


def _as_tensor(x: ArrayLike, name: str, device: Optional[torch.device]) -> Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point array, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return t


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """F.normalize(x, dim=1): x / max(‖x‖, eps), in x's dtype."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.maximum(norm, x.dtype.type(_NORM_EPS))


class MaskedCosineDistance:
    """Query-conditioned DPM distance, computed block by block of queries.

    Args:
        qf: query features [Nq, D] (pre-BNNeck cls tokens in the official recipe).
        q_mask: query masks [Nq, D] from the HMG, values in [0, 1].
        gf: gallery features [G, D].
        distance: ``"arccos"`` (official) or ``"cosine"`` (1 − s); see :data:`MASKED_DISTANCES`.
        mask_norm: how the mask meets the L2 norm, as in training (:data:`MASK_NORMS`;
            official ``"mask_then_normalize"``).
        mask_query: also mask the query feature with its own mask (the retrieval counterpart of
            Table 5's feature-masking rows; official False).
        device: where to compute (default: the features' device).
        gallery_chunk: torch backend: gallery items per piece (default: :data:`CHUNK_ELEMENTS`
            // queries in the block, at least 256).
        backend: :data:`BACKENDS`; the values agree to float rounding of the products.

    ``dist(start, stop)`` returns float32 (float64 for float64 inputs) distances
    [stop − start, G] as a torch tensor; smaller is more similar. ``num_queries`` is Nq. The
    numpy backend keeps normalised copies of the gallery (2 × G × D values).
    """

    def __init__(
        self,
        qf: ArrayLike,
        q_mask: ArrayLike,
        gf: ArrayLike,
        *,
        distance: str = "arccos",
        mask_norm: str = "mask_then_normalize",
        mask_query: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        gallery_chunk: Optional[int] = None,
        backend: str = "auto",
    ) -> None:
        if distance not in MASKED_DISTANCES:
            raise ValueError(f"distance must be one of {MASKED_DISTANCES}, got {distance!r}")
        if mask_norm not in MASK_NORMS:
            raise ValueError(f"mask_norm must be one of {MASK_NORMS}, got {mask_norm!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dev = torch.device(device) if device is not None else None
        self.qf = _as_tensor(qf, "qf", dev)
        self.q_mask = _as_tensor(q_mask, "q_mask", dev).to(self.qf.device)
        self.gf = _as_tensor(gf, "gf", dev).to(self.qf.device)
        if self.q_mask.shape != self.qf.shape:
            raise ValueError(
                f"q_mask must have the shape of qf {tuple(self.qf.shape)}, got {tuple(self.q_mask.shape)}"
            )
        if self.gf.shape[1] != self.qf.shape[1]:
            raise ValueError(
                f"query and gallery feature widths differ: {self.qf.shape[1]} vs {self.gf.shape[1]}"
            )
        if gallery_chunk is not None and gallery_chunk < 1:
            raise ValueError(f"gallery_chunk must be >= 1, got {gallery_chunk}")
        if backend == "numpy" and self.qf.device.type != "cpu":
            raise ValueError(f"backend='numpy' needs CPU tensors, got device {self.qf.device}")
        self.distance = distance
        self.mask_norm = mask_norm
        self.mask_query = bool(mask_query)
        self.gallery_chunk = gallery_chunk
        self.backend = backend if backend != "auto" else ("numpy" if self.qf.device.type == "cpu" else "torch")
        self.dtype = (
            torch.float64 if torch.float64 in (self.qf.dtype, self.q_mask.dtype, self.gf.dtype) else torch.float32
        )
        self._gallery: Optional[Tuple[np.ndarray, Optional[np.ndarray]]] = None  # numpy: ĝ, ĝ²
        self._buf: Optional[np.ndarray] = None  # numpy: the denominator piece, reused

    @property
    def num_queries(self) -> int:
        return int(self.qf.shape[0])

    @property
    def num_gallery(self) -> int:
        return int(self.gf.shape[0])

    def __len__(self) -> int:
        return self.num_queries

    # -- public interface -----------------------------------------------------------------

    def similarity(self, start: int, stop: int) -> Tensor:
        """Masked cosines s_ij for queries ``start:stop``, [stop − start, G]: the values of
        ``masked_cosine(qf[start:stop], q_mask[start:stop], gf)``."""
        return self._block(start, stop, to_distance=False)

    def __call__(self, start: int, stop: int) -> Tensor:
        return self._block(start, stop, to_distance=True)

    def __repr__(self) -> str:
        return (
            f"MaskedCosineDistance(num_queries={self.num_queries}, num_gallery={self.num_gallery}, "
            f"distance={self.distance!r}, mask_norm={self.mask_norm!r}, mask_query={self.mask_query}, "
            f"backend={self.backend!r})"
        )

    # -- computation ----------------------------------------------------------------------

    def _block(self, start: int, stop: int, to_distance: bool, out: Optional[Tensor] = None) -> Tensor:
        if not 0 <= start <= stop <= self.num_queries:
            raise IndexError(f"query block [{start}, {stop}) out of range for {self.num_queries} queries")
        if self.backend == "torch":
            s = self._torch_block(start, stop, to_distance)
            if out is None:
                return s
            out.copy_(s)
            return out
        if out is None:
            out = torch.empty(stop - start, self.num_gallery, dtype=self.dtype)
        self._numpy_fill(start, stop, out.numpy(), to_distance)
        return out

    def _torch_block(self, start: int, stop: int, to_distance: bool) -> Tensor:
        """``masked_cosine`` itself, on pieces of the gallery (bounded temporaries)."""
        q, m = self.qf[start:stop], self.q_mask[start:stop]
        n_g = self.num_gallery
        chunk = self.gallery_chunk or max(256, CHUNK_ELEMENTS // max(stop - start, 1))
        out: Optional[Tensor] = None
        for g0 in range(0, max(n_g, 1), chunk):  # loop over gallery pieces only
            s = masked_cosine(q, m, self.gf[g0:g0 + chunk], mask_feature=self.mask_query, mask_norm=self.mask_norm)
            if to_distance:
                s = self._to_distance_(s)
            if chunk >= n_g:
                return s
            if out is None:
                out = torch.empty(stop - start, n_g, dtype=s.dtype, device=s.device)
            out[:, g0:g0 + chunk] = s
        assert out is not None
        return out

    def _to_distance_(self, s: Tensor) -> Tensor:
        """Cosines -> distances, in place (the same values as the out-of-place formula)."""
        if self.distance == "arccos":
            return s.clamp_(-1.0 + _ARCCOS_CLIP, 1.0 - _ARCCOS_CLIP).arccos_()
        return s.neg_().add_(1.0)  # 1 − s, rounded once

    def _numpy_gallery(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """ĝ = normalize(gf) and, with re-normalisation, ĝ², once per instance."""
        if self._gallery is None:
            g_hat = _normalize_rows(self.gf.detach().to(self.dtype).numpy())
            g_sq = g_hat * g_hat if self.mask_norm == "mask_then_normalize" else None
            self._gallery = (g_hat, g_sq)
        return self._gallery

    def _numpy_fill(self, start: int, stop: int, out: np.ndarray, to_distance: bool) -> None:
        """masked_cosine's steps for queries ``start:stop``, written into ``out`` [b, G]."""
        g_hat, g_sq = self._numpy_gallery()
        renorm = self.mask_norm == "mask_then_normalize"
        x = _normalize_rows(self.qf[start:stop].detach().to(self.dtype).numpy())  # x̂
        m = self.q_mask[start:stop].detach().to(self.dtype).numpy()
        if self.mask_query:
            x = x * m
            if renorm:
                x = _normalize_rows(x)
        a = x * m  # Σ_c f_ic m_ic ĝ_jc is a @ ĝᵀ
        b_sq = m * m if renorm else None  # ‖m_i ⊙ ĝ_j‖² = (m²) @ (ĝ²)ᵀ
        n_g, n_q = self.num_gallery, stop - start
        if n_g == 0 or n_q == 0:
            return
        np.matmul(a, g_hat.T, out=out)  # one product for the block: small pieces run slower
        if renorm:
            rows = max(_DEN_MIN_ROWS, DEN_PIECE_ELEMENTS // n_g)  # query rows per denominator piece
            rows = min(rows, n_q)
            if self._buf is None or self._buf.shape[0] < rows or self._buf.dtype != out.dtype:
                self._buf = np.empty((rows, n_g), dtype=out.dtype)  # reused by later blocks
            eps_sq = out.dtype.type(_NORM_EPS * _NORM_EPS)
            for r0 in range(0, n_q, rows):  # loop over pieces of query rows only
                r1 = min(r0 + rows, n_q)
                den = self._buf[: r1 - r0]
                np.matmul(b_sq[r0:r1], g_sq.T, out=den)
                np.maximum(den, eps_sq, out=den)  # = sq.clamp_min(eps²)
                np.sqrt(den, out=den)
                np.divide(out[r0:r1], den, out=out[r0:r1])
        if to_distance:  # torch's vectorised arccos, in place on the same memory
            self._to_distance_(torch.from_numpy(out))


def masked_distance_matrix(
    qf: ArrayLike,
    q_mask: ArrayLike,
    gf: ArrayLike,
    *,
    distance: str = "arccos",
    mask_norm: str = "mask_then_normalize",
    mask_query: bool = False,
    chunk_size: int = 4096,
    device: Optional[Union[str, torch.device]] = None,
    gallery_chunk: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """The full [Nq, G] DPM distance matrix, ``chunk_size`` queries at a time.

    Same arguments as :class:`MaskedCosineDistance`. The memory beyond the result is a few
    pieces of :data:`CHUNK_ELEMENTS` entries (plus, with the numpy backend, the normalised
    gallery). Prefer passing a :class:`MaskedCosineDistance` to ``evaluate_rank`` directly for
    large problems: it never holds the whole matrix.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dist = MaskedCosineDistance(
        qf, q_mask, gf, distance=distance, mask_norm=mask_norm, mask_query=mask_query, device=device,
        gallery_chunk=gallery_chunk, backend=backend,
    )
    n = dist.num_queries
    if n <= chunk_size:
        return dist(0, n)
    out = torch.empty(n, dist.num_gallery, dtype=dist.dtype, device=dist.qf.device)
    for s in range(0, n, chunk_size):  # each block written in place into the result
        dist._block(s, min(s + chunk_size, n), to_distance=True, out=out[s:s + chunk_size])
    return out
