"""Load ImageNet ViT checkpoints into :class:`~occreid.models.backbone.ViTBackbone`.

Follows TransReID's ``load_param`` (``specs/transreid-backbone.md`` §2) but checks strictly
and reports what it did instead of printing and carrying on:

1. ``torch.load(path, map_location="cpu", weights_only=True)`` (or a ``.safetensors`` file,
   or an in-memory state dict, or ``"timm:<name>"``).
2. Unwrap ``{'model': ...}`` (DeiT) and ``{'state_dict': ...}`` (timm / Lightning style)
   and strip a ``module.`` (DataParallel / DDP) prefix.
3. Ignore the known-unused ImageNet keys: ``head.*``, ``head_dist.*``, ``dist_token``,
   ``fc.*``, ``pre_logits.*``.
4. Reshape a 2-D patch-embedding weight ``[D, 3*p*p]`` to ``[D, 3, p, p]``.
5. ``pos_embed``: drop the distillation-token position (index 1) when the checkpoint has a
   ``dist_token`` (DeiT distilled), then resize the patch grid bilinearly
   (``align_corners=False``, no antialias, in fp32) from the checkpoint's square grid (or a
   given grid) to the model grid, keeping the cls position unchanged.
6. The patch kernel is copied as is whatever the stride (overlapping windows reuse it).
7. ``sie_embed`` is expected to be missing and keeps its initialisation.

With ``strict=True`` any other missing key, unexpected key or shape mismatch raises
:class:`~occreid.utils.OccReIDError` naming the keys.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import OccReIDError
from ..utils.io import safe_torch_load

__all__ = [
    "LoadReport",
    "load_pretrained",
    "load_checkpoint_file",
    "adapt_state_dict",
    "resize_pos_embed",
    "backbone_state_from_reid_checkpoint",
    "IGNORED_PREFIXES",
    "IGNORED_KEYS",
]

logger = logging.getLogger(__name__)

#: ImageNet-only parts of ViT / DeiT checkpoints that a ReID backbone never uses.
IGNORED_PREFIXES: Tuple[str, ...] = ("head.", "head_dist.", "fc.", "pre_logits.")
IGNORED_KEYS: Tuple[str, ...] = ("dist_token",)
#: Backbone keys a pretrained ImageNet checkpoint cannot have; they keep their init.
EXPECTED_MISSING: Tuple[str, ...] = ("sie_embed",)

StateDict = Dict[str, torch.Tensor]
Source = Union[str, os.PathLike, Mapping]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``str(report)`` gives a one-line summary."""

    source: str
    loaded: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    expected_missing: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    pos_embed_resized: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None
    dropped_dist_token: bool = False
    patch_weight_reshaped: bool = False

    @property
    def ok(self) -> bool:
        """True when every backbone tensor (except the expected-missing ones) was loaded."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded from {self.source}"]
        if self.ignored:
            parts.append(f"ignored {', '.join(self.ignored)}")
        if self.dropped_dist_token:
            parts.append("dropped the distillation-token position of pos_embed")
        if self.pos_embed_resized:
            (a, b), (c, d) = self.pos_embed_resized
            parts.append(f"resized pos_embed grid {a}x{b} -> {c}x{d}")
        if self.patch_weight_reshaped:
            parts.append("reshaped a 2-D patch_embed weight")
        if self.expected_missing:
            parts.append(f"kept the init of {', '.join(self.expected_missing)}")
        if self.missing:
            parts.append(f"MISSING {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"UNEXPECTED {', '.join(self.unexpected)}")
        if self.mismatched:
            parts.append("MISMATCHED " + ", ".join(f"{k} {a} vs {b}" for k, a, b in self.mismatched))
        return "; ".join(parts)

    __str__ = summary


# ---------------------------------------------------------------------- reading
def load_checkpoint_file(path: Union[str, os.PathLike]) -> Mapping:
    """Read a checkpoint safely: ``torch.load(..., map_location='cpu', weights_only=True)``.

    ``.safetensors`` files are read with :mod:`safetensors`. ``argparse.Namespace`` (the
    ``args`` entry of timm training checkpoints) is allowed as a safe global.
    """
    p = Path(path)
    if not p.is_file():
        raise OccReIDError(
            f"checkpoint file not found: {p}. Pass the path of a downloaded ViT checkpoint "
            "(e.g. jx_vit_base_p16_224-80ecf9dd.pth) or 'timm:<model name>'"
        )
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - safetensors ships with timm
            raise OccReIDError(f"reading {p} needs the 'safetensors' package (pip install safetensors)") from None
        try:
            return load_file(str(p), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise OccReIDError(f"cannot read safetensors checkpoint {p}: {exc}") from None
    obj = safe_torch_load(p, "checkpoint", "a plain tensor checkpoint, readable with torch.load(weights_only=True); "
                          "re-save it as a state dict with torch.save(model.state_dict(), path)",
                          safe_globals=[argparse.Namespace])
    if not isinstance(obj, Mapping):
        raise OccReIDError(f"checkpoint {p} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _load_timm(name: str) -> Mapping:
    """State dict of timm's pretrained ``name`` (downloads through timm / Hugging Face)."""
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        raise OccReIDError("'timm:' weights need the timm package") from None
    if not name:
        raise OccReIDError("empty timm model name: use e.g. 'timm:vit_base_patch16_224.orig_in21k_ft_in1k'")
    if not timm.is_model(name.split(".")[0]):
        raise OccReIDError(
            f"timm has no model named {name!r}; list candidates with "
            f"timm.list_models('*{name.split('.')[0][:12]}*', pretrained=True)"
        )
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:
        raise OccReIDError(
            f"could not get timm pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
            "This needs internet access (or the weights in the Hugging Face cache); offline, "
            "download the checkpoint elsewhere and pass its local file path instead"
        ) from None
    return model.state_dict()


