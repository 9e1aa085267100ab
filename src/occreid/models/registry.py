"""Model registry and ``build_model``: backbone + method head from plain arguments.

A method registers a class (or factory) whose signature starts with
``(backbone, num_classes, *, ...method options)``::

    from occreid.models.registry import MODELS

    @MODELS.register("fed")
    class FED(nn.Module):
        def __init__(self, backbone, num_classes, *, ...): ...

``build_model`` imports the method modules of this package that exist (``baseline``,
``fed``, ``dpm``) before looking the name up, so a new method file only needs the decorator.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ..utils import OccReIDError, Registry

__all__ = ["MODELS", "available_models", "build_model"]

logger = logging.getLogger(__name__)

MODELS: Registry = Registry("model")

#: Method modules imported on demand so that their ``@MODELS.register`` runs.
METHOD_MODULES: Tuple[str, ...] = ("baseline", "fed", "dpm")


def _import_methods() -> None:
    for mod in METHOD_MODULES:
        full = f"{__package__}.{mod}"
        if importlib.util.find_spec(full) is not None:
            importlib.import_module(full)


def available_models() -> list:
    """Names of all registered methods (imports the method modules first)."""
    _import_methods()
    return MODELS.names()


def _check_method_kwargs(name: str, builder: Any, kwargs: Mapping[str, Any]) -> None:
    """Raise TypeError naming every kwarg the method's builder does not accept."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        p.name
        for p in params.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in ("backbone", "num_classes")
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"build_model({name!r}) got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"{name!r} accepts: {', '.join(accepted) or '(none)'}"
        )


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
    **method_kwargs: Any,
) -> nn.Module:
    """Build method ``name`` (``MODELS.names()``) on a ViT backbone.

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
            ``attn_drop_rate``, ``fused_attn``).
        **method_kwargs: the method's own options (e.g. ``neck_feat="after"``); unknown
            names raise ``TypeError``.
    """
    from .backbone import build_backbone  # local: backbone is heavy-ish and imports timm

    _import_methods()
    builder = MODELS.get(name)  # unknown name: OccReIDError with "did you mean"
    _check_method_kwargs(name, builder, method_kwargs)

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
    return builder(net, num_classes, **method_kwargs)
