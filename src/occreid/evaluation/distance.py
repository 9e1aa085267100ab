"""Pairwise distances between query and gallery features.

Conventions (smaller = more similar, as everywhere in :mod:`occreid.evaluation`):

- ``"euclidean"``: the **squared** Euclidean distance ``‖q‖² + ‖g‖² − 2 q·g``, exactly the
  formula of TransReID's ``euclidean_distance`` and torchreid's ``compute_distance_matrix``
  (no square root, no clamping at 0, so rankings agree with theirs bit for bit up to
  summation order). On L2-normalised features it equals ``2 − 2 cos``.
- ``"cosine"``: ``1 − cos(q, g)`` (fast-reid's default metric).

Features may be numpy arrays or torch tensors of any float dtype; the result is a torch
tensor on the features' device. Half/bfloat16 inputs are up-cast so that every dot product
accumulates in float32; float64 inputs stay float64. The work is chunked over queries so that
temporaries stay O(chunk × ng) on top of the [nq, ng] output.

:class:`DistanceBlocks` computes the same distances lazily, block of queries by block of
queries; pass it to :func:`occreid.evaluation.evaluate_rank` instead of a dense matrix to
evaluate without ever holding the full [nq, ng] matrix (11,659 × 82,161 floats = 3.8 GB on
MSMT17).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Union

import numpy as np
import torch

from ..utils import OccReIDError, Registry

__all__ = [
    "EvaluationInputError",
    "DISTANCE_METRICS",
    "DistanceBlocks",
    "compute_distance",
    "normalize_features",
]

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]


class EvaluationInputError(OccReIDError, ValueError):
    """Bad input to an evaluation function (shapes, ids, options, empty or NaN data).

    It is both an :class:`~occreid.utils.OccReIDError` (a user-input error whose message says
    what to do) and a :class:`ValueError`, so either ``except`` clause catches it.
    """


def _as_feature_tensor(x: Any, name: str) -> torch.Tensor:
    """numpy/torch [n, d] float features -> torch tensor (no copy when possible)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise EvaluationInputError(
                f"{name} must hold floating-point features, got numpy dtype {x.dtype}; "
                "convert with .astype(np.float32)"
            )
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise EvaluationInputError(
                f"{name} must hold floating-point features, got torch dtype {x.dtype}; "
                "convert with .float()"
            )
        t = x.detach()
    else:
        raise EvaluationInputError(
            f"{name} must be a numpy array or a torch tensor of shape [n, dim], "
            f"got {type(x).__name__}"
        )
    if t.dim() != 2:
        raise EvaluationInputError(
            f"{name} must be 2-D [n, dim], got shape {tuple(t.shape)}; "
            "flatten per-image features first"
        )
    return t


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp32 accumulation for half inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _pair_on_one_device(qf: Any, gf: Any) -> "tuple[torch.Tensor, torch.Tensor]":
    """Convert both feature sets; numpy follows the tensor's device, mismatched tensors fail."""
    q = _as_feature_tensor(qf, "qf")
    g = _as_feature_tensor(gf, "gf")
    if isinstance(qf, np.ndarray) and isinstance(gf, torch.Tensor):
        q = q.to(g.device)
    elif isinstance(gf, np.ndarray) and isinstance(qf, torch.Tensor):
        g = g.to(q.device)
    if q.device != g.device:
        raise EvaluationInputError(
            f"qf is on {q.device} but gf is on {g.device}; move both to one device"
        )
    if q.shape[1] != g.shape[1]:
        raise EvaluationInputError(
            f"query and gallery feature widths differ: qf is {tuple(q.shape)}, "
            f"gf is {tuple(g.shape)}; both must come from the same model/head"
        )
    return q, g


