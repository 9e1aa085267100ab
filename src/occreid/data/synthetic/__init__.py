"""SynthOcc: a procedural occluded person-ReID benchmark in the Occluded-Duke layout.

Pedestrians, camera scenes and occluders are drawn with numpy and PIL (no downloaded
assets). Identities come in outfit families whose members differ only in the upper or only
in the lower body, so hiding one half of a person (NPO objects, NTP pedestrians) really
causes confusion. See ``docs/synthocc.md``.

>>> from occreid.data.synthetic import generate_synthocc, save_preview_grid
>>> root = generate_synthocc("data/synthocc_demo", preset="demo", seed=0)  # doctest: +SKIP
>>> save_preview_grid(root, "preview.png")  # doctest: +SKIP
"""

from .generate import (
    CAMERAS, META_HEADER, SPLIT_DIRS, SYNTHOCC_VERSION, generate_synthocc, sample_identities,
    save_preview_grid,
)
from .prepare import ensure_synthocc, synthocc_folder, synthocc_generation
from .presets import PRESETS, Preset
from .render import CameraSpec, PersonSpec, draw_person

__all__ = [
    "generate_synthocc", "save_preview_grid", "PRESETS", "Preset", "SYNTHOCC_VERSION",
    "META_HEADER", "SPLIT_DIRS", "CAMERAS", "CameraSpec", "PersonSpec", "draw_person",
    "sample_identities", "ensure_synthocc", "synthocc_folder", "synthocc_generation",
]
