"""occreid: occluded person re-identification (ViT baseline, FED, DPM)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
