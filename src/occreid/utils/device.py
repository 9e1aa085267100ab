"""Device and mixed-precision choices shared by training, evaluation and inference."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .io import OccReIDError

__all__ = ["resolve_device", "resolve_amp", "autocast_context"]


def resolve_device(spec: Optional[str] = "auto") -> torch.device:
    """``"auto"`` (CUDA device ``LOCAL_RANK`` when available, else the CPU), or a torch device
    name; a CUDA device without CUDA is an error."""
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise OccReIDError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OccReIDError(f"device {spec!r} requested but CUDA is not available; use device=cpu")
    return dev


def resolve_amp(spec: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``spec`` (``fp32`` | ``bf16`` | ``fp16`` | ``auto``); None = fp32."""
    if spec == "fp32":
        return None
    if spec == "bf16":
        return torch.bfloat16
    if spec == "fp16":
        return torch.float16
    # auto: bf16 on GPUs that support it, fp32 elsewhere (CPU bf16 autocast is slow on many CPUs)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, amp: Optional[torch.dtype]):
    """``torch.autocast`` for ``amp`` on ``device``, or a no-op for fp32."""
    if amp is None or amp == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)
