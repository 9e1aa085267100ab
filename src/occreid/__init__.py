"""occreid: occluded person re-identification (ViT baseline, FED, DPM)."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "FeatureExtractor", "GalleryIndex"]

# Imported on first use, so that ``import occreid`` stays light (no torch/timm import).
_LAZY = {
    "FeatureExtractor": ("occreid.inference", "FeatureExtractor"),
    "GalleryIndex": ("occreid.retrieval", "GalleryIndex"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'occreid' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
