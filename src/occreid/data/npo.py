"""FED's NPO augmentation (data side) and the stripe occlusion mask.

FED (Wang et al., CVPR 2022, Sec. 3.1 "Occlusion Erasing Module", NPO augmentation)
trains on *pairs*: a clean view ``x`` and an occluded view ``x'`` made by pasting a
non-pedestrian occluder patch into a corner of ``x``. Both views share the common image
augmentations. The part-occlusion labels that supervise the OEM come from the
per-pixel difference ``d = sum_c |x - x'|`` pooled into ``N`` horizontal stripes.

What this module provides:

* :class:`OccluderBank`: the patch bank, a folder of image crops (see its docstring
  for the format).
* :class:`NPOTransform`: PIL image -> the 7-channel training tensor
  ``cat(normalize(x), normalize(x'), d)`` of shape ``[7, H, W]``, exactly the layout of
  the official dataset item (fed-official.md §1.5). The FED model splits it and derives
  the stripe mask from channel 6 on the whole batch (vectorised).
* :func:`stripe_means`, :func:`official_stripe_rule`, :func:`stripe_mask`: the stripe
  pooling and labelling rule, vectorised over any leading batch dimensions.

Switches (default = official code, other value = paper):

============================  ===================  ==================================
switch                        official (default)   paper
============================  ===================  ==================================
``vertical_ratio``            2.0 (h/w > 2)        3.0 (h/w > 3)
``patch_aug``                 ``"official"``:      ``"paper"``: random crop + colour
                              jitter(0.5) on       jitter(0.5) on every patch, hflip
                              horizontal patches
                              only, hflip, no crop
``stripe_mask(rule=...)``     ``"official"``:      ``"paper"``: a stripe is occluded
                              ratio test on mean   when more than 3/4 of its pixels
                              |d| per stripe       changed
============================  ===================  ==================================
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..utils import OccReIDError, read_image

__all__ = [
    "OCCLUDER_EXTENSIONS",
    "OccluderBank",
    "NPOTransform",
    "build_npo_common_transform",
    "find_occluder_folder",
    "paste_occluder",
    "stripe_means",
    "official_stripe_rule",
    "paper_stripe_rule",
    "stripe_mask",
    "MASK_RULES",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: File name endings accepted in an occluder folder (case-insensitive).
OCCLUDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Accepted values of ``stripe_mask(rule=...)``.
MASK_RULES = ("official", "paper")

# Folder names searched (in order) by :func:`find_occluder_folder`.
_OCCLUDER_FOLDER_NAMES = ("occluders", "crop_backgrounds")


# ---------------------------------------------------------------------------------------
# Patch bank
# ---------------------------------------------------------------------------------------
class OccluderBank:
    """A folder of occluder patches for the NPO augmentation.

    Format: one folder holding image files (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``,
    ``.webp``; case-insensitive), each a crop of a non-pedestrian object or background
    (car, pole, bin, bag, foliage, ...) with **no body parts**, of any size. Sub-folders
    and other files are ignored. The patch orientation is taken from its aspect ratio at
    sampling time (``h / w > vertical_ratio`` -> vertical occluder spanning the full image
    height, otherwise horizontal occluder spanning the full width). This is the format of
    the official ``Occluded_Duke/crop_backgrounds/*.jpg`` bank and of SynthOcc's
    ``occluders/`` folder.

    ``folder`` may also be a list of folders (FED*: the official OS1 + OS2 banks): their
    files are pooled, folder by folder in the given order, and drawn uniformly from the pool.

    Files are listed once, sorted by name (deterministic). Decoded patches are kept in
    memory after first use when ``cache`` is true (the official code re-opens the file on
    every sample; the result is the same).
    """

    def __init__(self, folder: Union[PathLike, Sequence[PathLike]], *, cache: bool = True) -> None:
        folders = [Path(f) for f in folder] if isinstance(folder, (list, tuple)) else [Path(folder)]
        if not folders:
            raise OccReIDError("the occluder patch folder list is empty; give at least one folder")
        files: List[Path] = []
        for one in folders:
            if not one.is_dir():
                raise OccReIDError(
                    f"occluder patch folder not found: {one}. Expected a folder of image crops "
                    f"({', '.join(OCCLUDER_EXTENSIONS)}) such as <dataset>/occluders (SynthOcc) or "
                    "Occluded_Duke/crop_backgrounds (the official FED patch bank); pass its path."
                )
            found = sorted(
                p for p in one.iterdir() if p.is_file() and p.suffix.lower() in OCCLUDER_EXTENSIONS
            )
            if not found:
                raise OccReIDError(
                    f"occluder patch folder {one} holds no image files "
                    f"({', '.join(OCCLUDER_EXTENSIONS)}); add occluder crops or pick another folder."
                )
            files.extend(found)
        self.folders = folders
        self.folder = folders[0] if len(folders) == 1 else folders
        self.files = files
        self.cache = cache
        self._images: dict = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        """The ``index``-th patch as an RGB PIL image."""
        if index in self._images:
            return self._images[index]
        image = read_image(self.files[index])
        if self.cache:
            self._images[index] = image
        return image

    def __repr__(self) -> str:
        names = [str(f) for f in self.folders]
        return f"OccluderBank(folder={names[0] if len(names) == 1 else names!r}, patches={len(self)})"


def find_occluder_folder(dataset_root: PathLike) -> Path:
    """Locate the patch folder of a dataset: ``<root>/occluders`` or ``<root>/crop_backgrounds``."""
    root = Path(dataset_root)
    tried = [root / name for name in _OCCLUDER_FOLDER_NAMES]
    for candidate in tried:
        if candidate.is_dir():
            return candidate
    raise OccReIDError(
        "no occluder patch folder found; tried "
        + ", ".join(str(p) for p in tried)
        + ". FED's NPO augmentation needs one (SynthOcc writes occluders/; for Occluded-Duke "
        "download the official cropped patches into Occluded_Duke/crop_backgrounds/), or "
        "pass the folder explicitly."
    )


# ---------------------------------------------------------------------------------------
# Random helpers (a torch.Generator makes every draw reproducible in tests)
# ---------------------------------------------------------------------------------------
def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [low, high], both inclusive (like ``random.randint``)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator).item())


def _color_jitter(img, strength: float, generator: Optional[torch.Generator]):
    """ColorJitter(brightness=contrast=saturation=strength, hue=0), torchvision semantics.

    Factors are drawn from U[max(0, 1 - s), 1 + s] and applied in a random order.
    """
    import torchvision.transforms.functional as TF

    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    order = torch.randperm(3, generator=generator).tolist()
    factors = [_uniform(max(0.0, 1.0 - strength), 1.0 + strength, generator) for _ in range(3)]
    for i in order:
        img = ops[i](img, factors[i])
    return img


# ---------------------------------------------------------------------------------------
# Pasting
# ---------------------------------------------------------------------------------------
def paste_occluder(
    x: torch.Tensor,
    patch,
    *,
    vertical_ratio: float = 2.0,
    patch_aug: str = "official",
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, dict]:
    """Paste one augmented occluder patch into a corner of ``x`` (fed-official.md §1.4).

    Args:
        x: clean image ``[3, H, W]`` with values in [0, 1] (not normalised).
        patch: RGB PIL image of the occluder.
        vertical_ratio: aspect threshold: ``h / w > vertical_ratio`` -> vertical occluder.
            2.0 is the official code, 3.0 the paper.
        patch_aug: ``"official"`` (horizontal patches: ColorJitter(0.5, 0.5, 0.5) and
            hflip; vertical patches: hflip only; no crop) or ``"paper"`` (random crop keeping
            70-100 % of each side, ColorJitter(0.5, 0.5, 0.5) and hflip for every patch).

    Sizes scale with the image: a horizontal patch is resized to ``[h_p, W]`` with
    ``h_p ~ U{H/4 .. H/2}``; a vertical one to ``[H, w_p]`` with ``w_p ~ U{W/4 .. W/2}``
    (for 256x128 exactly the official 64..128 x 128 and 256 x 32..64). The corner is one of
    top-left, top-right, bottom-left, bottom-right, uniformly.

    Returns:
        ``(x_occluded, info)``: a new tensor (``x`` is not modified) and a dict with
        ``orientation`` ("vertical"/"horizontal"), ``box`` = (top, left, height, width).
    """
    import torchvision.transforms.functional as TF

    if patch_aug not in ("official", "paper"):
        raise ValueError(f"patch_aug must be 'official' or 'paper', got {patch_aug!r}")
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a clean image tensor [3, H, W], got shape {tuple(x.shape)}")
    _, H, W = x.shape
    pw, ph = patch.size
    vertical = ph / pw > vertical_ratio

    if patch_aug == "paper":
        # Random crop keeping 70-100 % of each side (the paper does not give the range).
        ch = max(1, round(ph * _uniform(0.7, 1.0, generator)))
        cw = max(1, round(pw * _uniform(0.7, 1.0, generator)))
        top = _randint(0, ph - ch, generator)
        left = _randint(0, pw - cw, generator)
        patch = patch.crop((left, top, left + cw, top + ch))
        patch = _color_jitter(patch, 0.5, generator)
    elif not vertical:
        patch = _color_jitter(patch, 0.5, generator)

    if vertical:
        size = (H, _randint(max(1, W // 4), max(1, W // 2), generator))
    else:
        size = (_randint(max(1, H // 4), max(1, H // 2), generator), W)
    patch = TF.resize(patch, list(size), interpolation=TF.InterpolationMode.BICUBIC)
    if _uniform(0.0, 1.0, generator) < 0.5:
        patch = TF.hflip(patch)
    p = TF.to_tensor(patch).to(dtype=x.dtype, device=x.device)  # [3, h_p, w_p] in [0, 1]

    corner = _randint(0, 3, generator)  # 0 TL, 1 TR, 2 BL, 3 BR
    hp, wp = p.shape[1:]
    top = 0 if corner in (0, 1) else H - hp
    left = 0 if corner in (0, 2) else W - wp
    out = x.clone()
    out[:, top : top + hp, left : left + wp] = p
    return out, {"orientation": "vertical" if vertical else "horizontal", "box": (top, left, hp, wp)}


# ---------------------------------------------------------------------------------------
# Stripe mask (vectorised over leading dims)
# ---------------------------------------------------------------------------------------
def stripe_means(diff: torch.Tensor, num_stripes: int = 4) -> torch.Tensor:
    """Mean of the difference map over ``num_stripes`` horizontal stripes.

    Args:
        diff: ``[..., H, W]`` per-pixel difference (FED: ``sum_c |x - x'|``).

    Returns:
        ``[..., num_stripes]`` float32. Stripe ``j`` covers rows ``floor(jH/N)`` to
        ``ceil((j+1)H/N)`` (adaptive pooling); for ``H % N == 0`` this is exactly the
        official flatten-and-pool of 4 bins of ``H/4`` rows.
    """
    if diff.dim() < 2:
        raise ValueError(f"expected a difference map [..., H, W], got shape {tuple(diff.shape)}")
    lead = diff.shape[:-2]
    d = diff.reshape(-1, 1, *diff.shape[-2:]).float()
    means = F.adaptive_avg_pool2d(d, (num_stripes, 1))  # [B', 1, N, 1]
    return means.reshape(*lead, num_stripes)


def official_stripe_rule(means: torch.Tensor, ratio_threshold: float = 3.0) -> torch.Tensor:
    """The official ``mask_generation2`` labelling rule, vectorised (1 = visible, 0 = occluded).

    For stripe means ``v`` (``[..., N]``), with touched ``t_j = v_j > 0``:

    * no stripe or all ``N`` stripes touched -> all ones (vertical occluders always touch
      all stripes, which is how the code "ignores" them);
    * otherwise let ``v1 >= v2`` be the two largest means; if ``v1 / v2 > ratio_threshold``
      (strict) only the arg-max stripe is 0, else every touched stripe is 0. Exactly one
      touched stripe gives ``v2 = 0`` and ratio ``inf``: that stripe is 0.
    """
    if means.shape[-1] < 2:
        raise ValueError("the stripe rule needs at least 2 stripes")
    v = means.float()
    touched = v > 0
    n_touched = touched.sum(-1, keepdim=True)
    top2 = v.topk(2, dim=-1).values
    v1, v2 = top2[..., :1], top2[..., 1:2]
    # v2 == 0 -> ratio inf (one stripe touched); 0/0 never reaches here (handled below).
    ratio = torch.where(v2 > 0, v1 / v2.clamp_min(torch.finfo(v.dtype).tiny), torch.full_like(v1, math.inf))
    argmax_only = F.one_hot(v.argmax(-1), v.shape[-1]).bool()
    occluded = torch.where(ratio > ratio_threshold, argmax_only, touched)
    keep_all = (n_touched == 0) | (n_touched == v.shape[-1])
    occluded = occluded & ~keep_all
    return (~occluded).to(torch.float32)


def paper_stripe_rule(coverage: torch.Tensor, coverage_threshold: float = 0.75) -> torch.Tensor:
    """The paper's rule: a stripe covered by more than ``coverage_threshold`` is occluded (0)."""
    return (coverage <= coverage_threshold).to(torch.float32)


def stripe_mask(
    diff: torch.Tensor,
    num_stripes: int = 4,
    *,
    rule: str = "official",
    ratio_threshold: float = 3.0,
    coverage_threshold: float = 0.75,
) -> torch.Tensor:
    """Part-occlusion labels ``[..., num_stripes]`` (1 visible, 0 occluded) from ``diff``.

    Args:
        diff: ``[..., H, W]`` difference map (channel 6 of the FED training tensor).
        rule: ``"official"`` (default): :func:`official_stripe_rule` on the stripe means of
            ``diff``. ``"paper"``: a stripe is occluded when more than ``coverage_threshold``
            (3/4) of its pixels changed (``diff > 0``); vertical occluders (at most half
            the width) never reach that, matching "vertical occlusion is ignored". Pixels
            where the patch happens to equal the image count as not covered.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"unknown stripe-mask rule {rule!r}; expected one of {MASK_RULES}")
    if rule == "official":
        return official_stripe_rule(stripe_means(diff, num_stripes), ratio_threshold)
    coverage = stripe_means((diff > 0).float(), num_stripes)
    return paper_stripe_rule(coverage, coverage_threshold)


# ---------------------------------------------------------------------------------------
# The two-branch transform
# ---------------------------------------------------------------------------------------
def build_npo_common_transform(
    size: Sequence[int] = (256, 128),
    *,
    color_jitter: Optional[Tuple[float, float, float, float]] = (0.1, 0.1, 0.1, 0.0),
    flip_prob: float = 0.5,
    padding: int = 10,
) -> Callable:
    """FED's "transform 1" shared by both views (fed-official.md §1.3), output in [0, 1].

    ColorJitter(0.1, 0.1, 0.1, 0) -> Resize(size, bicubic) -> RandomHorizontalFlip ->
    Pad(padding, black) -> RandomCrop(size) -> ToTensor. No normalisation (the NPO
    difference is taken on [0, 1] pixels).
    """
    import torchvision.transforms as T

    ops = []
    if color_jitter is not None:
        ops.append(T.ColorJitter(*color_jitter))
    ops += [
        T.Resize(tuple(size), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=flip_prob),
    ]
    if padding > 0:
        ops += [T.Pad(padding, fill=0), T.RandomCrop(tuple(size))]
    ops.append(T.ToTensor())
    return T.Compose(ops)


class NPOTransform:
    """PIL image -> FED's 7-channel training tensor ``[7, H, W]``.

    Channels: ``0:3`` the clean view ``x`` normalised, ``3:6`` the occluded view ``x'``
    normalised, ``6`` the raw difference ``d = sum_c |x - x'|`` in [0, 3] (not normalised).
    Both views come from the same draw of ``common`` (shared augmentations), as in the
    official dataset item. The FED model derives the stripe mask from channel 6 on the
    batch (:func:`stripe_mask`).

    Args:
        occluders: an :class:`OccluderBank` or the path of a patch folder.
        size: ``(H, W)`` of the training images.
        common: callable PIL -> ``[3, H, W]`` tensor in [0, 1]; default
            :func:`build_npo_common_transform` (``size``).
        mean, std: normalisation of the two views (FED: 0.5 / 0.5).
        prob: probability of occluding (official EPSILON = 1: always). When not applied,
            ``x' = x`` and ``d = 0`` (all-visible labels).
        vertical_ratio, patch_aug: see :func:`paste_occluder`.
        generator: optional ``torch.Generator`` for reproducible patch draws (the common
            transform uses torchvision's global RNG).
    """

    def __init__(
        self,
        occluders: Union[OccluderBank, PathLike],
        size: Sequence[int] = (256, 128),
        *,
        common: Optional[Callable] = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        prob: float = 1.0,
        vertical_ratio: float = 2.0,
        patch_aug: str = "official",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if patch_aug not in ("official", "paper"):
            raise ValueError(f"patch_aug must be 'official' or 'paper', got {patch_aug!r}")
        self.bank = occluders if isinstance(occluders, OccluderBank) else OccluderBank(occluders)
        self.size = (int(size[0]), int(size[1]))
        self.common = common if common is not None else build_npo_common_transform(self.size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.prob = prob
        self.vertical_ratio = vertical_ratio
        self.patch_aug = patch_aug
        self.generator = generator

    def occlude(self, x: torch.Tensor) -> torch.Tensor:
        """The occluded view ``x'`` of a clean ``[3, H, W]`` tensor in [0, 1]."""
        if self.prob < 1.0 and _uniform(0.0, 1.0, self.generator) >= self.prob:
            return x.clone()
        patch = self.bank[_randint(0, len(self.bank) - 1, self.generator)]
        out, _ = paste_occluder(
            x, patch, vertical_ratio=self.vertical_ratio, patch_aug=self.patch_aug,
            generator=self.generator,
        )
        return out

    def __call__(self, img) -> torch.Tensor:
        x = self.common(img)
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[0] != 3:
            raise ValueError("the common transform must return a [3, H, W] tensor in [0, 1]")
        if tuple(x.shape[1:]) != self.size:
            raise ValueError(
                f"the common transform returned size {tuple(x.shape[1:])}, expected {self.size}"
            )
        x_occ = self.occlude(x)
        d = (x - x_occ).abs().sum(0, keepdim=True)  # [1, H, W], before normalisation
        mean, std = self.mean.to(x), self.std.to(x)
        return torch.cat([(x - mean) / std, (x_occ - mean) / std, d], dim=0)

    def __repr__(self) -> str:
        return (
            f"NPOTransform(size={self.size}, bank={self.bank!r}, prob={self.prob}, "
            f"vertical_ratio={self.vertical_ratio}, patch_aug={self.patch_aug!r})"
        )
