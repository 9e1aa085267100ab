"""YAML configs shipped with occreid (also reachable as ``configs/`` in the repository).

``occreid train --config occluded_duke/vit_base.yaml`` finds a shipped config by name when no
file of that name exists in the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from ..utils.io import OccReIDError

CONFIG_DIR = Path(__file__).resolve().parent


def list_configs() -> List[str]:
    return sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))


def config_path(name: str) -> Path:
    """A file path as given, or the shipped config of that name (``.yaml`` optional)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (name, f"{name}.yaml"):
        q = CONFIG_DIR / cand
        if q.is_file():
            return q
    stripped = name[len("configs/"):] if name.startswith("configs/") else None
    if stripped:
        return config_path(stripped)
    raise OccReIDError(f"config {name!r} not found (not a file, nor a shipped config: {', '.join(list_configs())})")
