"""Process environment set before torch is imported (imported first by occreid's command line).

``THP_MEM_ALLOC_ENABLE=1`` makes torch's CPU allocator back large tensors with transparent
huge pages (fewer page faults in a CPU training step, see :mod:`occreid.utils.cpu_memory`).
It is read once when torch loads, so it only takes effect here if torch has not been imported
yet; a value the user has set is left as it is. Linux only; ``OCCREID_NO_MALLOC_TUNING=1``
keeps torch's default.
"""

from __future__ import annotations

import os
import sys


def allocator_tuning_off() -> bool:
    """``OCCREID_NO_MALLOC_TUNING`` set (to anything but ``0``): keep the allocator defaults."""
    return os.environ.get("OCCREID_NO_MALLOC_TUNING", "") not in ("", "0")


if sys.platform.startswith("linux") and "torch" not in sys.modules and not allocator_tuning_off():
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
