"""Small shared helpers: registries, image reading, atomic file writes, seeding."""

from .registry import Registry
from .io import OccReIDError, atomic_save, atomic_write_text, read_image

__all__ = ["Registry", "OccReIDError", "atomic_save", "atomic_write_text", "read_image"]
