"""Masked-prototype cosine and the ArcFace margin of DPM (ACM MM'22, Eq. 4 and Eq. 7).

DPM scores a feature x_i against *masked* prototypes: every row W_j of the shared prototype
matrix W [C, D] is multiplied channel-wise by the sample's own mask m_i ∈ (0, 1)^D (Eq. 4,
W^i_mp = W_p ⊙ M^i_p) and the masked branch is trained with an additive angular margin
(ArcFace, Eq. 7). The official code (``MArcface``) loops over the batch and, per sample, builds
the [C, D] masked prototype matrix. Here the same cosine comes from two matrix products
(dpm-official.md §3)::

    cos_ij = x̂_i · normalize(m_i ⊙ Ŵ_j) = ((x̂ ⊙ m) Ŵᵀ)_ij / sqrt((m² (Ŵ²)ᵀ)_ij)

with x̂ and Ŵ the L2-normalised features and prototypes. The same identity serves DPM's
retrieval, where the gallery plays the role of the prototypes
(:mod:`occreid.evaluation.masked_distance`).

Everything here computes in float32 (float64 if the inputs are float64) with autocast switched
off, and the sine of the ArcFace margin is taken from a clamped 1 − cos², so fp16/bf16 training
cannot produce the NaN the official code can.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MASK_NORMS",
    "masked_cosine",
    "arcface_logits",
    "ArcFaceLoss",
]

#: Where the mask sits relative to the L2 normalisation (Table 5 of the paper).
#:
#: ``"mask_then_normalize"`` (official, default): the masked vector is (re-)normalised,
#: normalize(m ⊙ v). The official code masks the row-normalised prototypes and normalises
#: again, normalize(m ⊙ normalize(W_j)), which is the same vector, so in the code "mask before"
#: and "mask after" the L2 norm coincide (dpm-official.md §3).
#: ``"normalize_then_mask"``: the vector is L2-normalised first and the mask scales the unit
#: vector, m ⊙ normalize(v), with no re-normalisation: the only reading of the paper's
#: "mask after the L2 normalization" that differs from the code.
MASK_NORMS = ("mask_then_normalize", "normalize_then_mask")

_NORM_EPS = 1e-12  # F.normalize's eps, as in the official code


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_mask_norm(mask_norm: str) -> None:
    if mask_norm not in MASK_NORMS:
        raise ValueError(f"mask_norm must be one of {MASK_NORMS}, got {mask_norm!r}")


def masked_cosine(
    feat: Tensor,
    mask: Tensor,
    weight: Tensor,
    *,
    mask_feature: bool = False,
    mask_norm: str = "mask_then_normalize",
    eps: float = _NORM_EPS,
) -> Tensor:
    """Cosine between each feature and the prototypes masked by *that feature's* mask.

    Args:
        feat: features x, [B, D] (any float dtype; not normalised).
        mask: per-sample channel masks m, [B, D], values in [0, 1].
        weight: prototypes W, [C, D] (rows not normalised).
        mask_feature: also mask the feature itself (Table 5's "F"/"Fn" rows; official: False).
        mask_norm: see :data:`MASK_NORMS` (official: ``"mask_then_normalize"``).
        eps: the F.normalize eps used for every L2 normalisation.

    Returns:
        cos [B, C] in float32 (float64 for float64 inputs), cos_ij = <f_i, p_ij> where
        f_i = x̂_i (or the masked feature) and p_ij the masked prototype j for sample i.
    """
    _check_mask_norm(mask_norm)
    if feat.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"expected feat [B, D] and weight [C, D], got {tuple(feat.shape)} and {tuple(weight.shape)}"
        )
    if mask.shape != feat.shape:
        raise ValueError(f"mask must have the shape of feat {tuple(feat.shape)}, got {tuple(mask.shape)}")
    if weight.shape[1] != feat.shape[1]:
        raise ValueError(
            f"feature width {feat.shape[1]} does not match the prototype width {weight.shape[1]}"
        )
    dtype = _compute_dtype(feat, mask, weight)
    renorm = mask_norm == "mask_then_normalize"
    with torch.autocast(device_type=feat.device.type, enabled=False):
        x = F.normalize(feat.to(dtype), dim=1, eps=eps)  # x̂ [B, D]
        m = mask.to(dtype)  # [B, D]
        w = F.normalize(weight.to(dtype), dim=1, eps=eps)  # Ŵ [C, D]
        if mask_feature:
            x = x * m
            if renorm:
                x = F.normalize(x, dim=1, eps=eps)
        num = (x * m) @ w.t()  # Σ_c f_ic m_ic Ŵ_jc            [B, C]
        if not renorm:
            return num
        # ‖m_i ⊙ Ŵ_j‖² = Σ_c m_ic² Ŵ_jc²; sqrt of a clamped square keeps F.normalize's
        # max(‖v‖, eps) and a finite gradient for an all-zero mask.
        sq = (m * m) @ (w * w).t()  # [B, C]
        return num / sq.clamp_min(eps * eps).sqrt()


def arcface_logits(
    cos: Tensor,
    labels: Tensor,
    *,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    sin_eps: float = 1e-7,
) -> Tensor:
    """ArcFace logits s·cos(θ + m) on the target class, s·cos elsewhere (Eq. 7).

    As ``MArcface`` (``easy_margin=False``): the target gets cos·cos m − sin·sin m where
    cos > cos(π − m), otherwise cos − m·sin(π − m) (the usual fallback that keeps the logit
    monotonic). Differences from the official code, none of which changes a value when
    |cos| < 1 − 5e-8: the cosine is computed in float32 with autocast off, clamped to [−1, 1],
    and sin = sqrt(max(1 − cos², ``sin_eps``)), so fp16/bf16 rounding (|cos| ≥ 1) cannot give
    NaN and the gradient stays finite at cos = ±1.

    Args:
        cos: cosines [B, C].
        labels: int64 class indices [B] in [0, C).
        scale: s (official 30).
        margin: m in radians (official 0.5 for Occluded-Duke, 0.3 for Market/Duke configs).
        easy_margin: apply the margin only where cos > 0 (official: off).
        sin_eps: floor of 1 − cos² under the square root.

    Returns:
        logits [B, C], float32 (float64 for float64 input).
    """
    if cos.dim() != 2:
        raise ValueError(f"expected cos [B, C], got shape {tuple(cos.shape)}")
    if labels.shape != (cos.shape[0],):
        raise ValueError(f"expected labels [{cos.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cos.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {cos.shape[1]}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    dtype = _compute_dtype(cos)
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    th = math.cos(math.pi - margin)
    mm = math.sin(math.pi - margin) * margin
    with torch.autocast(device_type=cos.device.type, enabled=False):
        c = cos.to(dtype).clamp(-1.0, 1.0)
        idx = labels.long().unsqueeze(1)
        c_t = c.gather(1, idx)  # target cosine [B, 1]
        sin_t = (1.0 - c_t * c_t).clamp_min(sin_eps).sqrt()
        phi = c_t * cos_m - sin_t * sin_m  # cos(θ + m)
        if easy_margin:
            phi = torch.where(c_t > 0, phi, c_t)
        else:
            phi = torch.where(c_t > th, phi, c_t - mm)
        return c.scatter(1, idx, phi) * scale


class ArcFaceLoss(nn.Module):
    """Cross-entropy on :func:`arcface_logits` (the masked branch's L_M-cls, Eq. 7).

    ``forward(cos, labels)`` takes the (masked) cosines [B, C], e.g. from :func:`masked_cosine`,
    and returns the batch-mean cross-entropy as a float32 scalar.
    """

    def __init__(self, scale: float = 30.0, margin: float = 0.5, easy_margin: bool = False) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)

    def forward(self, cos: Tensor, labels: Tensor) -> Tensor:
        logits = arcface_logits(
            cos, labels, scale=self.scale, margin=self.margin, easy_margin=self.easy_margin
        )
        with torch.autocast(device_type=cos.device.type, enabled=False):
            return F.cross_entropy(logits, labels)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, easy_margin={self.easy_margin}"
