"""Official TransReID, FED and DPM checkpoints as input: detect, convert, load.

An official checkpoint is the plain ``state_dict`` the official code saves
(``torch.save(model.state_dict(), "transformer_120.pth")``): official module names, a
``module.`` prefix when the model ran under ``nn.DataParallel`` (FED always does), and no
occreid metadata. Released files and files saved by the official ``do_train`` look the same.

* :func:`detect_official_method` tells which method a state dict belongs to, from the key
  prefixes each method's spec declares (:attr:`~occreid.methods.MethodSpec.official_keys`).
* :func:`load_official_state_dict` loads one into a built occreid model through the method's
  converter (:meth:`~occreid.methods.MethodSpec.convert_official_state_dict`), strictly, naming
  every missing, unexpected or mis-shaped entry.
* :func:`load_official_checkpoint` turns an official file plus the config that describes its
  architecture (method, backbone, stride, SIE, input size) into the checkpoint-like dict the
  rest of occreid reads (``config``, ``model_meta``, ``model``), so ``occreid test / index /
  export`` and :class:`occreid.FeatureExtractor` take official files directly. The number of
  identities and cameras comes from the weights.

FED's memory bank is not in its checkpoint: the official code saves ``memory.features`` beside
it as ``transformermemory_EPOCH.pth`` (a ``[C, 4*768]`` tensor). It is picked up from there,
or from ``memory=PATH``; without it the bank stays uninitialised, which the retrieval feature
does not mind (only the FDM feature and further training read the memory).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..config import load_config
from ..configs import list_configs
from ..methods import available_methods, get_method
from ..utils.io import OccReIDError, safe_torch_load
from .build import build_model, method_spec, model_meta

logger = logging.getLogger(__name__)

__all__ = [
    "OfficialLoad",
    "strip_module_prefix",
    "official_state_dict_of",
    "detect_official_method",
    "read_official_memory",
    "shipped_configs",
    "convert_official",
    "load_official_state_dict",
    "official_checkpoint",
    "load_official_checkpoint",
]

_PREFIX = "module."
#: Containers some tools wrap a state dict in (the official ``load_param`` unwraps the same).
_CONTAINERS = ("state_dict", "model")
_SHOWN = 12


@dataclasses.dataclass
class OfficialLoad:
    """What :func:`load_official_state_dict` loaded."""

    method: str
    #: number of entries of the official state dict and of the occreid state dict loaded from
    #: it (the conversion drops the official code's unused heads, e.g. ``base.fc``, and FED's
    #: four per-part BNNecks become one)
    official_entries: int
    loaded_entries: int
    #: whether FED's memory bank was loaded from its companion file
    companion: bool


def strip_module_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The state dict without the ``module.`` prefix of ``nn.DataParallel`` / DDP."""
    return {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in state_dict.items()}


def official_state_dict_of(obj: Any) -> Optional[Dict[str, Tensor]]:
    """``obj`` (a loaded file) as an official state dict, or ``None`` when it is not one: a dict
    of tensors (possibly under ``"state_dict"`` / ``"model"``) with ``base.*`` backbone keys."""
    if isinstance(obj, Mapping):
        for key in _CONTAINERS:
            inner = obj.get(key)
            if len(obj) == 1 and isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        return None
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return None
    sd = strip_module_prefix(obj)
    return sd if any(k.startswith("base.") for k in sd) else None


