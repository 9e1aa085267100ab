"""ReID heads: the BNNeck and the bias-free ID classifier (TransReID / "Bag of Tricks").

* :class:`BNNeck` is a ``BatchNorm1d`` with weight 1, bias 0 and the bias frozen
  (``requires_grad=False``), so it only scales. The triplet loss sees the feature before
  it, the ID classifier the feature after it.
* :class:`Classifier` is ``Linear(D, C, bias=False)`` initialised ``N(0, 0.001)``.

Both are drop-in subclasses of the torch layers, so their state-dict names equal those of
TransReID's ``bottleneck`` / ``classifier`` (``weight``, ``bias``, ``running_mean``, ...).
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["BNNeck", "Classifier"]


class BNNeck(nn.BatchNorm1d):
    """``BatchNorm1d(dim)`` with weight 1, bias 0 and a frozen bias: ``[B, D] -> [B, D]``.

    Note: the bias has ``requires_grad=False``, so an optimiser built from
    ``p.requires_grad`` parameters skips it, as TransReID does.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(dim, eps=eps, momentum=momentum)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.bias.requires_grad_(False)


class Classifier(nn.Linear):
    """Bias-free ID classifier ``Linear(dim, num_classes)``, weights ``N(0, std)``.

    ``[B, D] -> [B, C]`` logits.
    """

    def __init__(self, dim: int, num_classes: int, std: float = 0.001) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(dim, num_classes, bias=False)
        nn.init.normal_(self.weight, 0.0, std)
