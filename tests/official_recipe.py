"""The golden trajectory cases (tests/data/trajectory and its README.md):
where they are, their manifest, and the recipe that rebuilds the official initial weights."""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Dict, List

import torch

#: The case folder: ``$OCCREID_TRAJECTORY_DIR`` when set, else tests/data/trajectory.
TRAJECTORY_DIR = Path(os.environ.get("OCCREID_TRAJECTORY_DIR") or Path(__file__).parent / "data" / "trajectory")

#: The official configuration file of a case -> the shipped occreid config of the same recipe.
OFFICIAL_CONFIGS = {
    ("transreid", "configs/OCC_Duke/vit_base.yml"): "occluded_duke/vit_base.yaml",
    ("fed", "configs/OCC_Duke/vit_base.yml"): "occluded_duke/fed.yaml",
    ("dpm", "configs/OCC_Duke/dpm.yml"): "occluded_duke/dpm.yaml",
}
#: The official ``TRANSFORMER_TYPE`` -> occreid backbone.
OFFICIAL_BACKBONES = {"vit_base_patch16_224_TransReID": "vit_base_patch16"}


def case_files() -> List[Path]:
    return sorted(TRAJECTORY_DIR.glob("trajectory_*.pt"))


def load_case(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def manifest(case: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest stored in the case (UTF-8 JSON bytes in a uint8 tensor)."""
    return json.loads(bytes(case["meta.manifest"].tolist()).decode("utf-8"))


def key_seed(key: str, seed: int) -> int:
    return (zlib.crc32(key.encode("utf-8")) + 1000003 * int(seed)) % 2**63


def sample_indices(key: str, numel: int) -> torch.Tensor:
    """The 16 flat indices of the digests' samples of parameter ``key``."""
    g = torch.Generator().manual_seed((zlib.crc32(key.encode("utf-8")) + 17) % 2**63)
    return torch.randint(numel, (16,), generator=g)


def recipe_state_dict(man: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The official-format initial state dict of a case, drawn as the README's recipe says."""
    seed = int(man["seed"])
    out: Dict[str, torch.Tensor] = {}
    for key, shape, dtype_name in man["state_dict"]:
        dtype = getattr(torch, dtype_name)
        last = key.rsplit(".", 1)[-1]
        if last == "num_batches_tracked" or last == "running_mean":
            out[key] = torch.zeros(shape, dtype=dtype)
            continue
        if last == "running_var":
            out[key] = torch.ones(shape, dtype=dtype)
            continue
        z = torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(key, seed)), dtype=torch.float32)
        if len(shape) <= 1:
            value = 1 + 0.02 * z if last == "weight" else 0.02 * z
        elif key.endswith(("cls_token", "pos_embed")):
            value = 0.02 * z
        else:
            value = min(0.02, math.prod(shape[1:]) ** -0.5) * z
        out[key] = value.to(dtype)
    return out


def occreid_config(man: Dict[str, Any], extra: List[str] = ()) -> Dict[str, Any]:
    """The shipped occreid config of the case's official recipe, at the case's input size, with
    drop path 0 and no pretrained weights (the recipe replaces them)."""
    from occreid.config import load_config

    key = (man["method"], man["config"])
    if key not in OFFICIAL_CONFIGS:
        raise AssertionError(f"no occreid config is known for the official {key[0]} config {key[1]}; add it to OFFICIAL_CONFIGS")
    h, w = man["img_size"]
    return load_config(
        OFFICIAL_CONFIGS[key],
        [
            f"data.size_train=[{h}, {w}]",
            f"data.size_test=[{h}, {w}]",
            "model.drop_path=0.0",
            "model.pretrained=null",
            "device=cpu",
            "solver.amp=fp32",
            *extra,
        ],
    )
