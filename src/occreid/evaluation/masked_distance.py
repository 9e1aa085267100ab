"""DPM's query-mask retrieval distance (dpm-official.md §7), batched.

The official test code (``utils/metrics.py::cosine_single``) loops over queries. For query i it
multiplies **every gallery feature** by that query's mask, re-normalises, and takes the cosine
with the (unmasked) query; gallery masks are computed but ignored. The gallery plays the role
the prototypes W play in training::

    s_ij = q̂_i · normalize(m_i ⊙ ĝ_j)
    dist_ij = arccos(clip(s_ij, −1 + 1e-5, 1 − 1e-5))

Here the same numbers come from two matrix products per block of queries,
S = ((Q̂ ⊙ M) Ĝᵀ) ⊘ sqrt(M² (Ĝ²)ᵀ), via :func:`occreid.losses.arcface.masked_cosine`, so a block
of b queries costs two [b, D]·[D, G] GEMMs and O(b·G) memory.

:class:`MaskedCosineDistance` is the block callable that
:func:`occreid.evaluation.evaluate_rank` accepts as ``distmat`` (``num_queries`` and
``__call__(start, stop) -> [stop - start, G]``), so the full Nq × G matrix never has to exist;
:func:`masked_distance_matrix` computes the whole matrix in chunks.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..losses.arcface import MASK_NORMS, masked_cosine

__all__ = ["MASKED_DISTANCES", "MaskedCosineDistance", "masked_distance_matrix"]

#: ``"arccos"`` (official): arccos of the clipped cosine; ``"cosine"``: 1 − cosine. Both rank
#: identically (up to ties created by the clip).
MASKED_DISTANCES = ("arccos", "cosine")

_ARCCOS_CLIP = 1e-5  # official clip of the cosine before arccos

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

    ``dist(start, stop)`` returns float32 (float64 for float64 inputs) distances
    [stop − start, G]; smaller is more similar. ``num_queries`` is Nq.
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
    ) -> None:
        if distance not in MASKED_DISTANCES:
            raise ValueError(f"distance must be one of {MASKED_DISTANCES}, got {distance!r}")
        if mask_norm not in MASK_NORMS:
            raise ValueError(f"mask_norm must be one of {MASK_NORMS}, got {mask_norm!r}")
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
        self.distance = distance
        self.mask_norm = mask_norm
        self.mask_query = bool(mask_query)

    @property
    def num_queries(self) -> int:
        return int(self.qf.shape[0])

    @property
    def num_gallery(self) -> int:
        return int(self.gf.shape[0])

    def __len__(self) -> int:
        return self.num_queries

    def similarity(self, start: int, stop: int) -> Tensor:
        """Masked cosines s_ij for queries ``start:stop``, [stop − start, G]."""
        if not 0 <= start <= stop <= self.num_queries:
            raise IndexError(f"query block [{start}, {stop}) out of range for {self.num_queries} queries")
        # The gallery takes the prototypes' place: each query's mask multiplies every ĝ_j.
        return masked_cosine(
            self.qf[start:stop],
            self.q_mask[start:stop],
            self.gf,
            mask_feature=self.mask_query,
            mask_norm=self.mask_norm,
        )

    def __call__(self, start: int, stop: int) -> Tensor:
        s = self.similarity(start, stop)
        if self.distance == "arccos":
            return torch.arccos(s.clamp(-1.0 + _ARCCOS_CLIP, 1.0 - _ARCCOS_CLIP))
        return 1.0 - s

    def __repr__(self) -> str:
        return (
            f"MaskedCosineDistance(num_queries={self.num_queries}, num_gallery={self.num_gallery}, "
            f"distance={self.distance!r}, mask_norm={self.mask_norm!r}, mask_query={self.mask_query})"
        )


def masked_distance_matrix(
    qf: ArrayLike,
    q_mask: ArrayLike,
    gf: ArrayLike,
    *,
    distance: str = "arccos",
    mask_norm: str = "mask_then_normalize",
    mask_query: bool = False,
    chunk_size: int = 1024,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """The full [Nq, G] DPM distance matrix, computed ``chunk_size`` queries at a time.

    Same arguments as :class:`MaskedCosineDistance`. Prefer passing a
    :class:`MaskedCosineDistance` to ``evaluate_rank`` directly for large problems: it never holds
    the whole matrix.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dist = MaskedCosineDistance(
        qf, q_mask, gf, distance=distance, mask_norm=mask_norm, mask_query=mask_query, device=device
    )
    n = dist.num_queries
    blocks = [dist(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    if not blocks:
        return dist(0, 0)
    return torch.cat(blocks, dim=0)
