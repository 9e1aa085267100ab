"""Models: the TransReID-style ViT backbone, pretrained loading, heads and methods.

Model contract (the baseline now; FED and DPM follow it):

* ``build_model(name, num_classes=..., ...)`` builds the method from plain arguments;
  methods register themselves in ``MODELS`` with ``@MODELS.register("name")`` and take
  ``(backbone, num_classes, *, method options)``.
* ``model.train(); out = model(images, cam_ids)`` returns whatever ``model.loss`` needs
  (for the baseline ``{"logits": [B, C], "global_feat": [B, D]}``).
* ``model.loss(out, pids) -> dict[str, Tensor]`` returns the already weighted loss terms;
  the trainer sums the values (and logs each).
* ``model.eval(); feat = model(images, cam_ids)`` returns the retrieval feature ``[B, D]``.
  A method with extra retrieval outputs (e.g. DPM's mask) returns a dict with key
  ``"feat"`` plus the extras.
* ``model.feature_dim`` is the width of the retrieval feature.
* ``cam_ids`` (``[B]``, 0-based) may always be passed; the backbone uses them only with SIE.
"""

from .backbone import BACKBONES, OverlapPatchEmbed, ViTBackbone, ViTSpec, build_backbone
from .baseline import Baseline
from .heads import BNNeck, Classifier
from .pretrained import LoadReport, backbone_state_from_reid_checkpoint, load_pretrained, resize_pos_embed
from .registry import MODELS, available_models, build_model

__all__ = [
    "BACKBONES",
    "MODELS",
    "BNNeck",
    "Baseline",
    "Classifier",
    "LoadReport",
    "OverlapPatchEmbed",
    "ViTBackbone",
    "ViTSpec",
    "available_models",
    "backbone_state_from_reid_checkpoint",
    "build_backbone",
    "build_model",
    "load_pretrained",
    "resize_pos_embed",
]
