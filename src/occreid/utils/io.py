"""File helpers: image reading with clear errors, safe ``torch.load``, atomic writes, optional extras."""

from __future__ import annotations

import importlib
import io
import logging
import os
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence, Union

PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)


class OccReIDError(Exception):
    """An error caused by user input (paths, files, configs); its message says what to do."""


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

#: Images with a side shorter than this (the patch size of the ViT-B/S backbones) are warned about.
MIN_IMAGE_SIDE = 16
#: Height / width outside this range is an extreme aspect ratio for a person crop (about 2:1).
ASPECT_RANGE = (0.25, 8.0)

_GRAY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_noticed: set = set()  # which once-per-run image notices were given (per process)
_notice_lock = threading.Lock()


def reset_image_notices() -> None:
    """Forget which once-per-run image notices were given (each is logged once per process)."""
    with _notice_lock:
        _noticed.clear()


def _notice_once(kind: str, level: int, msg: str, *args: Any) -> None:
    with _notice_lock:
        if kind in _noticed:
            return
        _noticed.add(kind)
    logger.log(level, msg + " (said once per run)", *args)


def _inspect_image(p: Path, size, mode: str) -> None:
    """Once-per-run notices for unusual images: tiny, extreme aspect ratio, grayscale, alpha."""
    w, h = size
    if min(w, h) < MIN_IMAGE_SIDE:
        _notice_once("small", logging.WARNING,
                     "image %s is only %dx%d pixels (width x height), smaller than one %d-pixel ViT patch; "
                     "it is upscaled to the model input and its features will be poor", p, w, h, MIN_IMAGE_SIDE)
    elif not ASPECT_RANGE[0] <= h / w <= ASPECT_RANGE[1]:
        _notice_once("aspect", logging.WARNING,
                     "image %s is %dx%d pixels (width x height), an extreme aspect ratio for a person crop "
                     "(height/width %.2f, expected about 2); it is stretched to the model input", p, w, h, h / w)
    if mode in _GRAY_MODES:
        _notice_once("gray", logging.INFO, "image %s is grayscale (PIL mode %s); converted to RGB", p, mode)
    elif mode in _ALPHA_MODES:
        _notice_once("alpha", logging.INFO,
                     "image %s has an alpha channel (PIL mode %s); converted to RGB, transparency dropped", p, mode)


def read_image(path: PathLike, mode: str = "RGB"):
    """Open an image file fully (decoding every pixel) and convert it to ``mode``.

    Raises :class:`OccReIDError` naming the path when the file is missing, is not an
    image, or is truncated/corrupt, instead of a deep PIL traceback. Images smaller than one
    ViT patch (:data:`MIN_IMAGE_SIDE`), with an extreme aspect ratio (:data:`ASPECT_RANGE`),
    grayscale or with an alpha channel are read as asked and noted in the log once per run.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise OccReIDError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()  # force decoding now, so truncation is detected here
            src_mode = im.mode
            if src_mode == "P" and "transparency" in im.info:
                src_mode = "PA"
            _inspect_image(p, im.size, src_mode)
            return im.convert(mode)
    except UnidentifiedImageError:
        raise OccReIDError(f"not an image file (PIL cannot identify it): {p}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise OccReIDError(f"corrupt or truncated image file {p}: {exc}") from None


# --------------------------------------------------------------------------------------------
# torch.load with occreid's own messages
# --------------------------------------------------------------------------------------------


_FOREIGN = ("it holds pickled Python objects other than tensors and plain containers, which occreid "
            "never writes and does not unpickle (loading them could run code)")


def _describe_unreadable(p: Path) -> str:
    """What a file that ``torch.load(weights_only=True)`` refused looks like (never torch's advice)."""
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        return f"it cannot be opened ({exc.strerror or exc})"
    if size == 0:
        return "the file is empty (0 bytes), e.g. a copy or download that did not finish"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(p) as zf:
                bad = zf.testzip()
            if bad is not None:
                return f"the PyTorch archive is corrupt (member {bad} fails its checksum)"
        except (zipfile.BadZipFile, OSError, EOFError):
            return f"the PyTorch archive is truncated or corrupt ({size} bytes)"
        return _FOREIGN
    if head[:1] == b"\x80":  # a pickle (or a legacy torch.save file)
        return _FOREIGN
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is not a PyTorch file (it starts with the bytes {head[:8]!r})"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"it is a text file, not a PyTorch file (it starts with {first!r})"


def safe_torch_load(path: PathLike, what: str, expected: str, map_location: Any = "cpu", *,
                    safe_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)``; any failure becomes one :class:`OccReIDError`
    line saying what the file looks like and what was ``expected`` (never torch's own advice,
    which suggests loading without ``weights_only``). ``safe_globals``: extra classes allowed."""
    import torch

    p = Path(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(safe_globals)):
            warnings.simplefilter("ignore")  # e.g. torch's note on the pickle protocol
            return torch.load(p, map_location=map_location, weights_only=True)
    except Exception:  # unpickling errors of many kinds: EOFError, KeyError, UnpicklingError, RuntimeError
        raise OccReIDError(f"cannot read {what} {p}: {_describe_unreadable(p)}. Expected {expected}.") from None


# --------------------------------------------------------------------------------------------
# Optional extras
# --------------------------------------------------------------------------------------------


def require_module(module: str, extra: str, purpose: str):
    """Import ``module`` or raise :class:`OccReIDError` naming the extra that provides it.

    >>> require_module("onnx", "onnx", "exporting to ONNX")  # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OccReIDError(
            f"{purpose} needs the {module} package, which is not installed: pip install 'occreid[{extra}]'"
        ) from None


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: PathLike, write_fn) -> Path:
    """Write through a temporary file in the same folder (fsync, rename). The file gets the
    permissions a plain ``open(path, "w")`` would give it (0666 minus the umask), not
    ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
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
