"""File helpers: image reading with clear errors, and atomic writes."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


class OccReIDError(Exception):
    """An error caused by user input (paths, files, configs); its message says what to do."""


def read_image(path: PathLike, mode: str = "RGB"):
    """Open an image file fully (decoding every pixel) and convert it to ``mode``.

    Raises :class:`OccReIDError` naming the path when the file is missing, is not an
    image, or is truncated/corrupt, instead of a deep PIL traceback.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise OccReIDError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()  # force decoding now, so truncation is detected here
            return im.convert(mode)
    except UnidentifiedImageError:
        raise OccReIDError(f"not an image file (PIL cannot identify it): {p}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise OccReIDError(f"corrupt or truncated image file {p}: {exc}") from None


def _atomic_write(path: PathLike, write_fn) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename.

    A run killed mid-write leaves the previous file intact.
    """
    import torch

    def write(fh):
        buf = io.BytesIO()
        torch.save(obj, buf)
        fh.write(buf.getvalue())

    return _atomic_write(path, write)


def atomic_write_text(text: str, path: PathLike) -> Path:
    return _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
