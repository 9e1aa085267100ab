"""SynthOcc generation: identities (outfit families), cameras, splits, and the files on disk.

Layout written (the Occluded-Duke layout, plus FED's patch bank and two metadata files)::

    <out>/bounding_box_train/{pid:04d}_c{cam}_f{frame:07d}.jpg   training images (mostly holistic)
    <out>/query/...                                               holistic, NPO and NTP queries
    <out>/bounding_box_test/...                                   gallery (mostly holistic)
    <out>/occluders/*.jpg                                         NPO patch bank (FED format)
    <out>/occlusion_meta.csv                                      one row per box image
    <out>/synthocc.json                                           version, preset, seed, counts

Determinism: one ``numpy.random.Generator`` seeded with ``seed`` draws the whole plan
(identities, cameras per identity, occlusions, frame numbers, one 63-bit seed per image);
each image is then rendered from its own seed, so the files are byte-identical for the
same preset, seed and library versions (numpy, Pillow/libjpeg).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...utils import OccReIDError, atomic_write_text
from ..base import OCCLUSION_TYPES
from .presets import NEW_FIELD_DEFAULTS, PRESETS, Preset
from .render import (
    HATS, OCCLUDERS, SUPERSAMPLE, TEXTURES, CameraSpec, Figure, PersonSpec,
    render_occluder_patch, render_panorama, render_scene,
)

__all__ = [
    "SYNTHOCC_VERSION", "META_HEADER", "CAMERAS", "SPLIT_DIRS",
    "generate_synthocc", "save_preview_grid", "sample_identities",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Bumped whenever the generated pixels or layout change (a cached dataset is then rebuilt).
SYNTHOCC_VERSION = "1.0"
#: Exact header of ``occlusion_meta.csv``.
META_HEADER = "split,filename,pid,camid,occlusion,side,fraction"
#: split name -> folder.
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_OWNED = ("bounding_box_train", "query", "bounding_box_test", "occluders", "occlusion_meta.csv",
          "synthocc.json")

# --------------------------------------------------------------------------------------
# Palettes (named, so that "different outfit" means a different colour name)
# --------------------------------------------------------------------------------------

UPPER_COLORS: Dict[str, Tuple[int, int, int]] = {
    "white": (236, 236, 230), "lightgrey": (165, 165, 168), "darkgrey": (75, 75, 80),
    "black": (28, 28, 32), "navy": (28, 38, 95), "blue": (40, 90, 195),
    "skyblue": (125, 175, 230), "red": (205, 35, 40), "maroon": (115, 22, 40),
    "orange": (240, 130, 30), "yellow": (240, 210, 50), "green": (45, 145, 60),
    "darkgreen": (25, 75, 45), "olive": (125, 122, 50), "beige": (215, 195, 150),
    "brown": (115, 72, 42), "purple": (110, 55, 155), "pink": (240, 140, 175),
    "teal": (25, 140, 140),
}
LOWER_COLORS: Dict[str, Tuple[int, int, int]] = {
    "black": (25, 25, 28), "darkgrey": (70, 70, 75), "lightgrey": (160, 160, 165),
    "navy": (30, 36, 80), "denim": (55, 85, 140), "lightdenim": (125, 155, 195),
    "khaki": (190, 170, 120), "brown": (105, 70, 45), "white": (230, 230, 225),
    "olive": (95, 100, 50), "red": (170, 30, 40), "beige": (215, 200, 165),
}
SHOE_COLORS: Dict[str, Tuple[int, int, int]] = {
    "white": (240, 240, 240), "black": (20, 20, 20), "brown": (95, 55, 30),
    "grey": (130, 130, 135), "red": (200, 30, 30), "blue": (40, 80, 190),
}
HAIR_COLORS: Dict[str, Tuple[int, int, int]] = {
    "black": (22, 18, 18), "darkbrown": (58, 38, 26), "brown": (110, 72, 40),
    "blonde": (215, 182, 110), "grey": (165, 165, 165), "auburn": (145, 62, 32),
}
SKIN_TONES: Tuple[Tuple[int, int, int], ...] = (
    (245, 210, 180), (230, 185, 150), (205, 155, 115), (170, 120, 85), (130, 90, 60),
    (95, 65, 45),
)
ACC_COLORS: Dict[str, Tuple[int, int, int]] = {
    "black": (25, 25, 28), "navy": (30, 40, 100), "red": (200, 30, 35), "grey": (120, 120, 125),
    "brown": (120, 75, 40), "green": (40, 130, 60), "yellow": (235, 200, 40),
    "pink": (235, 120, 165), "orange": (240, 120, 30), "blue": (50, 110, 210),
}

# --------------------------------------------------------------------------------------
# Cameras: 8 scenes with their own background, light, colour cast, scale and blur
# --------------------------------------------------------------------------------------

CAMERAS: Tuple[CameraSpec, ...] = (
    CameraSpec("street", "brick", ((160, 82, 62), (205, 195, 185)), "paving",
               ((172, 166, 156), (120, 115, 110)), 0.62, 1.0, (1.0, 1.0, 1.0), 1.0, 0.08,
               (0.84, 0.94), 0.3, 2.0, 0.7,
               ("car", "bin", "barrier", "pillar", "tree", "sign", "poster")),
    CameraSpec("mall", "glass", ((175, 192, 205), (110, 128, 150)), "tiles",
               ((212, 206, 196), (178, 168, 158)), 0.66, 1.05, (1.07, 1.0, 0.9), 0.95, -0.05,
               (0.80, 0.90), 0.5, 1.5, 0.3,
               ("counter", "luggage", "boxes", "pillar", "vending", "poster", "sign", "awning")),
    CameraSpec("park", "foliage", ((38, 88, 40), (120, 160, 80)), "paving",
               ((182, 172, 142), (150, 140, 110)), 0.58, 1.08, (0.98, 1.04, 0.95), 1.05, 0.0,
               (0.86, 0.95), 0.2, 2.0, 0.5,
               ("hedge", "tree", "foliage", "barrier", "bin")),
    CameraSpec("night", "windows", ((70, 70, 82), (205, 180, 100)), "asphalt",
               ((62, 62, 68), (200, 200, 200)), 0.60, 0.72, (0.9, 0.95, 1.15), 0.9, 0.0,
               (0.78, 0.88), 0.8, 4.0, 0.6,
               ("car", "bin", "pillar", "wall", "sign")),
    CameraSpec("alley", "brick", ((120, 110, 100), (82, 76, 70)), "asphalt",
               ((102, 100, 100), (220, 200, 60)), 0.70, 0.9, (1.05, 1.0, 0.94), 1.1, -0.1,
               (0.88, 0.97), 0.4, 3.0, 0.4,
               ("boxes", "bin", "wall", "car", "luggage", "awning")),
    CameraSpec("plaza", "panels", ((212, 202, 182), (150, 140, 130)), "paving",
               ((222, 216, 206), (182, 172, 162)), 0.55, 1.12, (1.0, 1.0, 1.0), 1.0, 0.12,
               (0.82, 0.92), 0.0, 1.5, 0.8,
               ("pillar", "poster", "barrier", "bin", "luggage", "foliage")),
    CameraSpec("parking", "plain", ((150, 160, 170), (118, 124, 130)), "asphalt",
               ((90, 90, 95), (235, 235, 235)), 0.50, 0.95, (0.97, 1.0, 1.05), 1.0, 0.05,
               (0.80, 0.90), 0.6, 2.5, 0.5,
               ("car", "barrier", "pillar", "sign", "wall")),
    CameraSpec("station", "panels", ((182, 192, 202), (92, 100, 110)), "tiles",
               ((152, 152, 157), (112, 112, 117)), 0.64, 1.0, (1.0, 1.05, 1.0), 0.9, -0.06,
               (0.84, 0.95), 0.3, 2.0, 0.4,
               ("luggage", "vending", "poster", "pillar", "sign", "counter")),
)

# --------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, c: Sequence[int], amount: int = 10) -> Tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(np.clip(x + dx, 0, 255)) for x, dx in zip(c, d))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, names: Sequence[str], exclude: Sequence[str] = ()) -> str:
    pool = [n for n in names if n not in exclude] or list(names)
    return pool[int(rng.integers(len(pool)))]


def _sample_body(rng: np.random.Generator) -> dict:
    return {
        "skin": _jitter(rng, SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], 6),
        "height": round(float(rng.uniform(0.93, 1.04)), 3),
        "width": round(float(rng.uniform(0.9, 1.12)), 3),
    }


def _sample_upper(rng: np.random.Generator, avoid_color: Sequence[str] = ()) -> Tuple[dict, tuple]:
    """Head, torso garment, sleeves and carried object; returns (fields, signature)."""
    uc = _pick(rng, list(UPPER_COLORS), avoid_color)
    uc2 = _pick(rng, list(UPPER_COLORS), (uc,))
    pattern = ("solid", "solid", "hstripes", "vstripes", "yoke", "check", "logo", "jacket")[
        int(rng.integers(8))]
    sleeve = ("short", "long", "long", "none")[int(rng.integers(4))]
    # a jacket has long sleeves of the jacket colour; other garments keep their colour
    if pattern == "jacket":
        sleeve = "long"
    style = ("short", "short", "long", "shaved", "cap")[int(rng.integers(5))]
    hair = _pick(rng, list(HAIR_COLORS))
    cap = _pick(rng, list(UPPER_COLORS))
    acc = ("none", "none", "backpack", "backpack", "shoulderbag", "handbag")[int(rng.integers(6))]
    accc = _pick(rng, list(ACC_COLORS))
    side = int(rng.choice([-1, 1]))
    fields = {
        "hair_style": style, "hair_color": _jitter(rng, HAIR_COLORS[hair], 6),
        "cap_color": _jitter(rng, UPPER_COLORS[cap]),
        "upper_color": _jitter(rng, UPPER_COLORS[uc]), "upper_color2": _jitter(rng, UPPER_COLORS[uc2]),
        "upper_pattern": pattern, "stripe_period": round(float(rng.uniform(0.04, 0.065)), 4),
        "sleeve": sleeve, "acc_side": side,
        "accessory": acc, "acc_color": _jitter(rng, ACC_COLORS[accc]),
    }
    fields["sleeve_color"] = fields["upper_color"]
    sig = (uc, uc2 if pattern != "solid" else "", pattern, sleeve, style, hair,
           cap if style == "cap" else "", acc, accc if acc != "none" else "")
    return fields, sig


def _sample_lower(rng: np.random.Generator, avoid_color: Sequence[str] = ()) -> Tuple[dict, tuple]:
    """Lower garment and shoes; returns (fields, signature)."""
    lt = ("trousers", "trousers", "trousers", "shorts", "skirt")[int(rng.integers(5))]
    lc = _pick(rng, list(LOWER_COLORS), avoid_color)
    lc2 = _pick(rng, ["white", "black", "red", "yellow"], (lc,))
    lp = "sidestripe" if (lt != "skirt" and rng.random() < 0.25) else "solid"
    shoe = _pick(rng, list(SHOE_COLORS))
    fields = {
        "lower_type": lt, "lower_color": _jitter(rng, LOWER_COLORS[lc]),
        "lower_color2": _jitter(rng, UPPER_COLORS[lc2]), "lower_pattern": lp,
        "shoe_color": _jitter(rng, SHOE_COLORS[shoe], 6),
    }
    return fields, (lt, lc, lc2 if lp != "solid" else "", lp, shoe)


@dataclass(frozen=True)
class Family:
    """Identities that share one half of their outfit.

    ``kind``: ``"shared_upper"`` (same head, torso, sleeves and bag; different lower body),
    ``"shared_lower"`` (same lower garment and shoes; different upper body) or ``"single"``.
    Members of a family also share skin tone and build.
    """

    kind: str
    members: Tuple[int, ...]


def sample_identities(rng: np.random.Generator, n: int, *, family_size: Tuple[int, int] = (2, 4),
                      kind_weights: Sequence[float] = (0.4, 0.4, 0.2),
                      taken: Optional[set] = None) -> Tuple[List[PersonSpec], List[Family]]:
    """Sample ``n`` distinct identities grouped in outfit families.

    Siblings in a ``shared_upper`` family differ ONLY in the lower body (garment type or
    colour, shoes), siblings in a ``shared_lower`` family ONLY in the upper body (garment
    colour, pattern, sleeves, hair, carried object). Hiding one half of the body therefore
    makes siblings hard to tell apart, which is what occluded ReID has to cope with.
    ``taken`` (a set of signatures) keeps identities distinct across calls.
    """
    taken = set() if taken is None else taken
    kinds = ("shared_upper", "shared_lower", "single")
    p = np.asarray(kind_weights, np.float64)
    p = p / p.sum()
    specs: List[PersonSpec] = []
    families: List[Family] = []
    while len(specs) < n:
        left = n - len(specs)
        kind = kinds[int(rng.choice(3, p=p))]
        size = 1 if kind == "single" else int(rng.integers(family_size[0], family_size[1] + 1))
        size = max(1, min(size, left))
        if size == 1:
            kind = "single"
        body = _sample_body(rng)
        up, up_sig = _sample_upper(rng)
        lo, lo_sig = _sample_lower(rng)
        members: List[int] = []
        used_colors: List[str] = []
        for _ in range(size):
            for _attempt in range(50):
                if kind == "shared_upper" and members:
                    lo, lo_sig = _sample_lower(rng, used_colors)
                elif kind == "shared_lower" and members:
                    up, up_sig = _sample_upper(rng, used_colors)
                sig = up_sig + lo_sig + (kind != "single",)
                if sig not in taken:
                    break
            else:  # pragma: no cover - the attribute space is far larger than any preset
                raise RuntimeError("could not sample a distinct identity; attribute space exhausted")
            taken.add(sig)
            used_colors.append(lo_sig[1] if kind == "shared_upper" else up_sig[0])
            members.append(len(specs))
            specs.append(PersonSpec(**body, **up, **lo))
        families.append(Family(kind, tuple(members)))
    return specs, families


# --------------------------------------------------------------------------------------
# The plan: every image to write, fully determined by (preset, seed)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageJob:
    """One box image: who, where, which occlusion, and the seed its pixels come from."""

    split: str
    person: int  # index into the plan's people list
    pid: int
    cam: int  # 1-based
    view: str
    occlusion: str  # holistic | npo | ntp
    side: str  # top | bottom | left | right | ''
    npo_kind: str
    npo_fraction: float
    ntp_person: int  # index into the people list, -1 when not NTP
    seed: int
    frame: int = 0

    @property
    def filename(self) -> str:
        return f"{self.pid:04d}_c{self.cam}_f{self.frame:07d}.jpg"


@dataclass
class Plan:
    people: List[PersonSpec]
    families: List[Tuple[str, List[int]]]  # (kind, pids); pid 0 = NTP pool member
    jobs: List[ImageJob]
    cameras: Tuple[CameraSpec, ...]
    patches: List[Tuple[str, Tuple[int, int], int, int]]  # (kind, (w, h), camera index, seed)
    panorama_seeds: List[int]
    framing: str = "scene"  # Preset.framing
    background_variants: int = 1  # Preset.background_variants


_SIDES = ("top", "bottom", "left", "right")


def _choose_cams(rng: np.random.Generator, k_range: Tuple[int, int], n_cams: int) -> List[int]:
    k = int(rng.integers(k_range[0], min(k_range[1], n_cams) + 1))
    return sorted(int(c) + 1 for c in rng.choice(n_cams, size=k, replace=False))


#: Hair styles of ``appearance="part_cues"`` identities (uniform).
_CUE_HAIR_STYLES = ("short", "long", "shaved", "cap")


def _part_cues(specs: Sequence[PersonSpec], seed: int) -> List[PersonSpec]:
    """Each identity's own head and feet (``Preset.appearance == "part_cues"``): hair style,
    hair colour (a natural base colour, strongly varied), cap colour and shoe colour (any
    colour), from a random stream of their own, so the plan's other draws are unchanged."""
    rng = np.random.default_rng([seed, 0xC0E5])
    bases = list(HAIR_COLORS.values())
    out = []
    for spec in specs:
        style = _CUE_HAIR_STYLES[int(rng.integers(len(_CUE_HAIR_STYLES)))]
        base = np.asarray(bases[int(rng.integers(len(bases)))], np.float64)
        hair = tuple(int(v) for v in np.clip(base + rng.uniform(-45, 45, 3), 0, 255))
        cap = tuple(int(v) for v in rng.integers(0, 256, 3))
        shoe = tuple(int(v) for v in rng.integers(0, 256, 3))
        out.append(replace(spec, hair_style=style, hair_color=hair, cap_color=cap, shoe_color=shoe))
    return out


