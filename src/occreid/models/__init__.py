"""Models shared by the methods: the TransReID-style ViT backbone, pretrained loading, heads.

The methods themselves (baseline, FED, DPM: their heads, losses, steps) live in
:mod:`occreid.methods`; ``occreid.methods.build_model`` builds one on a backbone from here.
"""

from .backbone import BACKBONES, OverlapPatchEmbed, ViTBackbone, ViTSpec, build_backbone
from .heads import BNNeck, Classifier
from .pretrained import LoadReport, backbone_state_from_reid_checkpoint, load_pretrained, resize_pos_embed

__all__ = [
    "BACKBONES",
    "BNNeck",
    "Classifier",
    "LoadReport",
    "OverlapPatchEmbed",
    "ViTBackbone",
    "ViTSpec",
    "backbone_state_from_reid_checkpoint",
    "build_backbone",
    "load_pretrained",
    "resize_pos_embed",
]