def _has_prefix(keys: Sequence[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_official_method(state_dict: Mapping[str, Any]) -> str:
    """The registered method whose official checkpoints look like ``state_dict``.

    Every prefix of a method's :attr:`~occreid.methods.MethodSpec.official_keys` must occur;
    of several such methods the most specific (most prefixes) wins: DPM's ``base.ConvLayer``
    over the baseline's ``base.`` + ``classifier.`` + ``bottleneck.``.
    """
    keys = list(strip_module_prefix(state_dict))
    matches = []
    for name in available_methods():
        spec = get_method(name)
        if spec.official_keys and all(_has_prefix(keys, p) for p in spec.official_keys):
            matches.append((len(spec.official_keys), spec.name))
    matches = sorted(set(matches), reverse=True)
    if not matches:
        known = ", ".join(
            f"{n} ({' + '.join(get_method(n).official_keys)})" for n in available_methods() if get_method(n).official_keys
        )
        shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
        raise OccReIDError(
            f"not an official checkpoint of a known method: its keys ({shown}) match none of {known}"
        )
    if len(matches) > 1 and matches[0][0] == matches[1][0]:
        raise OccReIDError(
            f"cannot tell the method of this official checkpoint: it matches {matches[0][1]} and {matches[1][1]}"
        )
    return matches[0][1]


def shipped_configs(method: str) -> list:
    """The shipped configs (``occluded_duke/dpm.yaml``, ...) of ``method``, for error hints."""
    out = []
    for name in list_configs():
        try:
            if get_method(load_config(name)["model"]["name"]).name == method:
                out.append(name)
        except Exception:  # a config that does not load is no suggestion
            continue
    return out


def read_official_memory(path: Union[str, os.PathLike]) -> Any:
    """The content of a companion file (FED: ``transformermemory_EPOCH.pth``)."""
    p = Path(path)
    if not p.is_file():
        raise OccReIDError(f"memory file not found: {p} (FED's official memory is transformermemory_EPOCH.pth)")
    return safe_torch_load(p, "memory file", "the transformermemory_EPOCH.pth saved by the official FED code")


def _describe(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def convert_official(
    state_dict: Mapping[str, Tensor],
    method: str,
    model_state: Mapping[str, Tensor],
    *,
    companion: Optional[Any] = None,
    source: str = "official checkpoint",
) -> Dict[str, Tensor]:
    """``state_dict`` (official names) in the names of ``model_state`` (the occreid model's own
    ``state_dict()``, real or on the meta device), completed with the companion's content, and
    checked entry by entry: any missing, unexpected or mis-shaped entry is an
    :class:`OccReIDError` that names them."""
    spec = get_method(method)
    sd = strip_module_prefix(state_dict)
    try:
        converted = spec.convert_official_state_dict(sd)
    except (KeyError, ValueError) as exc:
        raise OccReIDError(f"{source} is not a valid official {spec.name} checkpoint: {exc}") from None
    converted = spec.complete_official_state(converted, model_state, companion)
    missing = sorted(set(model_state) - set(converted))
    unexpected = sorted(set(converted) - set(model_state))
    mismatched = sorted(
        k for k in set(model_state) & set(converted) if tuple(model_state[k].shape) != tuple(converted[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"the model's entries {_describe(missing)} are not in it")
        if unexpected:
            parts.append(f"its entries {_describe(unexpected)} have no place in the model")
        if mismatched:
            parts.append(
                "shapes differ: "
                + ", ".join(f"{k} {tuple(converted[k].shape)} vs model {tuple(model_state[k].shape)}" for k in mismatched[:_SHOWN])
            )
        hint = (
            " The config must describe the checkpoint's architecture: model.backbone, model.stride, "
            "model.sie_camera and data.size_test of the official run (e.g. stride 11 and SIE for DPM on Occluded-Duke)."
        )
        raise OccReIDError(f"{source} ({spec.name}) does not fit the model: {'; '.join(parts)}.{hint}")
    return converted


def load_official_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    method: Optional[str] = None,
    *,
    memory: Optional[Any] = None,
) -> OfficialLoad:
    """Load an official TransReID / FED / DPM ``state_dict`` into an occreid ``model``.

    Args:
        model: the occreid model of that method, built for the checkpoint's architecture.
        state_dict: the official state dict (``module.`` prefix allowed).
        method: the method it belongs to; detected when ``None``.
        memory: FED only: the official memory file's content (a ``[C, F]`` tensor) or its path.

    Raises :class:`OccReIDError` when the checkpoint belongs to another method than ``model``
    or does not fit it (every differing entry named).
    """
    method = get_method(method).name if method else detect_official_method(state_dict)
    spec = get_method(method)
    if not isinstance(model, spec.model_class):
        raise OccReIDError(
            f"this is an official {method} checkpoint, but the model is a {type(model).__name__}; "
            f"build a {spec.model_class.__name__} (model.name={method})"
        )
    if isinstance(memory, (str, os.PathLike)):
        memory = read_official_memory(memory)
    own = model.state_dict()
    converted = convert_official(state_dict, method, own, companion=memory)
    model.load_state_dict(converted, strict=True)
    logger.info("loaded an official %s checkpoint (%d entries as %d)", method, len(state_dict), len(converted))
    return OfficialLoad(method, len(state_dict), len(converted), memory is not None)


def official_checkpoint(
    state_dict: Mapping[str, Tensor],
    cfg: Mapping[str, Any],
    *,
    memory: Optional[Any] = None,
    source: str = "official checkpoint",
) -> Dict[str, Any]:
    """A checkpoint-like dict (``config``, ``model_meta``, ``model``, ``epoch`` None,
    ``official``) for an official state dict and the config of its architecture."""
    method = detect_official_method(state_dict)
    spec = get_method(method)
    want = method_spec(dict(cfg)).name
    if want != method:
        shipped = shipped_configs(method)
        raise OccReIDError(
            f"{source} is an official {method} checkpoint but the config builds model.name={want}; pass a config "
            f"with model.name={method}" + (f" (shipped: {', '.join(shipped[:6])})" if shipped else "")
        )
    sd = strip_module_prefix(state_dict)
    converted = spec.convert_official_state_dict(sd)
    if spec.num_classes_key not in converted:
        raise OccReIDError(f"{source} has no {spec.num_classes_key} (official classifier): cannot tell the number of identities")
    num_classes = int(converted[spec.num_classes_key].shape[0])
    sie = converted.get("backbone.sie_embed")
    num_cameras = int(sie.shape[0]) if sie is not None else 0
    if sie is not None and not cfg["model"]["sie_camera"]:
        raise OccReIDError(
            f"{source} has SIE camera embeddings for {num_cameras} cameras (base.sie_embed) but the config "
            "has model.sie_camera=false; set model.sie_camera=true"
        )
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        model = build_model(dict(cfg), num_classes, num_cameras, with_pretrained=False)
    if isinstance(memory, (str, os.PathLike)):
        memory = read_official_memory(memory)
    state = convert_official(sd, method, model.state_dict(), companion=memory, source=source)
    return {
        "config": dict(cfg),
        "model_meta": model_meta(dict(cfg), num_classes, num_cameras, int(getattr(model, "feature_dim", 0))),
        "model": state,
        "epoch": None,
        "official": {"method": method, "source": source, "memory": memory is not None},
    }


def load_official_checkpoint(
    path: Union[str, os.PathLike],
    config: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    memory: Optional[Union[str, os.PathLike]] = None,
    overrides: Sequence[str] = (),
    obj: Any = None,
) -> Dict[str, Any]:
    """Read an official checkpoint file as a checkpoint-like dict (see :func:`official_checkpoint`).

    Args:
        path: the official ``.pth`` file.
        config: the config describing its architecture (a YAML path, a shipped config name such as
            ``occluded_duke/dpm.yaml``, or a loaded config dict).
        memory: FED's memory file; default: the companion beside ``path``
            (``transformermemory_EPOCH.pth`` for ``transformer_EPOCH.pth``) when it exists.
        overrides: ``key=value`` config overrides (with a config path or name).
        obj: the file's content when the caller has already loaded it.
    """
    p = Path(path)
    if obj is None:
        if not p.is_file():
            raise OccReIDError(f"checkpoint not found: {p}")
        obj = safe_torch_load(p, "checkpoint", "an official TransReID/FED/DPM checkpoint")
    sd = official_state_dict_of(obj)
    if sd is None:
        raise OccReIDError(f"{p} is not an official TransReID/FED/DPM checkpoint (a state dict with base.* keys)")
    cfg = dict(config) if isinstance(config, Mapping) else load_config(config, overrides)
    method = detect_official_method(sd)
    companion = None
    if memory is not None:
        companion = read_official_memory(memory)
    else:
        beside = get_method(method).official_companion_path(p)
        if beside is not None and Path(beside).is_file():
            logger.info("loading the official %s memory from %s", method, beside)
            companion = read_official_memory(beside)
    ckpt = official_checkpoint(sd, cfg, memory=companion, source=str(p))
    ckpt["official"]["path"] = str(p)
    return ckpt