def _rich_cues(specs: Sequence[PersonSpec], families: Sequence[Family], seed: int,
               salt: int) -> List[PersonSpec]:
    """``Preset.appearance == "rich"``: the head and feet cues of ``part_cues`` plus garment
    textures over torso, sleeves and lower garment, hats, scarves, shoes from trainers to
    boots and a broader build, from a random stream of their own (``salt`` separates the
    train, test and NTP-pool draws).

    Family semantics are kept: a ``shared_upper`` family shares its upper-body texture, a
    ``shared_lower`` family its lower-body texture; heads, hats and scarves are every
    identity's own (real look-alikes still differ there).
    """
    rng = np.random.default_rng([seed, 0x21C4, salt])
    specs = _part_cues(specs, seed * 3 + salt + 1)
    out = list(specs)

    def color() -> Tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]

    def texture() -> Tuple[str, Tuple[int, int, int]]:
        if rng.random() < 0.2:
            return "", (0, 0, 0)
        return TEXTURES[int(rng.integers(len(TEXTURES)))], color()

    def seeded_texture() -> Tuple[str, Tuple[int, int, int], int]:
        return (*texture(), int(rng.integers(0, 2**31 - 1)))

    for fam in families:
        up = seeded_texture() if fam.kind == "shared_upper" else None
        lo = seeded_texture() if fam.kind == "shared_lower" else None
        broad = float(rng.uniform(1.12, 1.3))  # siblings share their build
        for m in fam.members:
            u_tex, u_col, u_seed = up if up is not None else seeded_texture()
            l_tex, l_col, l_seed = lo if lo is not None else seeded_texture()
            hat = HATS[int(rng.integers(len(HATS)))] if rng.random() < 0.35 else ""
            shoes = round(float(rng.choice([1.0, 1.3, 1.6, 2.2])), 2)
            scarf = color() if rng.random() < 0.3 else None
            out[m] = replace(
                specs[m], upper_texture=u_tex, upper_texture_color=u_col, texture_seed=u_seed,
                lower_texture=l_tex, lower_texture_color=l_col, lower_texture_seed=l_seed,
                hat=hat, scarf_color=scarf, shoe_scale=shoes, width=round(specs[m].width * broad, 3))
    return out


