"""Head-orthogonality loss of DPM's Head Enrich Module (HEM, ACM MM'22 Eq. 6).

Given the class-token attention of the last ViT block, A [B, N, P] (N heads, P patches), each
head's row is L2-normalised (Ȧ) and the heads are pushed apart:
L_hem = ‖Ȧ Ȧᵀ − I_N‖²_F.

Official reduction (``orthonomal_loss`` in DPM's ``loss/make_loss.py``): the squared error is
**summed over the batch** and over the N×N entries and divided by N² (144 for ViT-B); there is
no division by B. The row norm is sqrt(Σ_j A² + 1e-6), with the eps inside the square root.
``reduction="mean"`` divides by B as well (the paper does not state a batch reduction).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["HEM_REDUCTIONS", "head_orthogonality_loss", "HeadOrthogonalityLoss"]

HEM_REDUCTIONS = ("sum", "mean")


def head_orthogonality_loss(attn: Tensor, *, reduction: str = "sum", eps: float = 1e-6) -> Tensor:
    """Σ_b Σ_{h,h'} (Ȧ_b Ȧ_bᵀ − I)²_{hh'} / N² (``"sum"``, official) or that divided by B.

    Args:
        attn: class-token attention per head, [B, N, P] (pre-softmax logits in the official
            code; probabilities in the paper's variant).
        reduction: ``"sum"`` (official) or ``"mean"`` over the batch.
        eps: added to the squared row norm inside the square root (official 1e-6).

    Returns:
        scalar float32 (float64 for float64 input) loss, computed with autocast off.
    """
    if reduction not in HEM_REDUCTIONS:
        raise ValueError(f"reduction must be one of {HEM_REDUCTIONS}, got {reduction!r}")
    if attn.dim() != 3:
        raise ValueError(f"expected attention [B, heads, patches], got shape {tuple(attn.shape)}")
    dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32
    b, n, _ = attn.shape
    with torch.autocast(device_type=attn.device.type, enabled=False):
        a = attn.to(dtype)
        a = a / (a.pow(2).sum(dim=-1, keepdim=True) + eps).sqrt()  # Ȧ, rows ≈ unit  [B, N, P]
        gram = a @ a.transpose(1, 2)  # Ȧ Ȧᵀ                                     [B, N, N]
        eye = torch.eye(n, dtype=dtype, device=attn.device)
        loss = (gram - eye).pow(2).sum() / (n * n)
        if reduction == "mean":
            loss = loss / max(b, 1)
        return loss


class HeadOrthogonalityLoss(nn.Module):
    """Module wrapper of :func:`head_orthogonality_loss` (no parameters)."""

    def __init__(self, reduction: str = "sum", eps: float = 1e-6) -> None:
        super().__init__()
        if reduction not in HEM_REDUCTIONS:
            raise ValueError(f"reduction must be one of {HEM_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.eps = float(eps)

    def forward(self, attn: Tensor) -> Tensor:
        return head_orthogonality_loss(attn, reduction=self.reduction, eps=self.eps)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, eps={self.eps}"
