"""CPU allocator settings for training on the CPU (glibc ``malloc``).

A ViT training step allocates and frees activations of tens of MiB many times per step.
With glibc's defaults every such block above the dynamic mmap threshold is a fresh ``mmap``
whose pages fault in one by one, and freed memory at the top of the heap is trimmed and
faulted in again at the next step. :func:`tune_cpu_allocator` keeps those blocks in the heap
(``M_MMAP_THRESHOLD`` 32 MiB, ``M_TRIM_THRESHOLD`` 2 GiB, ``M_TOP_PAD`` 256 MiB), which cuts
the page faults of a ViT-B step on the CPU from 129k to 6k (baseline), 241k to 14k (FED) and
1.23M to 18k (DPM) (docs/benchmarks.md). Peak memory does not grow: the settings keep memory
already used, they do not allocate more.

Only glibc Linux is touched; elsewhere (macOS, Windows, musl) it is a no-op. Set
``OCCREID_NO_MALLOC_TUNING=1`` to keep the defaults. torch's own
``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for large CPU tensors) is set by
:mod:`occreid._env` before torch is imported, when occreid's command line starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Dict

from .._env import allocator_tuning_off

__all__ = ["tune_cpu_allocator", "allocator_tuned", "MALLOC_SETTINGS"]

#: glibc mallopt parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS: Dict[str, int] = {
    "M_MMAP_THRESHOLD": 32 << 20,
    "M_TRIM_THRESHOLD": 2**31 - 1,
    "M_TOP_PAD": 256 << 20,
}
_CODES = {"M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD, "M_TOP_PAD": M_TOP_PAD}
_state = {"tuned": False}


def allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` has changed the allocator in this process."""
    return _state["tuned"]


def tune_cpu_allocator() -> bool:
    """Apply :data:`MALLOC_SETTINGS` with glibc ``mallopt``, once per process.

    Returns whether the settings are in force (``False`` off glibc Linux or with
    ``OCCREID_NO_MALLOC_TUNING=1``). Safe to call repeatedly.
    """
    if _state["tuned"]:
        return True
    if allocator_tuning_off() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt parameters like these)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt takes a C int: M_TRIM_THRESHOLD is the largest one, 2 GiB - 1.
    ok = all(mallopt(_CODES[k], v) == 1 for k, v in MALLOC_SETTINGS.items())
    _state["tuned"] = ok
    return ok
