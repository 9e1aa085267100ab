"""The TransReID ViT baseline (``build_transformer`` without JPM; spec §3.1-3.2).

::

    tokens      = backbone(images, cam_ids)        # [B, 1+N, D], after the final LayerNorm
    global_feat = tokens[:, 0]                      # [B, D]   cls token -> triplet loss
    feat        = BNNeck(global_feat)               # [B, D]   weight 1, frozen bias 0
    logits      = Classifier(feat)                  # [B, C]   bias-free, N(0, 0.001) -> ID loss

Loss (weights 1:1 in TransReID): ``id_loss_weight * CE(logits, pids)`` (label smoothing
optional, off by default) + ``triplet_loss_weight * soft-margin batch-hard triplet`` on the
raw pre-BN ``global_feat``.

NPO augmentation without FED (FED's Table 3, row 2: ``data.npo=true``): a training batch of
7-channel NPO samples ``[B, 7, H, W]`` (clean view, occluded view, difference) is trained as
the ``2B`` images of both views, each view with its sample's identity.

Retrieval feature (eval mode): ``{"feat": global_feat}`` (``neck_feat="before"``, all
released configs) or ``{"feat": BNNeck(global_feat)}`` (``"after"``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ...losses import CrossEntropyLabelSmooth, TripletLoss
from ...models.heads import BNNeck, Classifier
from ..spec import NECK_FEATS, check_choice

__all__ = ["Baseline"]


class Baseline(nn.Module):
    """ViT + BNNeck + ID classifier, trained with ID + triplet losses.

    Args:
        backbone: a module mapping ``(images, cam_ids)`` to tokens ``[B, 1+N, D]`` with an
            ``embed_dim`` attribute (a :class:`~occreid.models.backbone.ViTBackbone`).
        num_classes: number of training identities.
        neck_feat: retrieval feature in eval mode, ``"before"`` (pre-BN, default) or
            ``"after"`` (post-BN).
        label_smoothing: epsilon of the ID loss (0 = plain cross-entropy, the default).
        triplet_margin: ``None`` = soft-margin triplet (default), else the hard margin.
        id_loss_weight, triplet_loss_weight: loss weights (1.0 each by default).

    ``bottleneck`` and ``classifier`` are named as in TransReID; its ``base.*`` backbone keys
    (and those of occreid checkpoints written before the backbone was named ``backbone``) are
    renamed on load.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        neck_feat: str = "before",
        label_smoothing: float = 0.0,
        triplet_margin: Optional[float] = None,
        id_loss_weight: float = 1.0,
        triplet_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_choice("neck_feat", neck_feat, NECK_FEATS)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.feature_dim: int = int(backbone.embed_dim)
        self.num_classes = int(num_classes)
        self.neck_feat = neck_feat
        self.bottleneck = BNNeck(self.feature_dim)
        self.classifier = Classifier(self.feature_dim, self.num_classes)
        self.id_loss = CrossEntropyLabelSmooth(self.num_classes, label_smoothing)
        self.triplet_loss = TripletLoss(margin=triplet_margin)
        self.id_loss_weight = float(id_loss_weight)
        self.triplet_loss_weight = float(triplet_loss_weight)
        self._register_load_state_dict_pre_hook(_rename_base_keys)

    def forward(
        self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Train mode: ``{"logits": [B, C], "global_feat": [B, D]}``; eval: ``{"feat": [B, D]}``.

        A 7-channel NPO training batch gives outputs over its ``2B`` views (clean first)."""
        if self.training and images.dim() == 4 and images.shape[1] == 7:
            images = torch.cat([images[:, 0:3], images[:, 3:6]])
            if cam_ids is not None:
                cam_ids = torch.cat([cam_ids, cam_ids])
        # the cls token after the final norm; ViTBackbone.forward_cls skips the last block's
        # patch-token outputs, which the baseline never reads
        cls_only = getattr(self.backbone, "forward_cls", None)
        global_feat = cls_only(images, cam_ids) if cls_only is not None else self.backbone(images, cam_ids)[:, 0]
        if self.training:
            feat = self.bottleneck(global_feat)
            return {"logits": self.classifier(feat), "global_feat": global_feat}
        return {"feat": self.bottleneck(global_feat) if self.neck_feat == "after" else global_feat}

    def loss(self, outputs: Dict[str, torch.Tensor], pids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"id": w_id * CE, "triplet": w_tri * triplet}``; the trainer sums the values.

        ``pids [B]`` of a two-view NPO batch (outputs over ``2B`` images) are repeated."""
        n = outputs["logits"].shape[0]
        if n == 2 * pids.shape[0]:
            pids = torch.cat([pids, pids])
        elif n != pids.shape[0]:
            raise ValueError(f"{n} outputs for {pids.shape[0]} identity labels")
        return {
            "id": self.id_loss_weight * self.id_loss(outputs["logits"], pids),
            "triplet": self.triplet_loss_weight * self.triplet_loss(outputs["global_feat"], pids),
        }


def _rename_base_keys(state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """``base.*`` (TransReID, older occreid checkpoints) -> ``backbone.*``, in place."""
    old = prefix + "base."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "backbone." + key[len(old):]] = state_dict.pop(key)
