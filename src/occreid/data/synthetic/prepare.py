"""Finding (and on first use generating) the SynthOcc dataset a config asks for.

A generated dataset records its preset and seed in ``synthocc.json``. :func:`ensure_synthocc`
refuses a folder holding another preset or seed (it never trains or evaluates on data the
config did not ask for) and says how to proceed; it generates data only into an absent or
empty folder, and only when generation is allowed: training commands allow it, evaluating
commands (``occreid test`` / ``visualize``) only with ``--generate-data``
(:func:`synthocc_generation`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from ...utils.io import OccReIDError
from .generate import SYNTHOCC_VERSION, _existing, _resolve_preset, generate_synthocc

__all__ = ["ensure_synthocc", "synthocc_folder", "synthocc_generation"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_ALLOW_GENERATE: contextvars.ContextVar[bool] = contextvars.ContextVar("occreid_synthocc_generate", default=True)


@contextlib.contextmanager
def synthocc_generation(allowed: bool) -> Iterator[None]:
    """Within the block, :func:`ensure_synthocc` (called with ``allow_generate=None``, as the
    dataset builders do) may generate a missing dataset only if ``allowed``."""
    token = _ALLOW_GENERATE.set(bool(allowed))
    try:
        yield
    finally:
        _ALLOW_GENERATE.reset(token)


def synthocc_folder(root: PathLike) -> Path:
    """The dataset folder for ``data.root``: ``root`` itself when it is a SynthOcc (or
    Occluded-Duke style) folder, else ``root/SynthOcc``."""
    r = Path(root)
    if (r / "bounding_box_train").is_dir() or (r / "synthocc.json").is_file():
        return r
    return r / "SynthOcc"


def _shell_path(p: Path) -> str:
    s = str(p)
    return f'"{s}"' if any(c.isspace() for c in s) else s


def ensure_synthocc(
    root: PathLike,
    preset: str = "demo",
    seed: int = 0,
    *,
    allow_generate: Optional[bool] = None,
) -> Path:
    """The SynthOcc folder under ``root`` holding ``preset`` and ``seed``, generated first if it
    is absent or empty and ``allow_generate`` (None: the :func:`synthocc_generation` setting,
    true unless an evaluating command turned it off).

    Raises :class:`OccReIDError` when the folder holds another preset, seed or SynthOcc
    version, an incomplete dataset or other files, and when it is missing while generation is
    not allowed.
    """
    p = _resolve_preset(preset)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise OccReIDError(f"data.synth_seed must be a non-negative integer, got {seed!r}")
    target = synthocc_folder(root)
    regen = f"occreid synth --out {_shell_path(target)} --preset {p.name} --seed {seed}"
    info_path = target / "synthocc.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OccReIDError(f"{info_path} is unreadable ({exc}); regenerate the dataset with `{regen} --overwrite`") from None
        found = (info.get("preset"), info.get("seed"))
        if found != (p.name, seed):
            raise OccReIDError(
                f"{target} holds SynthOcc preset {found[0]!r} seed {found[1]}, but the config asks for preset "
                f"{p.name!r} seed {seed} (data.synth_preset, data.synth_seed). Use that data with "
                f"data.synth_preset={found[0]} data.synth_seed={found[1]}, pass --data-root with another folder "
                f"(the asked preset is generated there), or replace it with `{regen} --overwrite`"
            )
        if info.get("version") != SYNTHOCC_VERSION:
            raise OccReIDError(
                f"{target} holds SynthOcc version {info.get('version')}, this occreid makes version "
                f"{SYNTHOCC_VERSION}; regenerate it with `{regen} --overwrite` or pass another --data-root"
            )
        state, what = _existing(target, p, seed)
        if state != "same":
            raise OccReIDError(f"{target} holds {what}; regenerate it with `{regen} --overwrite`")
        return target
    state, what = _existing(target, p, seed)
    if state == "other":
        raise OccReIDError(
            f"{target} holds {what}; expected a SynthOcc dataset (data.name=synthocc). Pass --data-root "
            f"with the folder that holds SynthOcc, or generate it elsewhere with `occreid synth --out DIR`"
        )
    allowed = _ALLOW_GENERATE.get() if allow_generate is None else bool(allow_generate)
    if not allowed:
        why = "does not exist" if state == "absent" else "is empty"
        raise OccReIDError(
            f"no SynthOcc dataset in {target} (the folder {why}): check --data-root, or pass --generate-data "
            f"to generate SynthOcc preset {p.name!r} seed {seed} there (the same as `{regen}`)"
        )
    logger.info("generating SynthOcc (%s preset, seed %d) in %s", p.name, seed, target)
    return generate_synthocc(target, preset=p, seed=seed)