def _unwrap(obj: Mapping) -> Mapping:
    """Unwrap ``{'model': sd}`` / ``{'state_dict': sd}`` (repeatedly) and ``module.``."""
    sd = obj
    changed = True
    while changed:
        changed = False
        for key in ("model", "state_dict"):
            inner = sd.get(key) if isinstance(sd, Mapping) else None
            if isinstance(inner, Mapping):
                sd, changed = inner, True
                break
    out: StateDict = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue  # epoch counters, args, ...
        out[k] = v
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


# ---------------------------------------------------------------------- pos-embed
def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Tuple[int, int],
    old_grid: Optional[Tuple[int, int]] = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize ``[1, prefix + gy*gx, D]`` position embeddings to ``new_grid`` (TransReID).

    The prefix (cls) positions are kept; the grid part is reshaped to ``[1, D, gy, gx]``
    (row-major tokens), resized with ``F.interpolate(mode='bilinear', align_corners=False)``
    without antialias in fp32, and flattened back. ``old_grid`` defaults to the square grid
    ``sqrt(num tokens)``.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise OccReIDError(f"pos_embed must have shape [1, tokens, D], got {tuple(pos_embed.shape)}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = grid.shape[1], grid.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise OccReIDError(
                f"the checkpoint's pos_embed has {n} patch positions, which is not a square grid; "
                "pass its grid explicitly (load_pretrained(..., src_grid=(gy, gx)))"
            )
        old_grid = (side, side)
    gy, gx = int(old_grid[0]), int(old_grid[1])
    if gy * gx != n:
        raise OccReIDError(f"src_grid {gy}x{gx} does not match the {n} patch positions of the checkpoint's pos_embed")
    dtype = pos_embed.dtype
    grid = grid.float().reshape(1, gy, gx, dim).permute(0, 3, 1, 2)  # [1, D, gy, gx]
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)  # row-major
    return torch.cat((prefix.float(), grid), dim=1).to(dtype)


# ---------------------------------------------------------------------- adapting
def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def adapt_state_dict(
    state_dict: Mapping,
    model: nn.Module,
    src_grid: Optional[Tuple[int, int]] = None,
    report: Optional[LoadReport] = None,
) -> Tuple[StateDict, LoadReport]:
    """Turn an ImageNet checkpoint into a state dict for ``model`` (a ViTBackbone).

    Returns the adapted tensors (only keys the model has, with matching shapes) and a
    :class:`LoadReport` listing ignored, missing, unexpected and mismatched keys.
    """
    report = report if report is not None else LoadReport(source="<state dict>")
    sd = _unwrap(state_dict)
    has_dist_token = "dist_token" in sd
    target = model.state_dict()
    adapted: StateDict = {}

    for key, value in sd.items():
        if _is_ignored(key):
            report.ignored.append(key)
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if key == "patch_embed.proj.weight" and value.ndim < 4 and value.numel() == target[key].numel():
            value = value.reshape(want)  # old linear patchifier [D, 3*p*p] -> [D, 3, p, p]
            report.patch_weight_reshaped = True
        elif key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want[-1]:
            if has_dist_token:
                value = torch.cat((value[:, :1], value[:, 2:]), dim=1)  # drop the dist position
                report.dropped_dist_token = True
            if value.shape != want:
                n_old = value.shape[1] - 1
                old = src_grid
                if old is None:
                    side = math.isqrt(n_old)
                    old = (side, side) if side * side == n_old else None
                if old is None:
                    raise OccReIDError(
                        f"the checkpoint's pos_embed has {n_old} patch positions, which is not a "
                        "square grid; pass its grid as src_grid=(gy, gx)"
                    )
                new = tuple(model.grid_size)  # type: ignore[attr-defined]
                value = resize_pos_embed(value, new, old_grid=old)
                report.pos_embed_resized = (tuple(old), new)  # type: ignore[assignment]
        if value.shape != want:
            report.mismatched.append((key, tuple(value.shape), tuple(want)))
            continue
        adapted[key] = value

    for key in target:
        if key in adapted or any(key == m for m, _, _ in report.mismatched):
            continue
        if key in EXPECTED_MISSING:
            report.expected_missing.append(key)
        else:
            report.missing.append(key)
    report.loaded = sorted(adapted)
    return adapted, report


