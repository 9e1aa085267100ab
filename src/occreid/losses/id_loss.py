"""Identity (classification) loss: cross-entropy, optionally with label smoothing.

TransReID's ``CrossEntropyLabelSmooth``: target distribution
``t = (1 - eps) * onehot(y) + eps / K`` and loss ``sum_k mean_b(-t_bk * log_softmax(z)_bk)``,
which equals ``F.cross_entropy(z, y, label_smoothing=eps)``. With ``eps = 0`` (all released
configs) it is plain ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import OccReIDError

__all__ = ["CrossEntropyLabelSmooth"]


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy with label smoothing ``epsilon`` over ``num_classes`` classes.

    ``forward(logits [B, K], targets [B]) -> scalar`` (mean over the batch), computed in
    fp32 even when the logits are half precision.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must lie in [0, 1), got {epsilon}")
        self.num_classes = int(num_classes)
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"expected logits of shape [B, {self.num_classes}], got {tuple(logits.shape)}"
            )
        if targets.shape != (logits.shape[0],):
            raise ValueError(f"expected targets of shape [{logits.shape[0]}], got {tuple(targets.shape)}")
        if bool(((targets < 0) | (targets >= self.num_classes)).any()):
            raise OccReIDError(
                f"identity labels must lie in [0, {self.num_classes - 1}] (num_classes="
                f"{self.num_classes}); got values from {int(targets.min())} to {int(targets.max())}. "
                "Build the model with the dataset's number of training identities"
            )
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.epsilon)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, epsilon={self.epsilon}"
