"""DPM as a method: two optimisers (main, HMG), the official two-pass update, the query-mask
retrieval distance."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...utils import OccReIDError
from ..spec import MethodSpec, ParamSet, register_method
from .retrieval import MaskedCosineDistance
from .model import (
    DPM,
    HeadEnrichModule,
    HierarchicalMaskGenerator,
    MaskedPrototypeClassifier,
    convert_official_state_dict,
)

__all__ = [
    "DPM",
    "DPMSpec",
    "HeadEnrichModule",
    "HierarchicalMaskGenerator",
    "MaskedPrototypeClassifier",
    "convert_official_state_dict",
]


class DPMSpec(MethodSpec):
    name = "dpm"
    model_class = DPM
    #: The passes leave parameters without gradient by design: pass 0 the HMG weights (whose
    #: gradient the official update discards), pass 1 with ``second_pass="hmg_only"`` the
    #: backbone (run without autograd).
    ddp_find_unused_parameters = True

    def param_sets(self, model: nn.Module, solver: Mapping[str, Any]) -> List[ParamSet]:
        """The main optimiser (everything but the HMG, warm-up cosine) and, with the masked
        branch, the HMG optimiser (official ``Moptimizer``): ``weight_decay_bias`` on all its
        groups and, by default, a constant learning rate (``hmg_lr_schedule="cosine"``: the
        main schedule)."""
        hmg_ids = {id(p) for p in model.hmg_parameters()}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sets = [ParamSet("main", [(n, p) for n, p in named if id(p) not in hmg_ids])]
        if hmg_ids:
            wdb = solver["weight_decay_bias"]
            schedule = "cosine" if model.hmg_lr_schedule == "cosine" else "constant"
            sets.append(ParamSet("hmg", [(n, p) for n, p in named if id(p) in hmg_ids], wdb, wdb, schedule))
        return sets

    def passes(self, model: nn.Module) -> Sequence[Tuple[int, ...]]:
        """Official two-pass update (dpm-official.md §6): step the main optimiser on the full
        loss, then a second forward/backward with the updated weights steps the HMG
        optimiser. ``update_mode="single_pass"``: both optimisers on one backward."""
        if model.hmg is None:
            return ((0,),)
        return ((0,), (1,)) if model.update_mode == "two_pass" else ((0, 1),)

    def forward_train(self, forward: Callable[..., Any], model: nn.Module, batch: Mapping[str, Any], pass_index: int) -> Any:
        """The pass's training forward; with ``second_pass="hmg_only"`` (default) pass 0 computes
        no HMG weight gradient and pass 1 runs the backbone without autograd
        (:meth:`DPM.train_grads`): the same update as the official full passes."""
        grads = model.train_grads(pass_index)
        if grads == "all":
            return forward(batch["images"], cam_ids=batch.get("camids"))
        return forward(batch["images"], cam_ids=batch.get("camids"), grads=grads)

    def step_stats(self, model: nn.Module, outputs: Any, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """``acc`` of the plain logits, as a 0-d tensor (the step converts all figures with one
        host transfer)."""
        with torch.no_grad():
            return {"acc": (outputs["logits"].argmax(1) == batch["pids"]).float().mean()}

    def eval_outputs(self, model: nn.Module) -> Dict[str, Dict[str, Any]]:
        return {"feat": {"l2_normalised": True}, "mask": {"range": [0, 1], "meaning": "HMG channel mask of the query"}}

    def check_deployable(self, model: nn.Module) -> None:
        if model.hmg is None:
            raise OccReIDError(
                "this DPM checkpoint is an ablation without the masked branch (masked_branch=false): "
                "it has no mask output to export; it is the ViT baseline, train model.name=baseline to deploy it"
            )

    def retrieval(self, model: nn.Module) -> Dict[str, Any]:
        """DPM's query-mask distance (dpm-official.md §7), or cosine without the masked branch."""
        if model.hmg is None:
            return {"distance": "cosine"}
        return {"distance": "dpm_masked_cosine", "mask_norm": str(model.mask_norm), "mask_query": bool(model.mask_feature)}

    def retrieval_distance(self, model: nn.Module, query: Mapping[str, Tensor], gallery: Mapping[str, Tensor]):
        """Each query's mask applied to every gallery feature; gallery masks unused."""
        if "mask" not in query:
            return None
        return MaskedCosineDistance(
            query["feat"], query["mask"], gallery["feat"], mask_norm=model.mask_norm, mask_query=model.mask_feature
        )

    official_keys = ("base.", "base.ConvLayer.", "base.attfc.", "classifier.", "bottleneck.")

    def convert_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return convert_official_state_dict(state_dict)


SPEC = register_method(DPMSpec())