def normalize_features(x: ArrayLike, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise each row of ``x`` [n, d] (``F.normalize(x, dim=1)``).

    Computed in float32 for half/bfloat16 input (returned in the input dtype); numpy input
    gives a CPU tensor. Zero rows stay zero (the norm is clamped at ``eps``).
    """
    t = _as_feature_tensor(x, "x")
    work = t.to(_compute_dtype(t))
    out = torch.nn.functional.normalize(work, p=2.0, dim=1, eps=eps)
    return out.to(t.dtype)


def _euclidean_block(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    # ‖q‖² + ‖g‖² − 2 q·gᵀ  -> [c, ng]; addmm(beta=1, alpha=-2) as TransReID/torchreid.
    q_sq = q.pow(2).sum(dim=1, keepdim=True)  # [c, 1]
    return torch.addmm(q_sq + g_sq, q, g.t(), beta=1, alpha=-2)


def _cosine_block(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    # g is already row-normalised by the caller's prepare step: 1 − q̂·ĝᵀ -> [c, ng]
    q_hat = torch.nn.functional.normalize(q, p=2.0, dim=1)
    return torch.addmm(torch.ones((), dtype=q.dtype, device=q.device), q_hat, g.t(),
                       beta=1, alpha=-1)


#: metric name -> (block function, whether the gallery is L2-normalised once up front)
DISTANCE_METRICS: "Registry[tuple[Callable[..., torch.Tensor], bool]]" = Registry("distance metric")
DISTANCE_METRICS.register("euclidean", aliases=("sqeuclidean",))((_euclidean_block, False))
DISTANCE_METRICS.register("cosine")((_cosine_block, True))


def _check_metric(metric: str) -> str:
    try:
        return DISTANCE_METRICS.canonical(metric)
    except KeyError as exc:
        raise EvaluationInputError(exc.args[0]) from None


def _check_chunk(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise EvaluationInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


class DistanceBlocks:
    """Lazy query-block distances: ``blocks(start, stop)`` -> [stop − start, ng] tensor.

    Implements the block-distance protocol of :func:`~occreid.evaluation.evaluate_rank`
    (``num_queries`` + ``__call__(start, stop)``), so a ranking can be evaluated without
    materialising the whole [nq, ng] matrix. ``blocks[:]``-style slicing is not provided;
    use :func:`compute_distance` for a dense matrix.
    """

    def __init__(self, qf: ArrayLike, gf: ArrayLike, metric: str = "euclidean", *,
                 normalize: bool = False) -> None:
        self.metric = _check_metric(metric)
        q, g = _pair_on_one_device(qf, gf)
        dtype = _compute_dtype(q, g)
        self._block, norm_gallery = DISTANCE_METRICS.get(self.metric)
        self._normalize = bool(normalize)
        self._q = q
        g = g.to(dtype)  # one up-cast of the gallery: [ng, d] in the compute dtype
        if self._normalize or norm_gallery:
            g = torch.nn.functional.normalize(g, p=2.0, dim=1)
        self._g = g
        self._g_sq = g.pow(2).sum(dim=1).unsqueeze(0)  # [1, ng]
        self._dtype = dtype

    @property
    def num_queries(self) -> int:
        return int(self._q.shape[0])

    @property
    def num_gallery(self) -> int:
        return int(self._g.shape[0])

    @property
    def device(self) -> torch.device:
        return self._g.device

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        q = self._q[start:stop].to(self._dtype)  # [c, d]
        if self._normalize:
            q = torch.nn.functional.normalize(q, p=2.0, dim=1)
        return self._block(q, self._g, self._g_sq)

    def __len__(self) -> int:
        return self.num_queries


def compute_distance(qf: ArrayLike, gf: ArrayLike, metric: str = "euclidean", *,
                     normalize: bool = False, chunk_size: int = 4096) -> torch.Tensor:
    """Dense query × gallery distance matrix [nq, ng] (smaller = more similar).

    Args:
        qf: query features [nq, d] (numpy or torch, any float dtype).
        gf: gallery features [ng, d], same width and device as ``qf``.
        metric: ``"euclidean"`` (squared, as TransReID/torchreid) or ``"cosine"`` (1 − cos).
        normalize: L2-normalise both feature sets first (TransReID's ``FEAT_NORM``); with
            ``"euclidean"`` this gives ``2 − 2 cos``, the cosine ranking.
        chunk_size: queries per block; bounds temporaries to O(chunk × ng).

    Returns:
        float32 tensor (float64 if an input is float64) on the features' device.
    """
    chunk = _check_chunk(chunk_size)
    blocks = DistanceBlocks(qf, gf, metric, normalize=normalize)
    nq, ng = blocks.num_queries, blocks.num_gallery
    out = torch.empty((nq, ng), dtype=blocks._dtype, device=blocks.device)
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        out[start:stop] = blocks(start, stop)
    return out
