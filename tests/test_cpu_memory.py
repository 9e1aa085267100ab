"""The CPU allocator settings (occreid.utils.cpu_memory, occreid._env)."""

import os
import subprocess
import sys

from occreid.utils import cpu_memory


def _run(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k not in ("OCCREID_NO_MALLOC_TUNING", "THP_MEM_ALLOC_ENABLE")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout.strip()


def test_tuning_is_applied_once_and_reported():
    code = (
        "from occreid.utils.cpu_memory import tune_cpu_allocator, allocator_tuned\n"
        "a = allocator_tuned(); b = tune_cpu_allocator(); c = tune_cpu_allocator()\n"
        "print(a, b, c, allocator_tuned())"
    )
    out = _run(code)
    if sys.platform.startswith("linux"):
        assert out == "False True True True"
    else:
        assert out == "False False False False"


def test_tuning_can_be_switched_off():
    code = "from occreid.utils.cpu_memory import tune_cpu_allocator as t, allocator_tuned as a; print(t(), a())"
    assert _run(code, OCCREID_NO_MALLOC_TUNING="1") == "False False"


def test_env_sets_thp_before_torch_only():
    code = "import os, occreid._env; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    want = "1" if sys.platform.startswith("linux") else "None"
    assert _run(code) == want
    assert _run(code, THP_MEM_ALLOC_ENABLE="0") == "0"  # the user's value is kept
    assert _run(code, OCCREID_NO_MALLOC_TUNING="1") == "None"
    late = "import torch, os, occreid._env; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    assert _run(late) == "None"  # torch already loaded: too late to matter, left alone


def test_settings_are_within_mallopt_range():
    assert set(cpu_memory.MALLOC_SETTINGS) == {"M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD", "M_TOP_PAD"}
    assert all(v > 0 for v in cpu_memory.MALLOC_SETTINGS.values())
