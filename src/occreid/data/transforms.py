"""Train/test image transforms of TransReID (and FED/DPM), and timm-0.3.2-style RandomErasing.

Train (transreid-backbone.md section 4.3), on PIL images::

    [ColorJitter]                 optional; FED: (0.1, 0.1, 0.1, 0) before the resize
    Resize(size, bicubic)
    RandomHorizontalFlip(0.5)
    Pad(10, fill 0)
    RandomCrop(size)
    ToTensor
    Normalize(0.5, 0.5)           pixels in [-1, 1]
    RandomErasing(0.5, 'pixel')   N(0, 1) noise box, after normalisation

Test: Resize(size, bilinear), ToTensor, Normalize(0.5, 0.5). No flip TTA.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Tuple, Union

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["RandomErasing", "build_train_transform", "build_test_transform"]

Size = Union[int, Sequence[int]]


def _size(size: Size) -> Tuple[int, int]:
    """(H, W) from an int (square) or an (H, W) pair."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be an int or an (height, width) pair of positive ints, got {size}")
    return size  # type: ignore[return-value]


def _interpolation(mode: Union[str, InterpolationMode]) -> InterpolationMode:
    if isinstance(mode, InterpolationMode):
        return mode
    try:
        return InterpolationMode(str(mode).lower())
    except ValueError:
        choices = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"unknown interpolation {mode!r}; choose one of: {choices}") from None


