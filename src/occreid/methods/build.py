"""``build_model``: a method's model on a ViT backbone, from plain arguments."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence, Union

import torch.nn as nn

from ..models.backbone import build_backbone
from ..utils import OccReIDError
from .spec import get_method

__all__ = ["build_model"]

logger = logging.getLogger(__name__)


def build_model(
    name: str,
    *,
    num_classes: int,
    num_cameras: int = 0,
    backbone: str = "vit_base_patch16",
    img_size: Union[int, Sequence[int]] = (256, 128),
    stride: Union[int, Sequence[int], None] = 16,
    sie_camera: bool = False,
    sie_coef: float = 3.0,
    drop_path: float = 0.1,
    pretrained: Optional[str] = None,
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> nn.Module:
    """Build method ``name`` (:func:`occreid.methods.available_methods`) on a ViT backbone.

    Args:
        name: registered method, e.g. ``"baseline"``.
        num_classes: number of training identities.
        num_cameras: number of training cameras (used only with ``sie_camera``).
        backbone: backbone variant (``occreid.models.BACKBONES.names()``).
        img_size, stride, sie_coef, drop_path, pretrained: see
            :func:`occreid.models.backbone.build_backbone`.
        sie_camera: add the SIE camera embedding (needs ``num_cameras``; TransReID creates it
            only for more than one camera).
        backbone_kwargs: extra :func:`build_backbone` arguments (``drop_rate``,
            ``attn_drop_rate``, ``fused_attn``, ``grad_checkpointing``).
        **options: the method's own options (e.g. ``neck_feat="after"``), checked by name and
            type against the method's spec.
    """
    spec = get_method(name)  # unknown name: OccReIDError with "did you mean"
    opts = spec.options()
    unknown = sorted(set(options) - set(opts))
    if unknown:
        raise OccReIDError(
            f"build_model({name!r}) got unknown option(s) {', '.join(unknown)}; "
            f"{name!r} accepts: {', '.join(sorted(opts)) or '(none)'}"
        )
    checked = {k: opts[k].check(v, k) for k, v in options.items()}
    cams = 0
    if sie_camera:
        if num_cameras < 1:
            raise OccReIDError(
                "sie_camera=True needs num_cameras (the number of training cameras of the "
                f"dataset), got num_cameras={num_cameras}"
            )
        if num_cameras == 1:
            logger.warning("sie_camera=True with a single camera: SIE is not created (as in TransReID)")
        cams = num_cameras
    extra = dict(backbone_kwargs or {})
    clash = sorted(set(extra) & {"img_size", "stride", "num_cameras", "sie_coef", "drop_path", "pretrained"})
    if clash:
        raise TypeError(f"pass {', '.join(clash)} to build_model directly, not in backbone_kwargs")
    net = build_backbone(
        backbone,
        img_size=img_size,
        stride=stride,
        num_cameras=cams,
        sie_coef=sie_coef,
        drop_path=drop_path,
        pretrained=pretrained,
        **extra,
    )
    return spec.build_model(net, num_classes, **checked)
