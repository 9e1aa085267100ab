"""FED as a method: NPO two-view samples, memory initialisation at train start, one pass with
the pids-dependent memory search, the memory's momentum update after each step."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ...utils import OccReIDError
from ..spec import MethodSpec, register_method
from .memory import IdentityMemory
from .model import FDM, FED, OEM, convert_official_state_dict, memory_search, part_pool

__all__ = ["FED", "FEDSpec", "FDM", "OEM", "IdentityMemory", "convert_official_state_dict", "memory_search", "part_pool"]

logger = logging.getLogger(__name__)


class FEDSpec(MethodSpec):
    name = "fed"
    model_class = FED
    npo = "required"

    def on_train_start(self, model: nn.Module, train_eval_loader: Callable[[], Iterable], device: torch.device) -> None:
        """The official memory initialisation pass (skipped when a resumed run has a bank):
        per-identity mean of :meth:`FED.memory_features` over the training images with the
        test transform (sharded under DDP; :meth:`FED.init_memory` all-reduces)."""
        if bool(model.memory.initialized):
            logger.info("FED memory already initialised (resumed checkpoint); skipping the init pass")
            return
        logger.info("FED: initialising the identity memory over the training images")
        model.init_memory_from_loader(train_eval_loader(), device)

    def forward_train(self, forward: Callable[..., Any], model: nn.Module, batch: Mapping[str, Any], pass_index: int) -> Any:
        # the memory search excludes each sample's own identity: the forward needs the pids
        return forward(batch["images"], cam_ids=batch.get("camids"), pids=batch["pids"])

    def after_step(self, model: nn.Module, outputs: Any, batch: Mapping[str, Any]) -> None:
        model.update_memory(outputs, batch["pids"])

    def eval_outputs(self, model: nn.Module) -> Dict[str, Dict[str, Any]]:
        return {
            "feat": {"l2_normalised": True},
            "part_scores": {"range": [0, 1], "meaning": "OEM visibility score per stripe, top to bottom"},
        }

    official_keys = ("base.", "mask_detection.", "cross_attention.", "bottleneck_local.", "classifier1.")
    num_classes_key = "classifier_oem.weight"

    def convert_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return convert_official_state_dict(state_dict)

    def official_companion_path(self, checkpoint: Path) -> Optional[Path]:
        """The memory file the official ``do_train`` saves beside ``NAME_EPOCH.pth``:
        ``NAMEmemory_EPOCH.pth`` (``torch.save(memory.features, ...)``, a ``[C, F]`` tensor)."""
        checkpoint = Path(checkpoint)
        name, sep, epoch = checkpoint.stem.rpartition("_")
        stem = f"{name}memory_{epoch}" if sep else f"{checkpoint.stem}memory"
        return checkpoint.with_name(stem + checkpoint.suffix)

    def complete_official_state(
        self, state: Dict[str, Tensor], model_state: Mapping[str, Tensor], companion: Optional[Any]
    ) -> Dict[str, Tensor]:
        """The memory bank(s) from the official memory file (one tensor shared by both official
        banks), or an uninitialised bank without one: the retrieval feature does not read the
        memory; the FDM feature and further training do."""
        state = dict(state)
        banks = [b for b in ("memory", "memory_fdm") if f"{b}.features" in model_state]
        shape = tuple(model_state["memory.features"].shape)
        if companion is None:
            logger.warning(
                "official FED checkpoint without its memory file (transformermemory_EPOCH.pth): the memory "
                "bank is uninitialised; the retrieval feature does not use it, the FDM feature does (and "
                "training initialises it from the data)"
            )
            for b in banks:
                state[f"{b}.features"] = torch.zeros(shape, dtype=model_state[f"{b}.features"].dtype)
                state[f"{b}.initialized"] = torch.tensor(False)
            return state
        features = companion.get("features") if isinstance(companion, Mapping) else companion
        if not isinstance(features, Tensor) or tuple(features.shape) != shape:
            found = tuple(features.shape) if isinstance(features, Tensor) else type(companion).__name__
            raise OccReIDError(
                f"the FED memory file holds {found}, but this model needs a [{shape[0]}, {shape[1]}] tensor "
                f"({shape[0]} training identities x {shape[1]} = parts x width); pass the "
                "transformermemory_EPOCH.pth saved with this checkpoint"
            )
        for b in banks:
            state[f"{b}.features"] = features.detach().to(model_state[f"{b}.features"].dtype)
            state[f"{b}.initialized"] = torch.tensor(True)
        return state


SPEC = register_method(FEDSpec())