def _normalize(mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> list:
    if mean is None and std is None:
        return []
    if mean is None or std is None:
        raise ValueError("give both mean and std, or neither (to skip normalisation)")
    return [T.Normalize(mean=list(mean), std=list(std))]


class RandomErasing:
    """Random erasing with timm 0.3.2 ``mode='pixel'``, ``max_count=1`` semantics.

    With probability ``probability`` (skipped when ``random.random() > probability``), up to
    ``max_attempts`` tries: ``area = U(area[0], area[1]) * H * W``,
    ``aspect = exp(U(log min_aspect, log max_aspect))``, ``h = round(sqrt(area * aspect))``,
    ``w = round(sqrt(area / aspect))``; if ``w < W`` and ``h < H``, ``top = randint(0, H - h)``,
    ``left = randint(0, W - w)``, the box is filled with per-pixel, per-channel N(0, 1) noise and
    the search stops. The geometry uses Python's :mod:`random` (so ``random.seed`` controls it,
    as in timm), the noise uses torch's generator on the tensor's device and dtype.

    Operates on a normalised CHW tensor; returns a new tensor when it erases, the input
    unchanged otherwise (timm erases in place).

    Args:
        probability: chance of erasing one box.
        area: (min, max) fraction of the image area.
        min_aspect: minimum h/w aspect ratio; ``max_aspect`` defaults to ``1 / min_aspect``.
        max_attempts: tries to find a box that fits (timm: 10).
    """

    def __init__(
        self,
        probability: float = 0.5,
        area: Tuple[float, float] = (0.02, 1 / 3),
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        max_attempts: int = 10,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        lo, hi = area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"area must satisfy 0 < min <= max <= 1, got {area}")
        if not min_aspect > 0.0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        if not min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.probability = float(probability)
        self.area = (float(lo), float(hi))
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = int(max_attempts)

    def get_params(self, height: int, width: int) -> Optional[Tuple[int, int, int, int]]:
        """Draw ``(top, left, h, w)`` of the box to erase, or None (skipped or nothing fitted).

        Consumes Python ``random`` exactly as timm 0.3.2 does.
        """
        if random.random() > self.probability:
            return None
        for _ in range(self.max_attempts):
            target_area = random.uniform(*self.area) * height * width
            aspect = math.exp(random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                return top, left, h, w
        return None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor) or img.dim() != 3:
            raise TypeError(
                "RandomErasing expects a CHW tensor (place it after ToTensor/Normalize), got "
                f"{type(img).__name__}{tuple(img.shape) if isinstance(img, torch.Tensor) else ''}"
            )
        channels, height, width = img.shape
        box = self.get_params(height, width)
        if box is None:
            return img
        top, left, h, w = box
        out = img.clone()
        out[:, top:top + h, left:left + w] = torch.empty(
            (channels, h, w), dtype=img.dtype, device=img.device
        ).normal_()
        return out

    def __repr__(self) -> str:
        lo, hi = self.log_aspect
        return (
            f"{type(self).__name__}(probability={self.probability}, area={self.area}, "
            f"aspect=({math.exp(lo):.3g}, {math.exp(hi):.3g}), max_attempts={self.max_attempts})"
        )


def build_train_transform(
    size: Size = (256, 128),
    *,
    interpolation: Union[str, InterpolationMode] = "bicubic",
    flip_prob: float = 0.5,
    padding: int = 10,
    re_prob: float = 0.5,
    re_area: Tuple[float, float] = (0.02, 1 / 3),
    re_min_aspect: float = 0.3,
    re_max_attempts: int = 10,
    mean: Optional[Sequence[float]] = (0.5, 0.5, 0.5),
    std: Optional[Sequence[float]] = (0.5, 0.5, 0.5),
    color_jitter: Optional[Sequence[float]] = None,
    color_jitter_position: str = "before_resize",
) -> T.Compose:
    """The TransReID training transform (PIL image -> normalised CHW float tensor).

    Args:
        size: output (H, W) (an int means square).
        interpolation: resize filter (TransReID: bicubic; PIL resizing always antialiases).
        flip_prob: horizontal flip probability (``INPUT.PROB``).
        padding: zero (black) padding before the random crop back to ``size``; 0 disables
            both the padding and the crop.
        re_prob: RandomErasing probability (``INPUT.RE_PROB``: 0.5 ViT, 0.8 DeiT; 0 disables).
        re_area, re_min_aspect, re_max_attempts: RandomErasing geometry (see
            :class:`RandomErasing`).
        mean, std: Normalize parameters (0.5 for the ViT weights); both None skips
            normalisation (FED's first train transform yields [0, 1] tensors, with
            ``re_prob=0``).
        color_jitter: ``(brightness, contrast, saturation[, hue])`` for ColorJitter, or None.
            FED: ``(0.1, 0.1, 0.1, 0.0)``; DPM's Occluded-REID variant: ``(0.3, 0.3, 0.2, 0.2)``.
        color_jitter_position: ``"before_resize"`` (FED) or ``"after_resize"`` (DPM, between
            the resize and the flip).
    """
    size = _size(size)
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if not 0.0 <= re_prob <= 1.0:
        raise ValueError(f"re_prob must be in [0, 1], got {re_prob}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if color_jitter_position not in ("before_resize", "after_resize"):
        raise ValueError(
            f"color_jitter_position must be 'before_resize' or 'after_resize', got "
            f"{color_jitter_position!r}"
        )
    jitter = []
    if color_jitter is not None:
        cj = tuple(float(v) for v in color_jitter)
        if len(cj) not in (3, 4):
            raise ValueError(
                f"color_jitter must be (brightness, contrast, saturation[, hue]), got {color_jitter}"
            )
        jitter = [T.ColorJitter(*cj)]
    ops = []
    if color_jitter_position == "before_resize":
        ops += jitter
    ops.append(T.Resize(size, interpolation=_interpolation(interpolation)))
    if color_jitter_position == "after_resize":
        ops += jitter
    ops.append(T.RandomHorizontalFlip(p=flip_prob))
    if padding > 0:
        ops += [T.Pad(padding, fill=0, padding_mode="constant"), T.RandomCrop(size)]
    ops.append(T.ToTensor())
    ops += _normalize(mean, std)
    if re_prob > 0:
        ops.append(
            RandomErasing(
                re_prob, area=re_area, min_aspect=re_min_aspect, max_attempts=re_max_attempts
            )
        )
    return T.Compose(ops)


def build_test_transform(
    size: Size = (256, 128),
    *,
    interpolation: Union[str, InterpolationMode] = "bilinear",
    mean: Optional[Sequence[float]] = (0.5, 0.5, 0.5),
    std: Optional[Sequence[float]] = (0.5, 0.5, 0.5),
) -> T.Compose:
    """The TransReID test transform: Resize (bilinear), ToTensor, Normalize."""
    return T.Compose(
        [T.Resize(_size(size), interpolation=_interpolation(interpolation)), T.ToTensor()]
        + _normalize(mean, std)
    )
