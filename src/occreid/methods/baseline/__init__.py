"""The TransReID ViT baseline as a method: one SGD optimiser, one pass, ID + triplet."""

from __future__ import annotations

from typing import Dict, Mapping

from torch import Tensor

from ..spec import MethodSpec, register_method
from .model import Baseline

__all__ = ["Baseline", "BaselineSpec", "convert_official_state_dict"]

#: Official TransReID entries with no counterpart here (the unused ImageNet head).
_OFFICIAL_UNUSED = ("base.fc.",)


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """An official TransReID ``build_transformer`` state dict (``module.`` prefix allowed) in
    :class:`Baseline` names: ``base.*`` -> ``backbone.*``; ``bottleneck.*`` and
    ``classifier.*`` keep their names; the unused ``base.fc.*`` head is dropped."""
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(_OFFICIAL_UNUSED):
            continue
        out["backbone." + k[len("base."):] if k.startswith("base.") else k] = value
    return out


class BaselineSpec(MethodSpec):
    """ViT + BNNeck + classifier (TransReID without JPM); NPO two-view samples optional
    (FED's Table 3, row 2)."""

    name = "baseline"
    aliases = ("transreid_baseline", "vit_baseline")
    model_class = Baseline
    npo = "optional"

    official_keys = ("base.", "classifier.", "bottleneck.")

    def convert_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return convert_official_state_dict(state_dict)


SPEC = register_method(BaselineSpec())