def _format_keys(keys: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _strict_error(report: LoadReport, model: nn.Module, sd_keys: Sequence[str]) -> OccReIDError:
    lines = [f"pretrained checkpoint {report.source} does not match the backbone:"]
    if report.missing:
        lines.append(f"  missing in the checkpoint ({len(report.missing)}): {_format_keys(report.missing)}")
    if report.unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(report.unexpected)}): {_format_keys(report.unexpected)}")
    if report.mismatched:
        shown = [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in report.mismatched]
        lines.append(f"  shape mismatch ({len(shown)}): {_format_keys(shown, 20)}")
    reid_like = sum(k.startswith(_REID_PREFIXES) for k in sd_keys)
    if reid_like and reid_like >= len(sd_keys) // 2:
        lines.append(
            "  this looks like a trained occreid/TransReID ReID checkpoint (keys start with backbone. or base.) "
            "- pass it as --weights, not as pretrained"
        )
    else:
        dim = getattr(model, "embed_dim", None)
        widths = {k: a for k, a, _ in report.mismatched if k == "cls_token"}
        if "cls_token" in widths and dim is not None:
            lines.append(
                f"  the checkpoint is {widths['cls_token'][-1]}-d but the backbone is {dim}-d: "
                "choose the backbone variant that matches the checkpoint"
            )
        elif report.missing or report.unexpected or report.mismatched:
            lines.append(
                "  check that the backbone variant (depth, width, patch size, qkv bias) matches "
                "the checkpoint, or pass strict=False to load the matching tensors only"
            )
    return OccReIDError("\n".join(lines))


def load_pretrained(
    backbone: nn.Module,
    path_or_state_dict: Source,
    *,
    strict: bool = True,
    src_grid: Optional[Tuple[int, int]] = None,
) -> LoadReport:
    """Load ImageNet ViT/DeiT weights into ``backbone`` (in place) and report what happened.

    Args:
        backbone: a :class:`~occreid.models.backbone.ViTBackbone`.
        path_or_state_dict: a checkpoint path (``.pth``/``.pt``/``.bin``/``.safetensors``;
            jx flat dict, DeiT ``{'model': ...}``, ``{'state_dict': ...}``, timm), an
            in-memory state dict, or ``"timm:<model name>"`` for timm's pretrained weights.
        strict: raise :class:`OccReIDError` on any missing (other than ``sie_embed``),
            unexpected (other than the ignored ImageNet heads) or mismatched key. With
            ``strict=False`` the matching tensors are loaded and the rest is logged.
        src_grid: (gy, gx) of the checkpoint's position grid when it is not square.

    Returns:
        a :class:`LoadReport`.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw, source = path_or_state_dict, "<state dict>"
    else:
        source = os.fspath(path_or_state_dict)
        if source.startswith("timm:"):
            raw = _load_timm(source[len("timm:"):])
        else:
            raw = load_checkpoint_file(source)
    sd = _unwrap(raw)
    if not sd:
        raise OccReIDError(f"checkpoint {source} contains no tensors")
    adapted, report = adapt_state_dict(sd, backbone, src_grid=src_grid, report=LoadReport(source=source))
    if not report.ok:
        if strict:
            raise _strict_error(report, backbone, list(sd))
        logger.warning("partial pretrained load: %s", report.summary())
    with torch.no_grad():
        backbone.load_state_dict(adapted, strict=False)  # adapt_state_dict checked every key
    logger.debug("pretrained load: %s", report.summary())
    return report


#: Key prefixes of the backbone inside trained ReID models (occreid: ``backbone.``; TransReID,
#: FED and DPM: ``base.``), with or without DDP's ``module.``.
_REID_PREFIXES = ("backbone.", "base.", "module.backbone.", "module.base.")


def backbone_state_from_reid_checkpoint(state_dict: Mapping, prefix: Optional[str] = None) -> StateDict:
    """Extract the backbone tensors from a trained TransReID/occreid ReID checkpoint.

    Keeps the ``prefix`` keys (default: ``backbone.`` of occreid models, else TransReID's
    ``base.``; ``module.`` stripped first) without the prefix and drops the unused
    ImageNet ``fc.*`` that TransReID keeps inside its backbone. ``sie_embed`` is kept.
    The result loads into a ViTBackbone of the same variant, img_size and stride with
    ``backbone.load_state_dict(...)`` (or :func:`load_pretrained`).
    """
    sd = _unwrap(state_dict)
    if prefix is None:  # occreid's backbone.* or the official base.*
        prefix = "backbone." if any(k.startswith("backbone.") for k in sd) else "base."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise OccReIDError(f"no keys start with {prefix!r}: this is not a trained TransReID/occreid checkpoint")
    return {k: v for k, v in out.items() if not k.startswith("fc.")}
