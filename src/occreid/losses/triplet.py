"""Batch-hard triplet loss (Hermans et al. 2017) as used by TransReID, FED and DPM.

* ``euclidean_dist``: ``sqrt(clamp(|x|^2 + |y|^2 - 2 x y^T, min=1e-12))``, computed in fp32
  even under autocast (the official code runs the matmul in fp16).
* ``hard_example_mining``: for each anchor, ``d_ap`` = the largest distance to a sample with
  the same label (the anchor itself included, distance ~1e-6) and ``d_an`` = the smallest
  distance to a sample with another label. Vectorised with masks, so any number of samples
  per identity works (the official ``view(N, -1)`` needs exactly K per identity). An anchor
  with no negative in the batch gets ``d_an = +inf`` and contributes zero loss.
* ``TripletLoss(margin=None)``: soft margin ``mean(log(1 + exp(-(d_an - d_ap))))``
  (``SoftMarginLoss``, TransReID ``NO_MARGIN: True``); with a margin,
  ``MarginRankingLoss``: ``mean(max(0, d_ap - d_an + margin))``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["euclidean_dist", "hard_example_mining", "TripletLoss"]


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances ``[m, d] x [n, d] -> [m, n]`` in fp32.

    ``sqrt(clamp(|x_i|^2 + |y_j|^2 - 2 x_i . y_j, min=1e-12))``; the clamp makes the
    distance of a vector to itself about 1e-6 and keeps the gradient finite there.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected [m, d] and [n, d] features, got {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        xx = x.pow(2).sum(1, keepdim=True)  # [m, 1]
        yy = y.pow(2).sum(1, keepdim=True).t()  # [1, n]
        dist = torch.addmm(xx + yy, x, y.t(), beta=1.0, alpha=-2.0)
        return dist.clamp(min=1e-12).sqrt()


def hard_example_mining(
    dist: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard mining on a square distance matrix.

    Args:
        dist: ``[N, N]`` pairwise distances.
        labels: ``[N]`` identity labels.

    Returns:
        ``d_ap [N]`` (hardest positive, self included) and ``d_an [N]`` (hardest negative;
        ``+inf`` when the batch has no sample of another identity).
    """
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square [N, N] matrix, got {tuple(dist.shape)}")
    if labels.shape != (dist.shape[0],):
        raise ValueError(f"labels must have shape [{dist.shape[0]}], got {tuple(labels.shape)}")
    same = labels.unsqueeze(0) == labels.unsqueeze(1)  # [N, N], diagonal True
    d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
    return d_ap, d_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss on raw (or optionally L2-normalised) features.

    Args:
        margin: ``None`` for the soft-margin version (TransReID default), else the margin of
            ``MarginRankingLoss`` (TransReID ``SOLVER.MARGIN`` = 0.3).
        normalize_feature: L2-normalise the features first (off in TransReID/FED/DPM).
    """

    def __init__(self, margin: Optional[float] = None, normalize_feature: bool = False) -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 or None (soft margin), got {margin}")
        self.margin = margin
        self.normalize_feature = normalize_feature

    def forward(
        self, feats: torch.Tensor, labels: torch.Tensor, return_dists: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``feats [N, D]``, ``labels [N]`` -> scalar loss (and ``d_ap``, ``d_an`` [N])."""
        if feats.ndim != 2 or labels.shape != (feats.shape[0],):
            raise ValueError(
                f"expected feats [N, D] and labels [N], got {tuple(feats.shape)} and {tuple(labels.shape)}"
            )
        if self.normalize_feature:
            feats = F.normalize(feats.float(), dim=1)
        dist = euclidean_dist(feats, feats)
        d_ap, d_an = hard_example_mining(dist, labels)
        diff = d_an - d_ap  # want > 0 (negatives further than positives)
        if self.margin is None:
            loss = F.soft_margin_loss(diff, torch.ones_like(diff))  # mean log(1 + exp(-diff))
        else:
            loss = F.margin_ranking_loss(d_an, d_ap, torch.ones_like(diff), margin=self.margin)
        if return_dists:
            return loss, d_ap, d_an
        return loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize_feature={self.normalize_feature}"