def _build_plan(preset: Preset, seed: int) -> Plan:
    rng = np.random.default_rng([seed, 0x5E17_0CC])
    cams = CAMERAS[: preset.num_cameras]
    taken: set = set()
    kw = dict(family_size=preset.family_size, kind_weights=preset.family_kind_weights, taken=taken)
    train_specs, train_fams = sample_identities(rng, preset.num_train_ids, **kw)
    n_test = preset.num_query_ids + preset.num_distractor_ids
    test_specs, test_fams = sample_identities(rng, n_test, **kw)
    pool_specs, _ = sample_identities(rng, preset.ntp_pool_size, family_size=(1, 1),
                                      kind_weights=(0, 0, 1), taken=taken)
    if preset.appearance == "part_cues":  # the NTP pool (non-dataset pedestrians) keeps its outfits
        cued = _part_cues(train_specs + test_specs, seed)
        train_specs, test_specs = cued[: len(train_specs)], cued[len(train_specs):]
    elif preset.appearance == "rich":  # the NTP pool gets textures too (it is drawn the same way)
        train_specs = _rich_cues(train_specs, train_fams, seed, 0)
        test_specs = _rich_cues(test_specs, test_fams, seed, 1)
        pool_specs = _rich_cues(pool_specs, [Family("single", (i,)) for i in range(len(pool_specs))],
                                seed, 2)
    people = train_specs + test_specs + pool_specs
    n_train = len(train_specs)
    test_idx = list(range(n_train, n_train + n_test))
    pool_idx = list(range(n_train + n_test, len(people)))

    # pids: a random permutation of 1..N, so train and test pids interleave as in Duke
    pids_all = rng.permutation(n_train + n_test) + 1
    pid_of = {i: int(pids_all[i]) for i in range(n_train + n_test)}
    distractors = set(int(x) for x in rng.choice(test_idx, size=preset.num_distractor_ids,
                                                 replace=False)) if preset.num_distractor_ids else set()

    side_p = np.asarray(preset.npo_side_weights, np.float64)
    side_p = side_p / side_p.sum()
    jobs: List[ImageJob] = []

    facing_memo: Dict[Tuple[int, int], str] = {}

    def make(split: str, person: int, cam: int, occlusion: str, same_split: Sequence[int]) -> None:
        key = (person, cam)
        if key not in facing_memo:
            facing_memo[key] = "front" if rng.random() < cams[cam - 1].p_front else "back"
        view = facing_memo[key]
        if rng.random() < 0.1:  # the person turned around for a moment
            view = "back" if view == "front" else "front"
        side, kind, frac, ntp = "", "", 0.0, -1
        if occlusion == "npo":
            side = _SIDES[int(rng.choice(4, p=side_p))]
            kinds = [k for k in cams[cam - 1].occluders if side in OCCLUDERS[k][0]]
            if not kinds:
                kinds = sorted(k for k, (sides, _) in OCCLUDERS.items() if side in sides)
            kind = kinds[int(rng.integers(len(kinds)))]
            frac = round(float(rng.uniform(*preset.npo_fraction)), 4)
        elif occlusion == "ntp":
            side = ("left", "right")[int(rng.integers(2))]
            if len(same_split) > 1 and rng.random() < preset.ntp_other_id_ratio:
                ntp = person
                while ntp == person:  # another identity of the same split
                    ntp = int(same_split[int(rng.integers(len(same_split)))])
            else:
                ntp = int(pool_idx[int(rng.integers(len(pool_idx)))])
        jobs.append(ImageJob(split, person, pid_of[person], cam, view, occlusion, side, kind, frac,
                             ntp, int(rng.integers(0, 2**63 - 1))))

    def occ_type(ratio: float) -> str:
        if rng.random() >= ratio:
            return "holistic"
        return "ntp" if rng.random() < preset.ntp_share else "npo"

    train_range = (2, min(4, preset.num_cameras))
    train_people = list(range(n_train))
    for person in train_people:
        pcams = _choose_cams(rng, train_range, preset.num_cameras)
        n = int(rng.integers(preset.train_images_per_id[0], preset.train_images_per_id[1] + 1))
        for k in range(n):
            cam = pcams[k] if k < len(pcams) else pcams[int(rng.integers(len(pcams)))]
            make("train", person, cam, occ_type(preset.train_occluded_ratio), train_people)

    for person in test_idx:
        pcams = _choose_cams(rng, preset.cameras_per_id, preset.num_cameras)
        if person not in distractors:
            extra = int(rng.integers(preset.extra_queries_per_id[0], preset.extra_queries_per_id[1] + 1))
            qtypes = list(OCCLUSION_TYPES) + [OCCLUSION_TYPES[int(rng.integers(3))] for _ in range(extra)]
            for t in qtypes:
                make("query", person, pcams[int(rng.integers(len(pcams)))], t, test_idx)
            lo, hi = preset.gallery_images_per_id
        else:
            lo, hi = preset.distractor_images_per_id
        n = int(rng.integers(lo, hi + 1))
        # the first two gallery images are holistic and in two different cameras, so every
        # query has a cross-camera holistic match; the rest may be occluded distractors
        g0, g1 = rng.choice(pcams, size=2, replace=False)
        for k in range(n):
            cam = int((g0, g1)[k]) if k < 2 else pcams[int(rng.integers(len(pcams)))]
            t = "holistic" if k < 2 else occ_type(preset.gallery_occluded_ratio)
            make("gallery", person, cam, t, test_idx)

    # frame numbers: increasing with random gaps, unique over the whole dataset
    gaps = rng.integers(1, 60, size=len(jobs))
    frames = int(rng.integers(1000, 5000)) + np.cumsum(gaps)
    if frames[-1] > 9_999_999:
        raise ValueError("too many images for 7-digit frame numbers")
    jobs = [replace(j, frame=int(f)) for j, f in zip(jobs, frames)]

    # FED occluder bank: tall (h/w > 2) vertical objects, wide horizontal objects, and
    # a few bare background crops; the first patch is tall and the second wide.
    vertical = sorted(k for k, (s, _) in OCCLUDERS.items() if "left" in s)
    horizontal = sorted(k for k, (s, _) in OCCLUDERS.items() if "left" not in s)
    h, w = preset.image_size
    patches = []
    for i in range(preset.num_occluder_patches):
        r = rng.random()
        tall = i == 0 or (i > 1 and r < 0.4)
        if tall:
            kind = vertical[int(rng.integers(len(vertical)))]
            pw = int(rng.integers(max(4, w // 4), max(5, int(w * 0.6)) + 1))
            size = (pw, h)
        else:
            kind = "background" if (i > 1 and r > 0.85) else horizontal[int(rng.integers(len(horizontal)))]
            size = (w, int(rng.integers(max(4, h // 5), h // 2 + 1)))
        patches.append((kind, size, int(rng.integers(len(cams))), int(rng.integers(0, 2**63 - 1))))

    fams: List[Tuple[str, List[int]]] = []
    for f in train_fams:
        fams.append((f.kind, [pid_of[m] for m in f.members]))
    for f in test_fams:
        fams.append((f.kind, [pid_of[n_train + m] for m in f.members]))
    pano_seeds = [int(rng.integers(0, 2**63 - 1)) for _ in cams]
    if preset.background_variants > 1:  # more scenes per camera, from a stream of their own
        extra = np.random.default_rng([seed, 0xBA6D])
        pano_seeds += [int(extra.integers(0, 2**63 - 1))
                       for _ in range(len(cams) * (preset.background_variants - 1))]
    return Plan(people, fams, jobs, cams, patches, pano_seeds, preset.framing,
                preset.background_variants)


# --------------------------------------------------------------------------------------
# Rendering one image
# --------------------------------------------------------------------------------------


def _render_job(job: ImageJob, plan: Plan, panoramas: List[np.ndarray],
                image_size: Tuple[int, int]) -> Tuple[bytes, float]:
    h, w = image_size
    f = SUPERSAMPLE
    H, W = h * f, w * f
    rng = np.random.default_rng(job.seed)
    cam = plan.cameras[job.cam - 1]
    spec = plan.people[job.person]
    u_feet = float(rng.uniform(0.965, 0.99))
    u_scale = float(rng.uniform(*cam.scale))
    if plan.framing == "detector":  # same draws (the plan's RNG order is untouched), remapped
        u_feet = 0.975 + (u_feet - 0.965) * 0.8  # 0.975-0.995
        lo, hi = cam.scale
        u_scale = 0.93 + (u_scale - lo) / (hi - lo) * 0.06  # 0.93-0.99, every camera
    feet = H * u_feet
    hp = H * u_scale * spec.height
    hp = min(hp, feet - 0.012 * H)
    target = Figure(spec, job.view, float(rng.uniform(0, 2 * math.pi)),
                    W * (0.5 + float(rng.uniform(-0.05, 0.05))), feet, hp)
    npo = ntp = None
    if job.occlusion == "npo":
        npo = (job.npo_kind, job.side, job.npo_fraction, int(rng.integers(0, 2**63 - 1)),
               bool(rng.random() < 0.5))
    elif job.occlusion == "ntp":
        sgn = -1.0 if job.side == "left" else 1.0
        other = plan.people[job.ntp_person]
        ntp = Figure(other, ("front", "back")[int(rng.integers(2))],
                     float(rng.uniform(0, 2 * math.pi)),
                     W * (0.5 + sgn * float(rng.uniform(0.22, 0.42))),
                     feet + H * float(rng.uniform(0.0, 0.05)),
                     hp * float(rng.uniform(1.0, 1.12)))
    pano = panoramas[len(plan.cameras) * _background_variant(job, plan) + job.cam - 1]
    img, frac = render_scene(panorama=pano, camera=cam, target=target, rng=rng,
                             size=(w, h), npo=npo, ntp=ntp)
    return _jpeg_bytes(img), frac


def _background_variant(job: ImageJob, plan: Plan) -> int:
    """Which of its camera's backgrounds an image uses (0 = the camera's own panorama), drawn
    from the image's own seed; panorama ``k * num_cameras + cam - 1`` is variant ``k``."""
    if plan.background_variants == 1:
        return 0
    return int(np.random.default_rng([job.seed, 0xBA6D]).integers(plan.background_variants))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _panoramas(plan: Plan, image_size: Tuple[int, int]) -> List[np.ndarray]:
    h, w = image_size
    n = len(plan.cameras)
    out = [render_panorama(c, np.random.default_rng(s), h * SUPERSAMPLE, w * SUPERSAMPLE * 8)
           for c, s in zip(plan.cameras, plan.panorama_seeds[:n])]
    for k, s in enumerate(plan.panorama_seeds[n:]):  # the variants: the camera's scene kind,
        out.append(render_panorama(_variant_camera(plan.cameras[k % n], s), np.random.default_rng(s),
                                   h * SUPERSAMPLE, w * SUPERSAMPLE * 8))  # other colours
    return out


def _variant_camera(cam: CameraSpec, seed: int) -> CameraSpec:
    """Another part of the same scene: the camera's wall and ground kinds, their colours
    shifted (another shop front, another stretch of street)."""
    rng = np.random.default_rng([seed, 1])

    def shift(c: Tuple[int, int, int]) -> Tuple[int, int, int]:
        f = rng.uniform(0.7, 1.3, 3) * rng.uniform(0.8, 1.2)
        return tuple(int(v) for v in np.clip(np.asarray(c) * f, 0, 255))  # type: ignore[return-value]

    return replace(cam, wall_colors=(shift(cam.wall_colors[0]), shift(cam.wall_colors[1])),
                   ground_colors=(shift(cam.ground_colors[0]), shift(cam.ground_colors[1])),
                   horizon=float(np.clip(cam.horizon + rng.uniform(-0.08, 0.08), 0.4, 0.8)))


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _resolve_preset(preset: Union[str, Preset]) -> Preset:
    if isinstance(preset, Preset):
        return preset
    key = str(preset).lower()
    if key not in PRESETS:
        import difflib

        close = difflib.get_close_matches(key, list(PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OccReIDError(f"unknown SynthOcc preset {preset!r}.{hint} "
                           f"Available: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


def _count_jpgs(folder: Path) -> int:
    return sum(1 for p in folder.glob("*.jpg")) if folder.is_dir() else -1


def _existing(out: Path, preset: Preset, seed: int) -> Tuple[str, str]:
    """('absent'|'empty'|'same'|'other', description) for what ``out`` currently holds."""
    if not out.exists():
        return "absent", ""
    if not out.is_dir():
        return "other", "a file, not a folder"
    entries = list(out.iterdir())
    if not entries:
        return "empty", ""
    info_path = out / "synthocc.json"
    if not info_path.is_file():
        names = ", ".join(sorted(e.name for e in entries)[:5])
        return "other", f"files that are not a complete SynthOcc dataset (no synthocc.json): {names}"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return "other", f"an unreadable synthocc.json ({exc})"
    found = (info.get("version"), info.get("preset"), info.get("seed"))
    if found != (SYNTHOCC_VERSION, preset.name, seed):
        return "other", (f"a SynthOcc dataset with version {found[0]}, preset {found[1]!r}, "
                         f"seed {found[2]} (asked: version {SYNTHOCC_VERSION}, preset "
                         f"{preset.name!r}, seed {seed})")
    if info.get("preset_params") != json.loads(json.dumps(_preset_params(preset))):
        return "other", (f"a SynthOcc dataset of preset {preset.name!r} made with other preset "
                         f"parameters (see preset_params in {info_path})")
    counts = info.get("counts", {})
    for split, folder in SPLIT_DIRS.items():
        if _count_jpgs(out / folder) != counts.get(f"{split}_images"):
            return "other", f"an incomplete SynthOcc dataset ({folder}/ has missing or extra files)"
    if _count_jpgs(out / "occluders") != counts.get("occluder_patches") or \
            not (out / "occlusion_meta.csv").is_file():
        return "other", "an incomplete SynthOcc dataset (occluders/ or occlusion_meta.csv)"
    return "same", ""


def generate_synthocc(out_dir: PathLike, preset: Union[str, Preset] = "demo_rich", seed: int = 0, *,
                      overwrite: bool = False) -> Path:
    """Generate the SynthOcc benchmark into ``out_dir`` (the dataset folder itself).

    Args:
        out_dir: dataset folder; created if missing.
        preset: a name of :data:`PRESETS` (``"demo_rich"``, the representative one, by default;
            ``"tiny"``, ``"demo"``, ``"full"`` and the others), or a
            :class:`Preset` instance.
        seed: random seed; the same preset and seed give byte-identical files.
        overwrite: replace what ``out_dir`` holds. Only SynthOcc's own entries
            (``bounding_box_train/``, ``query/``, ``bounding_box_test/``, ``occluders/``,
            ``occlusion_meta.csv``, ``synthocc.json``) are removed; other files stay.

    Returns:
        ``out_dir`` as a :class:`pathlib.Path`.

    If ``out_dir`` already holds a complete dataset of the same version, preset and seed it
    is reused (nothing is written). If it holds anything else, :class:`OccReIDError` is
    raised unless ``overwrite`` is true.
    """
    p = _resolve_preset(preset)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OccReIDError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    out = Path(out_dir)
    state, what = _existing(out, p, seed)
    if state == "same" and not overwrite:
        logger.info("SynthOcc %s (seed %d) already complete in %s; reusing it", p.name, seed, out)
        return out
    if out.exists() and not out.is_dir():
        raise OccReIDError(f"{out} is a file; expected a dataset folder (or a path to create)")
    if state == "other" and not overwrite:
        raise OccReIDError(
            f"{out} already holds {what}. Expected an empty folder or a SynthOcc dataset with "
            f"preset {p.name!r} and seed {seed}. Pass overwrite=True (occreid synth --overwrite) "
            f"to replace it, or choose another --out folder.")

    plan = _build_plan(p, seed)
    panoramas = _panoramas(plan, p.image_size)
    absolute = out.resolve()
    absolute.parent.mkdir(parents=True, exist_ok=True)
    # staging folder beside the target (same file system, so the final moves are renames)
    stage = absolute.parent / f".{absolute.name}.synthocc-tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    for folder in (*SPLIT_DIRS.values(), "occluders"):
        (stage / folder).mkdir(parents=True)
    logger.info("generating SynthOcc %s (seed %d): %d images in %s", p.name, seed, len(plan.jobs), out)
    rows = []
    try:
        for n, job in enumerate(plan.jobs):
            data, frac = _render_job(job, plan, panoramas, p.image_size)
            (stage / SPLIT_DIRS[job.split] / job.filename).write_bytes(data)
            rows.append((job, frac))
            if (n + 1) % 1000 == 0:
                logger.info("  %d / %d images", n + 1, len(plan.jobs))
        h, w = p.image_size
        for i, (kind, size, ci, s) in enumerate(plan.patches):
            img = render_occluder_patch(kind, s, size, panoramas[ci], plan.cameras[ci],
                                        np.random.default_rng(s))
            (stage / "occluders" / f"{i:03d}_{kind}.jpg").write_bytes(_jpeg_bytes(img))
        meta = _metadata_csv(rows)
        atomic_write_text(meta, stage / "occlusion_meta.csv")
        info = _info(p, seed, plan, rows)
        # move into place; synthocc.json last, it marks the dataset as complete
        out.mkdir(parents=True, exist_ok=True)
        for name in _OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for name in _OWNED[:-1]:
            os.replace(stage / name, out / name)
        atomic_write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", out / "synthocc.json")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info("SynthOcc %s written to %s", p.name, out)
    return out


_SPLIT_ORDER = {"train": 0, "query": 1, "gallery": 2}


def _metadata_csv(rows: List[Tuple[ImageJob, float]]) -> str:
    lines = [META_HEADER]
    for job, frac in sorted(rows, key=lambda r: (_SPLIT_ORDER[r[0].split], r[0].filename)):
        lines.append(f"{job.split},{job.filename},{job.pid},{job.cam},{job.occlusion},"
                     f"{job.side},{frac:.3f}")
    return "\n".join(lines) + "\n"


def _preset_params(p: Preset) -> dict:
    """``asdict(p)`` without the fields added later that are at their old default, so the
    ``synthocc.json`` of an old preset stays byte-identical."""
    d = asdict(p)
    for key, default in NEW_FIELD_DEFAULTS.items():
        if d.get(key) == default:
            del d[key]
    return d


def _info(p: Preset, seed: int, plan: Plan, rows: List[Tuple[ImageJob, float]]) -> dict:
    counts: Dict[str, int] = {}
    occ: Dict[str, Dict[str, int]] = {}
    for split in SPLIT_DIRS:
        js = [j for j, _ in rows if j.split == split]
        counts[f"{split}_images"] = len(js)
        counts[f"{split}_ids"] = len({j.pid for j in js})
        occ[split] = {t: sum(j.occlusion == t for j in js) for t in OCCLUSION_TYPES}
    qp = {j.pid for j, _ in rows if j.split == "query"}
    counts["distractor_ids"] = len({j.pid for j, _ in rows if j.split == "gallery"} - qp)
    counts["occluder_patches"] = len(plan.patches)
    counts["cameras"] = len(plan.cameras)
    return {
        "generator": "occreid.data.synthetic",
        "version": SYNTHOCC_VERSION,
        "preset": p.name,
        "seed": seed,
        "image_size": list(p.image_size),
        "preset_params": _preset_params(p),
        "counts": counts,
        "occlusion_counts": occ,
        "cameras": [{"camid": i + 1, "scene": c.name, "scale": list(c.scale), "blur": c.blur}
                    for i, c in enumerate(plan.cameras)],
        "families": [{"kind": k, "pids": pids} for k, pids in plan.families],
    }


# --------------------------------------------------------------------------------------
# Preview contact sheet
# --------------------------------------------------------------------------------------


def _read_meta(dataset: Path) -> List[dict]:
    path = dataset / "occlusion_meta.csv"
    if not path.is_file():
        raise OccReIDError(f"{path} not found: expected a SynthOcc dataset folder (made by "
                           f"`occreid synth --out DIR`); run the generator first")
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def save_preview_grid(dataset_dir: PathLike, out_png: PathLike, *, rows: int = 6, cols: int = 10,
                      seed: int = 0) -> Path:
    """Write a contact sheet of test identities to ``out_png``.

    Each row is one test identity (siblings of an outfit family on adjacent rows): first its
    holistic gallery views (label ``G``), then its holistic / NPO / NTP queries (label ``Q``),
    each tile labelled with pid, camera and occlusion type (with the covered fraction).
    """
    if rows < 1 or cols < 2:
        raise OccReIDError(f"preview grid needs rows >= 1 and cols >= 2, got rows={rows}, cols={cols}")
    dataset = Path(dataset_dir)
    meta = _read_meta(dataset)
    families: List[Tuple[str, List[int]]] = []
    info_path = dataset / "synthocc.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        families = [(f["kind"], list(f["pids"])) for f in info.get("families", [])]
    by_pid: Dict[int, Dict[str, List[dict]]] = {}
    for r in meta:
        if r["split"] in ("query", "gallery"):
            by_pid.setdefault(int(r["pid"]), {"query": [], "gallery": []})[r["split"]].append(r)
    qpids = sorted(p for p, d in by_pid.items() if d["query"])
    if not qpids:
        raise OccReIDError(f"{dataset}: no query images listed in occlusion_meta.csv")
    rng = np.random.default_rng(seed)
    kind_of = {}
    order: List[int] = []
    fams = [(k, [p for p in pids if p in by_pid and by_pid[p]["query"]]) for k, pids in families]
    fams = [f for f in fams if f[1]]
    for i in rng.permutation(len(fams)):
        k, pids = fams[int(i)]
        for p in pids:
            kind_of[p] = k
        order.extend(pids)
    order += [p for p in rng.permutation(qpids).tolist() if p not in set(order)]
    chosen = order[:rows]

    scale = 2
    f = _font(11)
    tile_w, tile_h, lab = 64 * scale, 128 * scale, 28
    head = 22
    sheet = Image.new("RGB", (cols * tile_w + (cols - 1) * 2, head + rows * (tile_h + lab + 4)),
                      (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    d.text((4, 4), f"SynthOcc preview: {dataset.name}  (G = gallery, Q = query; "
                   f"rows = test ids, siblings adjacent)", fill=(0, 0, 0), font=f)
    type_rank = {"holistic": 0, "npo": 1, "ntp": 2}
    colors = {"holistic": (20, 120, 20), "npo": (200, 90, 0), "ntp": (180, 0, 40)}
    for r_i, pid in enumerate(chosen):
        qs = sorted(by_pid[pid]["query"], key=lambda r: (type_rank[r["occlusion"]], r["filename"]))
        gs = sorted(by_pid[pid]["gallery"], key=lambda r: (r["occlusion"] != "holistic", r["filename"]))
        n_q = min(len(qs), cols - 1)
        tiles = [("G", g) for g in gs[: cols - n_q]] + [("Q", q) for q in qs[:n_q]]
        y = head + r_i * (tile_h + lab + 4)
        for c_i, (tag, r) in enumerate(tiles):
            x = c_i * (tile_w + 2)
            path = dataset / SPLIT_DIRS[r["split"]] / r["filename"]
            with Image.open(path) as im:
                sheet.paste(im.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x, y))
            occ = r["occlusion"]
            extra = f" {r['side']} {float(r['fraction']):.2f}" if occ != "holistic" else ""
            d.text((x + 2, y + tile_h + 1), f"{tag} {pid:04d} c{r['camid']}", fill=(0, 0, 0), font=f)
            d.text((x + 2, y + tile_h + 14), f"{occ}{extra}", fill=colors[occ], font=f)
        if pid in kind_of and kind_of[pid] != "single":
            txt = kind_of[pid].replace("_", " ")
            d.rectangle([0, y, d.textlength(txt, font=f) + 4, y + 13], fill=(255, 255, 255))
            d.text((2, y), txt, fill=(60, 60, 60), font=f)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out
