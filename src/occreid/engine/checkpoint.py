"""Checkpoints: model, optimiser, scheduler, scaler, epoch, RNG states and config, written atomically.

File format (a dict readable with ``torch.load(..., weights_only=True)``)::

    {"format": "occreid-checkpoint", "version": 1, "occreid_version": str,
     "epoch": int, "config": dict, "model_meta": dict, "model": state_dict,
     "optimizer": [state_dict, ...] | None, "scheduler": [state_dict, ...] | None,
     "scaler": state_dict | None, "rng": {...} | None, "metrics": dict | None}
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..utils.io import OccReIDError, atomic_save, safe_torch_load

logger = logging.getLogger(__name__)

FORMAT = "occreid-checkpoint"
VERSION = 1
_EXPECTED = "OUTPUT/model_final.pth, or OUTPUT/last.pth to resume"


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_list(x):
    if x is None:
        return None
    return list(x) if isinstance(x, (list, tuple)) else [x]


def save_checkpoint(
    path: Union[str, Path],
    model: nn.Module,
    *,
    epoch: int,
    config: Dict[str, Any],
    model_meta: Dict[str, Any],
    optimizers: Optional[Sequence] = None,
    schedulers: Optional[Sequence] = None,
    scaler: Optional[Any] = None,
    metrics: Optional[Dict[str, Any]] = None,
    include_rng: bool = True,
) -> Path:
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "occreid_version": __version__,
        "epoch": int(epoch),
        "config": config,
        "model_meta": model_meta,
        "model": unwrap(model).state_dict(),
        "optimizer": [o.state_dict() for o in _as_list(optimizers)] if optimizers else None,
        "scheduler": [s.state_dict() for s in _as_list(schedulers)] if schedulers else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_state() if include_rng else None,
        "metrics": metrics,
    }
    return atomic_save(obj, path)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load and validate an occreid checkpoint (always ``weights_only``)."""
    p = Path(path)
    if not p.is_file():
        raise OccReIDError(f"checkpoint not found: {p}")
    obj = safe_torch_load(p, "checkpoint", f"a file written by occreid train ({_EXPECTED})", map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = ""
        if isinstance(obj, dict) and any(str(k).startswith(("base.", "module.base.")) for k in obj):
            hint = (
                " It looks like an official TransReID/FED/DPM checkpoint: evaluate or export it with --weights "
                "together with --config (the config of its architecture, e.g. occluded_duke/dpm.yaml), or in "
                "Python with FeatureExtractor(path, config=...); it cannot resume an occreid run."
            )
        elif isinstance(obj, dict) and (
            "pos_embed" in obj or (isinstance(obj.get("model"), dict) and "pos_embed" in obj["model"])
        ):
            hint = " It looks like ImageNet backbone weights: pass them as model.pretrained=PATH for training."
        if not hint and isinstance(obj, dict) and obj.get("format") == "occreid-index":
            hint = " It is a gallery index (written by `occreid index`): pass it as --index."
        raise OccReIDError(f"{p} is not an occreid checkpoint.{hint} Expected {_EXPECTED}.")
    return obj


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load that reports exactly which keys differ."""
    model = unwrap(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        if mismatched:
            parts.append(
                "shape mismatch: "
                + ", ".join(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:10])
            )
        raise OccReIDError(f"{source} does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


def restore_training_state(
    ckpt: Dict[str, Any],
    model: nn.Module,
    optimizers: Sequence,
    schedulers: Sequence,
    scaler: Optional[Any] = None,
) -> int:
    """Restore everything for ``--resume``; returns the epoch the checkpoint finished."""
    load_model_state(model, ckpt["model"], "resume checkpoint")
    opt_states: List = ckpt.get("optimizer") or []
    if len(opt_states) != len(optimizers):
        raise OccReIDError("resume checkpoint has a different number of optimisers than this run")
    for o, s in zip(optimizers, opt_states):
        o.load_state_dict(s)
    for sch, s in zip(schedulers, ckpt.get("scheduler") or []):
        sch.load_state_dict(s)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"])
