"""Procedural drawing for SynthOcc: pedestrians, camera backgrounds, occluders, scenes.

Everything is drawn with numpy and ``PIL.ImageDraw`` (no downloaded assets) at
``SUPERSAMPLE`` times the output resolution and reduced with a box filter, so edges are
anti-aliased. All randomness comes from the ``numpy.random.Generator`` passed in, so a
scene is a pure function of its arguments (byte-identical JPEGs for the same seed).

Coordinates
-----------
A pedestrian is described in *body units*: ``v`` runs from 0 (top of the head) to 1 (sole
of the shoes), ``u`` is the horizontal offset from the body axis in units of the body
height (positive = image right in a front view). :func:`draw_person` maps body units to
pixels given the feet position and the pixel height of the person.

Occlusion cases follow the FED paper (Fig. 1):

* **NPO** (non-pedestrian occlusion): an object pasted at the top, bottom, left or right of
  the box. Horizontal occluders (cars, bins, hedges, barriers, luggage, counters at the
  bottom; foliage, awnings, sign boards at the top) span the full box width; vertical
  occluders (pillars, trees, vending machines, wall edges, poster boards) span the full
  box height. Their size is chosen so that the pasted pixels cover a target fraction of
  the box (a quarter to a half).
* **NTP** (non-target pedestrian): another procedurally drawn person standing in front of
  the target, slightly closer to the camera, shifted to the left or right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

RGB = Tuple[int, int, int]

#: Drawing resolution factor (scenes are drawn at ``SUPERSAMPLE`` x the saved size).
SUPERSAMPLE = 2

# --------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------

HAIR_STYLES = ("short", "long", "shaved", "cap")
UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "yoke", "check", "logo", "jacket")
SLEEVES = ("short", "long", "none")
LOWER_TYPES = ("trousers", "shorts", "skirt")
LOWER_PATTERNS = ("solid", "sidestripe")
ACCESSORIES = ("none", "backpack", "shoulderbag", "handbag")
#: Garment textures of ``appearance="rich"`` identities ("" = none, the original look).
TEXTURES = ("noise", "diag", "plaid", "dots", "blocks")
#: Headwear of ``appearance="rich"`` identities ("" = none).
HATS = ("beanie", "brim", "hood")

#: PersonSpec fields that make up the upper-body outfit (head, torso, arms, carried bag).
UPPER_FIELDS = (
    "hair_style", "hair_color", "cap_color", "upper_color", "upper_color2", "upper_pattern",
    "stripe_period", "sleeve", "sleeve_color", "accessory", "acc_color", "acc_side",
    "upper_texture", "upper_texture_color", "texture_seed", "hat", "scarf_color",
)
#: PersonSpec fields that make up the lower-body outfit (lower garment, shoes).
LOWER_FIELDS = ("lower_type", "lower_color", "lower_color2", "lower_pattern", "shoe_color",
                "lower_texture", "lower_texture_color", "lower_texture_seed", "shoe_scale")


@dataclass(frozen=True)
class PersonSpec:
    """Appearance of one pedestrian (one identity): body build, head, outfit, carried bag.

    ``acc_side`` is +1 when a shoulder bag / handbag hangs on the image-right side in a
    front view (it is mirrored in a back view).
    """

    skin: RGB
    height: float  # relative body height (build)
    width: float  # relative body width (build)
    hair_style: str
    hair_color: RGB
    cap_color: RGB
    upper_color: RGB
    upper_color2: RGB
    upper_pattern: str
    stripe_period: float  # body units
    sleeve: str
    sleeve_color: RGB
    lower_type: str
    lower_color: RGB
    lower_color2: RGB
    lower_pattern: str
    shoe_color: RGB
    accessory: str
    acc_color: RGB
    acc_side: int
    # --- added for issue #13 (``appearance="rich"``); the defaults draw the original look
    upper_texture: str = ""  # one of TEXTURES over torso and sleeves, or ""
    upper_texture_color: RGB = (0, 0, 0)
    lower_texture: str = ""  # one of TEXTURES over the lower garment, or ""
    lower_texture_color: RGB = (0, 0, 0)
    texture_seed: int = 0  # fixes the upper texture's geometry (period, angle, noise field)
    lower_texture_seed: int = 0  # the same for the lower texture
    hat: str = ""  # one of HATS, or "" (hair_style then decides the head)
    scarf_color: Optional[RGB] = None  # a scarf round the neck and shoulders, or None
    shoe_scale: float = 1.0  # shoe size (> 1: larger shoes and boots up the shin)


@dataclass(frozen=True)
class CameraSpec:
    """One synthetic camera: its scene (background), lighting and optics.

    ``scale`` is the range of person height relative to the box height, ``blur`` the
    Gaussian blur radius in output pixels, ``noise`` the sensor noise std (0-255 scale),
    ``p_front`` the probability that a person walks towards this camera (front view),
    ``occluders`` the NPO object kinds that occur in this scene.
    """

    name: str
    wall: str  # brick | panels | windows | foliage | glass | plain
    wall_colors: Tuple[RGB, RGB]
    ground: str  # paving | asphalt | grass | tiles
    ground_colors: Tuple[RGB, RGB]
    horizon: float  # fraction of the box height where the wall meets the ground
    gain: float
    cast: Tuple[float, float, float]
    contrast: float
    side_light: float  # brightness slope from left (-) to right (+)
    scale: Tuple[float, float]
    blur: float
    noise: float
    p_front: float
    occluders: Tuple[str, ...]


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _shade(c: Sequence[int], f: float) -> RGB:
    """Multiply a colour by ``f`` (darker < 1 < lighter), clipped to 0..255."""
    return tuple(int(max(0, min(255, round(x * f)))) for x in c)  # type: ignore[return-value]


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> RGB:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _rgba(c: Sequence[int], a: int = 255) -> Tuple[int, int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]), a)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1] of shape (h, w): random values on a ``cell``-pixel lattice,
    bicubically interpolated."""
    gh, gw = h // cell + 3, w // cell + 3
    small = (rng.random((gh, gw)) * 255).astype(np.uint8)
    big = Image.fromarray(small, "L").resize((gw * cell, gh * cell), Image.BICUBIC)
    arr = np.asarray(big, dtype=np.float32)[cell : cell + h, cell : cell + w] / 255.0
    return arr


def _blend(c1: Sequence[int], c2: Sequence[int], t: np.ndarray) -> np.ndarray:
    """Per-pixel mix of two colours by weight map ``t`` (h, w) -> (h, w, 3) float32."""
    a = np.asarray(c1, np.float32)
    b = np.asarray(c2, np.float32)
    return a + (b - a) * t[..., None]


def _limb(draw: ImageDraw.ImageDraw, p0, p1, w0: float, w1: float, fill) -> None:
    """A tapered limb segment from p0 (width w0) to p1 (width w1), with rounded ends."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    n = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / n, dx / n
    h0, h1 = w0 / 2, w1 / 2
    draw.polygon(
        [(x0 + nx * h0, y0 + ny * h0), (x1 + nx * h1, y1 + ny * h1),
         (x1 - nx * h1, y1 - ny * h1), (x0 - nx * h0, y0 - ny * h0)],
        fill=fill,
    )
    draw.ellipse([x0 - h0, y0 - h0, x0 + h0, y0 + h0], fill=fill)
    draw.ellipse([x1 - h1, y1 - h1, x1 + h1, y1 + h1], fill=fill)


# --------------------------------------------------------------------------------------
# Pedestrians
# --------------------------------------------------------------------------------------


def _pattern_layer(spec: PersonSpec, view: str, size: Tuple[int, int], P: Callable,
                   hp: float, cx: float) -> Optional[Image.Image]:
    """RGBA layer (canvas size) with the torso pattern, or None for a solid garment."""
    pat = spec.upper_pattern
    if pat == "solid" or (view == "back" and pat in ("logo", "jacket")):
        return None
    w, h = size
    c1 = np.asarray(spec.upper_color, np.float32)
    c2 = np.asarray(spec.upper_color2, np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    top = P(0, 0)[1]
    period = max(3.0, spec.stripe_period * hp)
    if pat == "hstripes":
        t = (((ys - top) / period) % 1.0 < 0.5).astype(np.float32) * np.ones_like(xs)
    elif pat == "vstripes":
        t = (((xs - cx) / period + 0.25) % 1.0 < 0.5).astype(np.float32) * np.ones_like(ys)
    elif pat == "check":
        a = ((ys - top) / period).astype(np.int32) + ((xs - cx) / period + 100).astype(np.int32)
        t = (a % 2 == 0).astype(np.float32)
    elif pat == "yoke":
        t = (ys < P(0, 0.285)[1]).astype(np.float32) * np.ones_like(xs)
    elif pat == "logo":
        (lx, ly), r = P(0, 0.29), 0.045 * hp
        t = (((xs - lx) ** 2 + (ys - ly) ** 2) < r * r).astype(np.float32)
    elif pat == "jacket":  # open jacket: inner shirt visible in the middle (front only)
        half = 0.032 * hp * spec.width
        t = ((np.abs(xs - cx) < half) & (ys > P(0, 0.18)[1])).astype(np.float32)
    else:
        raise ValueError(f"unknown upper pattern {pat!r}")
    rgb = c1 + (c2 - c1) * t[..., None]
    arr = np.concatenate([rgb, np.full((h, w, 1), 255, np.float32)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGBA")


def _texture_weight(kind: str, seed: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of the texture colour at body coordinates ``(u, v)``.

    The geometry (period, angle, noise field, split) comes from ``seed`` alone and is laid out
    in body units, so a texture moves and scales with the person and is the same garment in
    every image of the identity.
    """
    rng = np.random.default_rng([int(seed), 0x7E47])
    period = float(rng.uniform(0.035, 0.075))
    if kind == "noise":  # blotches (camouflage, washed denim, floral prints)
        gh, gw = 18, 8  # lattice over v in [0, 1], u in [-0.2, 0.2]
        grid = rng.random((gh + 1, gw + 1)).astype(np.float32)
        gy = np.clip(v, 0, 1) * gh
        gx = np.clip((u + 0.2) / 0.4, 0, 1) * gw
        y0 = np.minimum(gy.astype(np.int64), gh - 1)
        x0 = np.minimum(gx.astype(np.int64), gw - 1)
        fy, fx = gy - y0, gx - x0
        val = (grid[y0, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1, x0] * fy * (1 - fx)
               + grid[y0, x0 + 1] * (1 - fy) * fx + grid[y0 + 1, x0 + 1] * fy * fx)
        return np.clip((val - 0.45) * 6.0, 0, 1)
    if kind == "diag":
        angle = float(rng.uniform(0.35, 1.2)) * float(rng.choice([-1, 1]))
        t = (u * math.cos(angle) + v * math.sin(angle)) / period
        return ((t % 1.0) < 0.45).astype(np.float32)
    if kind == "plaid":
        a = ((u / period) % 1.0) < 0.28
        b = ((v / period) % 1.0) < 0.28
        return np.maximum(a, b).astype(np.float32) * np.where(a & b, 1.0, 0.75).astype(np.float32)
    if kind == "dots":
        p = period * 1.3
        du = (u / p) % 1.0 - 0.5
        dv = (v / p + 0.5 * (np.floor(u / p) % 2)) % 1.0 - 0.5
        return ((du * du + dv * dv) < 0.07).astype(np.float32)
    if kind == "blocks":  # colour blocking: a contrasting side panel or band
        if rng.random() < 0.5:
            return (u > float(rng.uniform(-0.04, 0.04))).astype(np.float32)
        lo = float(rng.uniform(0.22, 0.38))
        return ((v > lo) & (v < lo + float(rng.uniform(0.05, 0.12)))
                | (v > 0.62 + lo * 0.3)).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}; known: {TEXTURES}")


def _apply_textures(layer: Image.Image, spec: PersonSpec, cx: float, top: float,
                    hp: float) -> Image.Image:
    """Re-colour the garment pixels (exactly the garment's fill colour) with their texture."""
    arr = np.asarray(layer).copy()
    ys, xs = np.mgrid[0 : arr.shape[0], 0 : arr.shape[1]].astype(np.float32)
    u = (xs - cx) / (hp * spec.width)
    v = (ys - top) / hp
    opaque = arr[..., 3] == 255
    for kind, base, color, seed in (
            (spec.upper_texture, spec.upper_color, spec.upper_texture_color, spec.texture_seed),
            (spec.lower_texture, spec.lower_color, spec.lower_texture_color,
             spec.lower_texture_seed)):
        if not kind:
            continue
        m = opaque & np.all(arr[..., :3] == np.asarray(base, np.uint8), axis=-1)
        if not m.any():
            continue
        t = _texture_weight(kind, seed, u[m], v[m])[:, None]
        c0 = np.asarray(base, np.float32)
        c1 = np.asarray(color, np.float32)
        arr[..., :3][m] = np.clip(c0 + (c1 - c0) * t + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGBA")


def _draw_headwear(d: ImageDraw.ImageDraw, spec: PersonSpec, P: Callable, L: Callable,
                   front: bool) -> None:
    """Hats (``spec.hat``) over the head drawn by :func:`draw_person`."""
    hat = _rgba(spec.cap_color)
    band = _rgba(_shade(spec.cap_color, 0.7))
    hx0, hy0 = P(-0.05, 0.008)
    hx1, _ = P(0.05, 0.145)
    if spec.hat == "beanie":
        d.chord([hx0 - L(0.01), hy0 - L(0.02), hx1 + L(0.01), hy0 + L(0.1)], 180, 360, fill=hat)
        d.rectangle([hx0 - L(0.01), hy0 + L(0.035), hx1 + L(0.01), hy0 + L(0.052)], fill=band)
    elif spec.hat == "brim":
        d.chord([hx0 + L(0.002), hy0 - L(0.035), hx1 - L(0.002), hy0 + L(0.07)], 180, 360, fill=hat)
        bx0, by0 = P(-0.092, 0.024)
        bx1, by1 = P(0.092, 0.046)
        d.ellipse([bx0, by0, bx1, by1], fill=band)
    elif spec.hat == "hood":  # the hood frames the face in front and covers the head behind
        x0, y0 = P(-0.07, -0.004)
        x1, y1 = P(0.07, 0.19)
        if front:
            d.ellipse([x0, y0, x1, y1], outline=hat, width=max(1, int(L(0.024))))
            d.chord([x0, y0, x1, y1], 180, 360, fill=hat)
            d.ellipse([hx0 + L(0.006), hy0 + L(0.04), hx1 - L(0.006), P(0, 0.145)[1]],
                      fill=_rgba(spec.skin))
            for i in (-1, 1):
                ex, ey = P(i * 0.019, 0.082)
                er = L(0.0065)
                d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=_rgba((40, 30, 30)))
        else:
            d.ellipse([x0, y0, x1, y1], fill=hat)
    elif spec.hat:
        raise ValueError(f"unknown hat {spec.hat!r}; known: {HATS}")


def _draw_scarf(d: ImageDraw.ImageDraw, spec: PersonSpec, P: Callable, L: Callable,
                front: bool) -> None:
    c = _rgba(spec.scarf_color)  # type: ignore[arg-type]
    d.rounded_rectangle([*P(-0.085, 0.14), *P(0.085, 0.205)], radius=L(0.02), fill=c)
    if front:
        d.rectangle([*P(0.018, 0.19), *P(0.05, 0.33)], fill=c)
        d.rectangle([*P(0.018, 0.31), *P(0.05, 0.33)], fill=_rgba(_shade(spec.scarf_color, 0.7)))


def draw_person(layer: Image.Image, spec: PersonSpec, *, view: str, phase: float,
                cx: float, feet_y: float, height: float) -> None:
    """Draw one pedestrian onto an RGBA ``layer`` (in place).

    Args:
        layer: RGBA image (usually transparent) the person is drawn on.
        spec: the identity's appearance.
        view: ``"front"`` (walking towards the camera) or ``"back"``.
        phase: walking phase in radians; legs and arms swing with ``sin(phase)``.
        cx, feet_y: pixel position of the body axis and of the soles.
        height: person height in pixels (head top to soles).
    """
    if view not in ("front", "back"):
        raise ValueError(f"view must be 'front' or 'back', got {view!r}")
    d = ImageDraw.Draw(layer)
    hp = float(height)
    bw = float(spec.width)
    top = feet_y - hp
    front = view == "front"

    def P(u: float, v: float) -> Tuple[float, float]:
        return (cx + u * hp * bw, top + v * hp)

    def L(x: float) -> float:  # a length in body units -> pixels
        return x * hp * bw

    s = math.sin(phase)
    skin = _rgba(spec.skin)
    hair = _rgba(spec.hair_color)
    upper = _rgba(spec.upper_color)
    lower = _rgba(spec.lower_color)
    shoe = _rgba(spec.shoe_color)
    acc = _rgba(spec.acc_color)
    acc_dark = _rgba(_shade(spec.acc_color, 0.7))
    side = spec.acc_side if front else -spec.acc_side

    # --- long hair falls behind the shoulders (front view: visible beside the neck)
    if spec.hair_style == "long" and front:
        x0, y0 = P(-0.066, 0.05)
        x1, y1 = P(0.066, 0.235)
        d.rounded_rectangle([x0, y0, x1, y1], radius=L(0.03), fill=hair)

    # --- legs (hip -> knee -> ankle), lower garment, shoes
    legs = []
    for i in (-1, 1):
        lift = 0.05 * max(0.0, i * s)  # the swinging foot is off the ground
        hip = P(i * 0.05, 0.50)
        knee = P(i * (0.054 + 0.3 * lift), 0.72 - 0.45 * lift)
        ankle = P(i * (0.05 + 0.03 * abs(s)) - i * 0.2 * lift, 0.945 - lift)
        legs.append((i, hip, knee, ankle, lift))
    leg_cover = {"trousers": 1.0, "shorts": 0.34, "skirt": 0.0}[spec.lower_type]
    for i, hip, knee, ankle, lift in legs:
        _limb(d, hip, knee, L(0.078), L(0.060), skin)
        _limb(d, knee, ankle, L(0.060), L(0.046), skin)
        if leg_cover > 0:
            if leg_cover >= 1.0:
                _limb(d, hip, knee, L(0.084), L(0.066), lower)
                _limb(d, knee, ankle, L(0.066), L(0.054), lower)
                if spec.lower_pattern == "sidestripe":
                    off = i * L(0.030)
                    d.line([(hip[0] + off * 1.2, hip[1]), (knee[0] + off, knee[1]),
                            (ankle[0] + off * 0.8, ankle[1] - L(0.01))],
                           fill=_rgba(spec.lower_color2), width=max(1, int(L(0.016))))
            else:
                end = (hip[0] + (knee[0] - hip[0]) * 0.75, hip[1] + (knee[1] - hip[1]) * 0.75)
                _limb(d, hip, end, L(0.088), L(0.076), lower)
        sx, sy = ankle
        k = spec.shoe_scale  # 1 = trainers; larger = boots reaching up the shin
        d.rounded_rectangle([sx - L(0.036 * min(k, 1.25)), sy - L(0.012 + 0.06 * (k - 1)),
                             sx + L(0.036 * min(k, 1.25)), sy + L(0.052)],
                            radius=L(0.018), fill=shoe)
    # pelvis / skirt
    if spec.lower_type == "skirt":
        d.polygon([P(-0.098, 0.47), P(0.098, 0.47), P(0.14, 0.70), P(-0.14, 0.70)], fill=lower)
    else:
        d.polygon([P(-0.104, 0.47), P(0.104, 0.47), P(0.108, 0.565), P(0.0, 0.585),
                   P(-0.108, 0.565)], fill=lower)
        if spec.lower_pattern == "sidestripe" and spec.lower_type == "shorts":
            for i in (-1, 1):
                x, y = P(i * 0.102, 0.50)
                d.line([(x, y), (x, P(0, 0.62)[1])], fill=_rgba(spec.lower_color2),
                       width=max(1, int(L(0.016))))

    # --- torso (with garment pattern)
    torso = [P(-0.095, 0.168), P(0.095, 0.168), P(0.128, 0.19), P(0.118, 0.28), P(0.102, 0.40),
             P(0.106, 0.51), P(-0.106, 0.51), P(-0.102, 0.40), P(-0.118, 0.28), P(-0.128, 0.19)]
    if spec.sleeve == "none":  # sleeveless: narrower shoulders, skin visible
        torso[2], torso[9] = P(0.112, 0.19), P(-0.112, 0.19)
    pattern = _pattern_layer(spec, view, layer.size, P, hp, cx)
    if pattern is None:
        d.polygon(torso, fill=upper)
    else:
        mask = Image.new("L", layer.size, 0)
        ImageDraw.Draw(mask).polygon(torso, fill=255)
        layer.paste(pattern, (0, 0), mask)
        d = ImageDraw.Draw(layer)

    # --- arms (swing opposite to the same-side leg); sleeves; hands
    sleeve = _rgba(spec.sleeve_color)
    for i in (-1, 1):
        a = -i * s
        fwd = max(0.0, a)
        shoulder = P(i * 0.112, 0.198)
        elbow = P(i * (0.132 + 0.01 * a), 0.345 - 0.025 * fwd)
        wrist = P(i * (0.138 + 0.022 * a), 0.50 - 0.05 * fwd)
        _limb(d, shoulder, elbow, L(0.050), L(0.042), skin)
        _limb(d, elbow, wrist, L(0.042), L(0.036), skin)
        if spec.sleeve == "long":
            _limb(d, shoulder, elbow, L(0.054), L(0.046), sleeve)
            _limb(d, elbow, wrist, L(0.046), L(0.040), sleeve)
        elif spec.sleeve == "short":
            mid = (shoulder[0] + (elbow[0] - shoulder[0]) * 0.55,
                   shoulder[1] + (elbow[1] - shoulder[1]) * 0.55)
            _limb(d, shoulder, mid, L(0.058), L(0.052), sleeve)
        r = L(0.022)
        d.ellipse([wrist[0] - r, wrist[1] - r * 0.6, wrist[0] + r, wrist[1] + r * 1.4], fill=skin)
        if spec.accessory == "handbag" and i == side:
            hx, hy = wrist[0], wrist[1] + r
            d.line([(hx - L(0.02), hy + L(0.035)), (hx, hy), (hx + L(0.02), hy + L(0.035))],
                   fill=acc_dark, width=max(1, int(L(0.008))))
            d.rounded_rectangle([hx - L(0.045), hy + L(0.03), hx + L(0.045), hy + L(0.12)],
                                radius=L(0.012), fill=acc)

    # --- neck and head
    nx0, ny0 = P(-0.024, 0.125)
    nx1, ny1 = P(0.024, 0.18)
    d.rectangle([nx0, ny0, nx1, ny1], fill=skin)
    hx0, hy0 = P(-0.05, 0.008)
    hx1, hy1 = P(0.05, 0.145)
    style = spec.hair_style
    if front:
        if style == "cap":
            d.ellipse([hx0, hy0 + L(0.02), hx1, hy1], fill=skin)
            d.chord([hx0 - L(0.004), hy0 - L(0.004), hx1 + L(0.004), hy0 + L(0.09)], 180, 360,
                    fill=_rgba(spec.cap_color))
            bx0, by0 = P(-0.058, 0.048)
            bx1, by1 = P(0.058, 0.062)
            d.rectangle([bx0, by0, bx1, by1], fill=_rgba(_shade(spec.cap_color, 0.75)))
        else:
            d.ellipse([hx0 - L(0.004), hy0 - L(0.006), hx1 + L(0.004), hy0 + L(0.11)], fill=hair)
            d.ellipse([hx0 + L(0.004), hy0 + L(0.028), hx1 - L(0.004), hy1], fill=skin)
            if style == "shaved":  # stubble: the hair cap is barely visible
                d.ellipse([hx0, hy0 + L(0.004), hx1, hy0 + L(0.05)],
                          fill=_rgba(_mix(spec.skin, spec.hair_color, 0.55)))
                d.ellipse([hx0 + L(0.004), hy0 + L(0.022), hx1 - L(0.004), hy1], fill=skin)
        eye = _rgba((40, 30, 30))
        for i in (-1, 1):
            ex, ey = P(i * 0.019, 0.082)
            er = L(0.0065)
            d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=eye)
    else:
        if style == "cap":
            d.ellipse([hx0, hy0 + L(0.02), hx1, hy1], fill=hair)
            d.chord([hx0 - L(0.004), hy0 - L(0.004), hx1 + L(0.004), hy0 + L(0.09)], 180, 360,
                    fill=_rgba(spec.cap_color))
        elif style == "shaved":
            d.ellipse([hx0, hy0, hx1, hy1], fill=_rgba(_mix(spec.skin, spec.hair_color, 0.55)))
        elif style == "long":
            x0, y0 = P(-0.064, 0.0)
            x1, y1 = P(0.064, 0.27)
            d.rounded_rectangle([x0, y0, x1, y1], radius=L(0.05), fill=hair)
        else:
            d.ellipse([hx0 - L(0.003), hy0 - L(0.004), hx1 + L(0.003), hy1 - L(0.006)], fill=hair)

    # --- carried objects
    if spec.accessory == "backpack":
        if front:  # only the straps
            for i in (-1, 1):
                d.line([P(i * 0.072, 0.175), P(i * 0.082, 0.30), P(i * 0.092, 0.375)],
                       fill=acc_dark, width=max(1, int(L(0.024))))
        else:  # the bag itself covers most of the back
            x0, y0 = P(-0.092, 0.195)
            x1, y1 = P(0.092, 0.445)
            d.rounded_rectangle([x0, y0, x1, y1], radius=L(0.03), fill=acc)
            x0, y0 = P(-0.07, 0.33)
            x1, y1 = P(0.07, 0.43)
            d.rounded_rectangle([x0, y0, x1, y1], radius=L(0.02), fill=acc_dark)
    elif spec.accessory == "shoulderbag":
        d.line([P(side * 0.085, 0.172), P(-side * 0.10, 0.46)], fill=acc_dark,
               width=max(1, int(L(0.016))))
        x0, y0 = P(-side * 0.165, 0.43)
        x1, y1 = P(-side * 0.065, 0.53)
        d.rounded_rectangle([min(x0, x1), y0, max(x0, x1), y1], radius=L(0.012), fill=acc)

    # --- issue #13 cues (appearance "rich"): textures, scarf, headwear
    if spec.upper_texture or spec.lower_texture:
        layer.paste(_apply_textures(layer, spec, cx, top, hp))
        d = ImageDraw.Draw(layer)
    if spec.scarf_color is not None:
        _draw_scarf(d, spec, P, L, front)
    if spec.hat:
        _draw_headwear(d, spec, P, L, front)


# --------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------


def _wall(kind: str, rng: np.random.Generator, h: int, w: int, c1: RGB, c2: RGB) -> np.ndarray:
    ys = np.arange(h)[:, None]
    xs = np.arange(w)[None, :]
    if kind == "brick":
        bh, bwid = 14, 30
        row = ys // bh
        off = (row % 2) * (bwid // 2)
        col = (xs + off) // bwid
        shade = rng.normal(1.0, 0.07, (h // bh + 2, w // bwid + 3)).astype(np.float32)
        f = shade[row, col]
        img = np.asarray(c1, np.float32)[None, None] * f[..., None]
        mortar = ((ys % bh) < 2) | (((xs + off) % bwid) < 2)
        img = np.where(mortar[..., None], np.asarray(c2, np.float32), img)
    elif kind == "panels":
        pw = int(rng.integers(40, 66))
        col = xs // pw
        shade = rng.normal(1.0, 0.05, (w // pw + 2,)).astype(np.float32)[col]
        grad = (1.05 - 0.15 * ys / h).astype(np.float32)
        img = np.asarray(c1, np.float32)[None, None] * (shade * grad)[..., None]
        seam = (xs % pw) < 3
        img = np.where(seam[..., None] & np.ones((h, 1, 1), bool), np.asarray(c2, np.float32), img)
    elif kind == "windows":
        img = np.broadcast_to(np.asarray(c1, np.float32), (h, w, 3)).copy()
        sx, sy = 46, 58
        wx, wy = 28, 36
        inx = (xs % sx) >= (sx - wx) // 2
        inx &= (xs % sx) < (sx + wx) // 2
        iny = ((ys + 10) % sy) >= 6
        iny &= ((ys + 10) % sy) < 6 + wy
        win = inx & iny
        refl = 0.75 + 0.35 * (((xs + ys) % 40) < 8)
        glass = np.asarray(c2, np.float32)[None, None] * refl[..., None]
        img = np.where(win[..., None], glass, img)
    elif kind == "foliage":
        n = 0.6 * smooth_noise(rng, h, w, 24) + 0.4 * smooth_noise(rng, h, w, 7)
        img = _blend(c1, c2, np.clip((n - 0.3) * 2.0, 0, 1))
    elif kind == "glass":
        grad = (ys / h).astype(np.float32) * np.ones((1, w), np.float32)
        img = _blend(c1, c2, grad)
        streak = (((xs * 2 + ys) % 70) < 10).astype(np.float32)
        img = img * (1 + 0.25 * streak[..., None])
        mull = (xs % 52) < 4
        img = np.where(mull[..., None] & np.ones((h, 1, 1), bool),
                       np.asarray(_shade(c1, 0.45), np.float32), img)
    elif kind == "plain":
        grad = (ys / h).astype(np.float32) * np.ones((1, w), np.float32)
        img = _blend(c1, c2, grad)
        img = img * (0.94 + 0.12 * smooth_noise(rng, h, w, 40))[..., None]
    else:
        raise ValueError(f"unknown wall kind {kind!r}")
    return img.astype(np.float32)


def _ground(kind: str, rng: np.random.Generator, h: int, w: int, c1: RGB, c2: RGB) -> np.ndarray:
    ys = np.arange(h)[:, None].astype(np.float32)
    xs = np.arange(w)[None, :].astype(np.float32)
    depth = (ys + 6.0) / (h + 6.0)  # 0 far (horizon) .. 1 near
    if kind == "paving" or kind == "tiles":
        rowpos = np.sqrt(depth) * 8.0  # rows get taller towards the camera
        row = np.floor(rowpos)
        tile = 18.0 + 30.0 * depth
        colpos = (xs + (row % 2) * tile * 0.5) / tile
        if kind == "paving":
            line = ((rowpos % 1.0) < 0.08) | ((colpos % 1.0) < 0.06)
            img = np.broadcast_to(np.asarray(c1, np.float32), (h, w, 3)) * \
                (0.95 + 0.1 * smooth_noise(rng, h, w, 10))[..., None]
            img = np.where(line[..., None], np.asarray(c2, np.float32), img)
        else:
            chk = ((np.floor(colpos) + row) % 2 == 0)
            img = np.where(chk[..., None], np.asarray(c1, np.float32), np.asarray(c2, np.float32))
            img = img * (1.0 + 0.1 * (1 - depth))[..., None]
    elif kind == "asphalt":
        n = smooth_noise(rng, h, w, 3)
        img = np.broadcast_to(np.asarray(c1, np.float32), (h, w, 3)) * (0.88 + 0.24 * n)[..., None]
        y0 = int(h * 0.55)
        band = (ys >= y0) & (ys < y0 + max(3, h // 14)) & ((xs % 90) < 55)
        img = np.where(band[..., None], np.asarray(c2, np.float32), img)
    elif kind == "grass":
        n = 0.5 * smooth_noise(rng, h, w, 12) + 0.5 * smooth_noise(rng, h, w, 3)
        img = _blend(c1, c2, np.clip(n * 1.4 - 0.2, 0, 1))
    else:
        raise ValueError(f"unknown ground kind {kind!r}")
    return np.asarray(img, np.float32)


def render_panorama(camera: CameraSpec, rng: np.random.Generator, height: int,
                    width: int) -> np.ndarray:
    """The camera's scene as a wide uint8 image (height x width x 3); boxes are crops of it."""
    hy = int(round(camera.horizon * height))
    wall = _wall(camera.wall, rng, hy, width, *camera.wall_colors)
    ground = _ground(camera.ground, rng, height - hy, width, *camera.ground_colors)
    img = np.concatenate([wall, ground], axis=0)
    curb = max(2, height // 60)
    img[hy : hy + curb] = np.asarray(_shade(camera.ground_colors[0], 0.7), np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Occluders (NPO): RGBA objects drawn into a (h, w) rectangle
# --------------------------------------------------------------------------------------

CAR_COLORS: Tuple[RGB, ...] = ((200, 30, 35), (235, 235, 235), (25, 25, 30), (40, 70, 150),
                              (150, 155, 160), (230, 190, 40), (30, 110, 60), (120, 20, 30))


def _leafy(rng: np.random.Generator, h: int, w: int, mask: np.ndarray, dark: RGB,
           light: RGB) -> np.ndarray:
    n = 0.55 * smooth_noise(rng, h, w, 9) + 0.45 * smooth_noise(rng, h, w, 3)
    rgb = _blend(dark, light, np.clip(n * 1.6 - 0.3, 0, 1))
    return np.concatenate([rgb, mask[..., None].astype(np.float32) * 255], axis=2)


def _bumpy_mask(rng: np.random.Generator, h: int, w: int, edge: str, base: float) -> np.ndarray:
    """A mass filling the rectangle except for a bumpy ``edge`` ('top' or 'bottom')."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if edge == "top":
        d.rectangle([0, int(h * base), w, h], fill=255)
        y = h * base
    else:
        d.rectangle([0, 0, w, int(h * (1 - base))], fill=255)
        y = h * (1 - base)
    x = -5.0
    while x < w + 5:
        r = float(rng.uniform(0.1, 0.22)) * h
        cy = y + float(rng.uniform(-0.3, 0.3)) * r
        d.ellipse([x - r, cy - r, x + r, cy + r], fill=255)
        x += r * float(rng.uniform(0.9, 1.4))
    return np.asarray(m) > 127


def _occ_car(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    body = CAR_COLORS[int(rng.integers(len(CAR_COLORS)))]
    glass = (45, 60, 75)
    belt = int(h * rng.uniform(0.3, 0.42))
    sill = int(h * 0.84)
    d.rounded_rectangle([-w // 4, 0, w + w // 4, belt + 4], radius=max(2, h // 8), fill=_rgba(body))
    m = max(2, h // 20)
    d.rectangle([-w, m, w * 2, belt - m // 2], fill=_rgba(glass))
    px = int(w * rng.uniform(0.25, 0.75))
    d.rectangle([px - m, 0, px + m, belt], fill=_rgba(body))
    d.polygon([(0, m + 2), (w * 0.4, m + 2), (w * 0.25, belt - m)], fill=_rgba((110, 125, 140)))
    d.rectangle([0, belt, w, sill], fill=_rgba(body))
    d.line([(0, belt + (sill - belt) // 3), (w, belt + (sill - belt) // 3)],
           fill=_rgba(_shade(body, 1.25)), width=max(1, h // 40))
    dx = int(w * rng.uniform(0.3, 0.7))
    d.line([(dx, belt), (dx, sill)], fill=_rgba(_shade(body, 0.6)), width=max(1, h // 50))
    d.rectangle([dx + 4, belt + 6, dx + 4 + w // 10, belt + 6 + max(2, h // 30)],
                fill=_rgba((60, 60, 60)))
    d.rectangle([0, sill, w, h], fill=_rgba((30, 30, 32)))
    r = h * 0.22
    wx = w * rng.choice([0.15, 0.85]) + rng.uniform(-0.1, 0.1) * w
    d.ellipse([wx - r * 1.15, sill - r * 1.15, wx + r * 1.15, sill + r * 1.15], fill=_rgba((20, 20, 22)))
    d.ellipse([wx - r, sill - r, wx + r, sill + r], fill=_rgba((35, 35, 35)))
    d.ellipse([wx - r * 0.55, sill - r * 0.55, wx + r * 0.55, sill + r * 0.55], fill=_rgba((170, 170, 175)))
    return np.asarray(im, np.float32)


def _occ_bin(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    col = [(40, 110, 60), (60, 70, 80), (30, 70, 140), (200, 110, 30), (120, 120, 125)][int(rng.integers(5))]
    lid = int(h * 0.14)
    inset = int(w * rng.uniform(0.0, 0.05))
    d.rectangle([inset, lid, w - inset, int(h * 0.93)], fill=_rgba(col))
    d.rectangle([0, 0, w, lid], fill=_rgba(_shade(col, 0.7)))
    step = max(6, w // 6)
    for x in range(inset + step // 2, w - inset, step):
        d.line([(x, lid + 3), (x, int(h * 0.9))], fill=_rgba(_shade(col, 0.8)), width=max(1, w // 60))
    for x in (inset + w // 8, w - inset - w // 8):
        r = h * 0.07
        d.ellipse([x - r, h - 2 * r, x + r, h], fill=_rgba((25, 25, 25)))
    d.rectangle([inset + w // 5, int(h * 0.93), w - inset - w // 5, h], fill=_rgba((30, 30, 30)))
    return np.asarray(im, np.float32)


def _occ_hedge(rng, w, h):
    mask = _bumpy_mask(rng, h, w, "top", 0.12)
    return _leafy(rng, h, w, mask, (20, 60, 20), (90, 150, 60))


def _occ_barrier(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    grey = _shade((175, 170, 160), float(rng.uniform(0.8, 1.1)))
    d.polygon([(0, h * 0.06), (w, h * 0.06), (w, h), (0, h)], fill=_rgba(grey))
    d.rectangle([0, 0, w, int(h * 0.08)], fill=_rgba(_shade(grey, 1.12)))
    if rng.random() < 0.6:
        stripe = max(8, w // 4)
        red = (200, 40, 35) if rng.random() < 0.7 else (230, 180, 20)
        for x in range(-h, w + h, stripe * 2):
            d.polygon([(x, h * 0.15), (x + stripe, h * 0.15), (x + stripe + h * 0.5, h * 0.7),
                       (x + h * 0.5, h * 0.7)], fill=_rgba(red))
    d.rectangle([0, int(h * 0.9), w, h], fill=_rgba(_shade(grey, 0.7)))
    return np.asarray(im, np.float32)


def _occ_boxes(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    x = -int(rng.integers(0, max(1, w // 6)))
    while x < w:
        bw_ = int(w * rng.uniform(0.35, 0.6))
        top = int(h * rng.uniform(0.0, 0.3))
        col = _shade((175, 130, 80), float(rng.uniform(0.8, 1.1)))
        d.rectangle([x, top, x + bw_, h], fill=_rgba(col), outline=_rgba(_shade(col, 0.6)),
                    width=max(1, w // 60))
        d.rectangle([x + bw_ // 2 - 2, top, x + bw_ // 2 + 2, top + (h - top) // 3],
                    fill=_rgba((200, 180, 120)))
        d.line([(x, top + (h - top) // 2), (x + bw_, top + (h - top) // 2)],
               fill=_rgba(_shade(col, 0.7)), width=1)
        x += bw_
    return np.asarray(im, np.float32)


def _occ_luggage(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    x = -int(rng.integers(0, max(1, w // 8)))
    while x < w:
        bw_ = int(w * rng.uniform(0.32, 0.55))
        top = int(h * rng.uniform(0.12, 0.3))
        col = [(30, 30, 35), (150, 30, 40), (40, 60, 120), (90, 90, 95), (160, 120, 70),
               (60, 110, 130)][int(rng.integers(6))]
        d.rounded_rectangle([x + 1, top, x + bw_ - 1, int(h * 0.94)], radius=max(2, bw_ // 8),
                            fill=_rgba(col))
        hx = x + bw_ // 2
        d.rectangle([hx - bw_ // 6, 0 if rng.random() < 0.5 else top // 2, hx + bw_ // 6, top],
                    outline=_rgba((50, 50, 50)), width=max(1, w // 50))
        for k in (1, 2, 3):
            xx = x + bw_ * k // 4
            d.line([(xx, top + 3), (xx, int(h * 0.9))], fill=_rgba(_shade(col, 0.75)), width=1)
        d.rectangle([x + 2, int(h * 0.94), x + bw_ - 2, h], fill=_rgba((25, 25, 25)))
        x += bw_
    return np.asarray(im, np.float32)


def _occ_counter(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    wood = _shade((150, 100, 60), float(rng.uniform(0.7, 1.2)))
    top = (220, 220, 215) if rng.random() < 0.5 else _shade(wood, 0.7)
    d.rectangle([0, 0, w, int(h * 0.12)], fill=_rgba(top))
    d.rectangle([0, int(h * 0.12), w, h], fill=_rgba(wood))
    step = max(8, w // 3)
    for x in range(step // 2, w, step):
        d.line([(x, int(h * 0.15)), (x, h)], fill=_rgba(_shade(wood, 0.75)), width=max(1, w // 50))
    return np.asarray(im, np.float32)


def _occ_foliage_top(rng, w, h):
    mask = _bumpy_mask(rng, h, w, "bottom", 0.2)
    return _leafy(rng, h, w, mask, (25, 70, 25), (120, 170, 70))


def _occ_awning(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    c1 = [(200, 40, 40), (30, 110, 60), (40, 70, 160), (230, 150, 30)][int(rng.integers(4))]
    c2 = (240, 240, 235)
    stripe = max(6, w // int(rng.integers(3, 6)))
    body = int(h * 0.8)
    for k, x in enumerate(range(-stripe, w + stripe, stripe)):
        d.rectangle([x, 0, x + stripe, body], fill=_rgba(c1 if k % 2 else c2))
    r = stripe / 2
    for k, x in enumerate(range(-stripe, w + stripe, stripe)):
        d.chord([x, body - r, x + stripe, body + r], 0, 180, fill=_rgba(c1 if k % 2 else c2))
    d.rectangle([0, 0, w, max(2, h // 12)], fill=_rgba(_shade(c1, 0.6)))
    return np.asarray(im, np.float32)


def _occ_sign(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    bg = [(20, 60, 130), (230, 230, 225), (30, 120, 70), (180, 30, 40), (40, 40, 45)][int(rng.integers(5))]
    fg = (245, 245, 240) if sum(bg) < 450 else (30, 30, 35)
    d.rectangle([0, 0, w, h], fill=_rgba(_shade(bg, 0.6)))
    m = max(2, h // 14)
    d.rectangle([m, m, w - m, h - m], fill=_rgba(bg))
    lines = max(1, int((h - 2 * m) // max(8, h // 4)))
    lh = (h - 4 * m) / (lines * 1.6)
    for k in range(lines):
        y = 2 * m + k * lh * 1.6
        x = 2 * m
        while x < w - 2 * m:
            ww = float(rng.uniform(0.08, 0.25)) * w
            d.rectangle([x, y, min(w - 2 * m, x + ww), y + lh], fill=_rgba(fg))
            x += ww + lh * 0.8
    return np.asarray(im, np.float32)


def _occ_pillar(rng, w, h):
    base = _shade((190, 185, 175), float(rng.uniform(0.7, 1.15)))
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    shade = 0.75 + 0.35 * np.sqrt(np.clip(1 - (xs - 0.3) ** 2 / 1.7, 0, 1))
    rgb = np.asarray(base, np.float32)[None, None] * (shade * np.ones((h, 1), np.float32))[..., None]
    ys = np.arange(h)[:, None]
    band = (ys < h * 0.04) | (ys > h * 0.93)
    rgb = np.where(band[..., None] & np.ones((1, w, 1), bool), rgb * 0.8, rgb)
    alpha = np.full((h, w, 1), 255, np.float32)
    return np.concatenate([rgb, alpha], axis=2)


def _occ_tree(rng, w, h):
    # size-independent draws first, so a redraw at another size is the same tree
    bark = _shade((95, 70, 50), float(rng.uniform(0.8, 1.2)))
    tw = w * rng.uniform(0.55, 0.8)
    t0 = (w - tw) / 2 + rng.uniform(-0.1, 0.1) * w
    crown_h = max(2, int(h * rng.uniform(0.3, 0.55)))
    n = smooth_noise(rng, h, w, 4)
    xs = np.arange(w)[None, :]
    trunk = (xs >= t0) & (xs < t0 + tw)
    rgb = np.asarray(bark, np.float32)[None, None] * (0.75 + 0.5 * n)[..., None]
    mask = trunk & np.ones((h, 1), bool)
    crown = _bumpy_mask(rng, crown_h, w, "bottom", 0.25)
    leaves = _leafy(rng, crown_h, w, crown, (25, 70, 25), (110, 160, 60))
    rgb[:crown_h] = np.where(crown[..., None], leaves[..., :3], rgb[:crown_h])
    mask[:crown_h] |= crown
    return np.concatenate([rgb, mask[..., None].astype(np.float32) * 255], axis=2)


def _occ_vending(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    col = [(190, 30, 35), (30, 80, 160), (235, 235, 230), (40, 140, 70)][int(rng.integers(4))]
    top = int(h * rng.uniform(0.0, 0.08))
    d.rectangle([0, top, w, h], fill=_rgba(col))
    m = max(2, w // 10)
    gx1 = int(w * 0.68)
    d.rectangle([m, top + m * 2, gx1, int(h * 0.62)], fill=_rgba((60, 80, 95)))
    rows = 5
    for r_ in range(rows):
        y = top + m * 3 + r_ * (int(h * 0.62) - top - m * 4) / rows
        for k in range(3):
            x = m + 2 + k * (gx1 - m - 4) / 3
            c = [(230, 60, 40), (250, 200, 40), (60, 160, 220), (250, 250, 250)][(r_ + k) % 4]
            d.rectangle([x, y, x + (gx1 - m) / 5, y + h / 40], fill=_rgba(c))
    for k in range(6):
        y = top + m * 3 + k * h / 22
        d.rectangle([gx1 + m, y, w - m, y + h / 60], fill=_rgba((200, 200, 200)))
    d.rectangle([m, int(h * 0.72), w - m, int(h * 0.8)], fill=_rgba((25, 25, 25)))
    return np.asarray(im, np.float32)


def _occ_wall(rng, w, h):
    c1 = _shade((180, 160, 140), float(rng.uniform(0.6, 1.15)))
    img = _wall("brick" if rng.random() < 0.5 else "plain", rng, h, w, c1, _shade(c1, 0.75))
    xs = np.arange(w)[None, :].astype(np.float32)
    edge = 1.0 - 0.3 * (xs > w * 0.85)
    img = img * edge[..., None]
    return np.concatenate([img, np.full((h, w, 1), 255, np.float32)], axis=2)


def _occ_poster(rng, w, h):
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    frame = (60, 60, 65) if rng.random() < 0.6 else (200, 200, 200)
    d.rectangle([0, 0, w, h], fill=_rgba(frame))
    m = max(2, w // 10)
    c = [(240, 200, 60), (40, 150, 200), (220, 70, 90), (120, 200, 120), (250, 250, 250)]
    y = m
    while y < h * 0.9:
        hh = int(h * rng.uniform(0.1, 0.3))
        d.rectangle([m, y, w - m, min(int(h * 0.9), y + hh)], fill=_rgba(c[int(rng.integers(len(c)))]))
        y += hh
    d.rectangle([0, int(h * 0.9), w, h], fill=_rgba(_shade(frame, 0.7)))
    return np.asarray(im, np.float32)


#: NPO occluder kinds: side(s) where they occur and their drawing function.
OCCLUDERS: Dict[str, Tuple[Tuple[str, ...], Callable]] = {
    "car": (("bottom",), _occ_car),
    "bin": (("bottom",), _occ_bin),
    "hedge": (("bottom",), _occ_hedge),
    "barrier": (("bottom",), _occ_barrier),
    "boxes": (("bottom",), _occ_boxes),
    "luggage": (("bottom",), _occ_luggage),
    "counter": (("bottom",), _occ_counter),
    "foliage": (("top",), _occ_foliage_top),
    "awning": (("top",), _occ_awning),
    "sign": (("top",), _occ_sign),
    "pillar": (("left", "right"), _occ_pillar),
    "tree": (("left", "right"), _occ_tree),
    "vending": (("left", "right"), _occ_vending),
    "wall": (("left", "right"), _occ_wall),
    "poster": (("left", "right"), _occ_poster),
}


def draw_occluder(kind: str, seed: int, width: int, height: int, *,
                  mirror: bool = False) -> np.ndarray:
    """Draw NPO object ``kind`` into a ``height`` x ``width`` rectangle -> float RGBA array.

    ``seed`` fixes the object's look, so the same object can be redrawn at another size.
    """
    if kind not in OCCLUDERS:
        raise ValueError(f"unknown occluder kind {kind!r}; known: {sorted(OCCLUDERS)}")
    rng = np.random.default_rng(seed)
    arr = OCCLUDERS[kind][1](rng, int(width), int(height))
    if mirror:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr, dtype=np.float32)


def npo_layer(kind: str, side: str, fraction: float, seed: int, size: Tuple[int, int],
              *, mirror: bool = False) -> np.ndarray:
    """A canvas-size float RGBA layer with occluder ``kind`` pasted on ``side``.

    The rectangle spans the full width (top/bottom) or full height (left/right); its depth
    is chosen so that the object's opaque pixels cover about ``fraction`` of the canvas
    (one correction step for objects that do not fill their rectangle).
    """
    w, h = size
    if side in ("top", "bottom"):
        full, other = h, w
    elif side in ("left", "right"):
        full, other = w, h
    else:
        raise ValueError(f"side must be top/bottom/left/right, got {side!r}")

    def draw(depth: int) -> np.ndarray:
        dims = (other, depth) if side in ("top", "bottom") else (depth, other)
        return draw_occluder(kind, seed, *dims, mirror=mirror)

    depth = max(2, int(round(fraction * full)))
    obj = draw(depth)
    fill = float((obj[..., 3] > 127).mean())  # share of the rectangle the object covers
    if fill < 0.97:
        depth2 = min(int(full * 0.7), max(2, int(round(fraction * full / max(fill, 0.3)))))
        if depth2 != depth:
            obj = draw(depth2)
    layer = np.zeros((h, w, 4), np.float32)
    oh, ow = obj.shape[:2]
    if side == "top":
        layer[:oh] = obj
    elif side == "bottom":
        layer[h - oh :] = obj
    elif side == "left":
        layer[:, :ow] = obj
    else:
        layer[:, w - ow :] = obj
    return layer


# --------------------------------------------------------------------------------------
# Scene composition
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """A person placed in a scene (supersampled pixel units)."""

    spec: PersonSpec
    view: str
    phase: float
    cx: float
    feet_y: float
    height: float


def _person_layer(fig: Figure, size: Tuple[int, int]) -> Image.Image:
    """The figure drawn on a transparent layer, with a soft rounded-body shading (darker
    towards the silhouette's left and right edges, light from the upper left)."""
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    draw_person(im, fig.spec, view=fig.view, phase=fig.phase, cx=fig.cx, feet_y=fig.feet_y,
                height=fig.height)
    arr = np.asarray(im, np.float32)
    w = size[0]
    half = 0.16 * fig.height * fig.spec.width
    u = (np.arange(w, dtype=np.float32) - fig.cx) / half
    shade = 1.06 - 0.05 * u - 0.16 * np.clip(np.abs(u), 0, 1.6) ** 2
    arr[..., :3] *= shade[None, :, None]
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGBA")


def _to_rgba(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGBA")


def apply_camera(img: np.ndarray, camera: CameraSpec, rng: np.random.Generator,
                 gain_jitter: float = 0.06) -> Image.Image:
    """Camera look on a float RGB image (output size): gain, colour cast, contrast,
    side light, blur and sensor noise -> uint8 PIL image."""
    h, w = img.shape[:2]
    gain = camera.gain * float(rng.uniform(1 - gain_jitter, 1 + gain_jitter))
    out = img * (gain * np.asarray(camera.cast, np.float32))[None, None]
    mean = out.mean()
    out = (out - mean) * camera.contrast + mean
    ramp = 1.0 + camera.side_light * np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    out = np.clip(out * ramp, 0, 255)
    pil = Image.fromarray(out.astype(np.uint8), "RGB")
    if camera.blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(camera.blur * float(rng.uniform(0.8, 1.2))))
    if camera.noise > 0:
        arr = np.asarray(pil, np.float32) + rng.normal(0.0, camera.noise, (h, w, 3))
        pil = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    return pil


def render_scene(*, panorama: np.ndarray, camera: CameraSpec, target: Figure,
                 rng: np.random.Generator, size: Tuple[int, int],
                 npo: Optional[Tuple[str, str, float, int, bool]] = None,
                 ntp: Optional[Figure] = None) -> Tuple[Image.Image, float]:
    """Render one bounding box.

    Args:
        panorama: the camera's background (supersampled height); a crop of it is used.
        camera: camera look applied to the whole box.
        target: the target pedestrian (supersampled coordinates).
        rng: randomness for the background crop and the camera noise.
        size: output (width, height).
        npo: ``(kind, side, fraction, seed, mirror)`` for an object occluder, or None.
        ntp: a non-target pedestrian drawn in front of the target, or None.

    Returns:
        ``(image, fraction)``: the RGB box at ``size`` and the fraction of its pixels covered
        by the occluder (object or non-target person), measured on the output pixels.
    """
    f = SUPERSAMPLE
    w, h = size
    W, H = w * f, h * f
    ph, pw = panorama.shape[:2]
    if ph != H:
        raise ValueError(f"panorama height {ph} != box height {H}")
    x0 = int(rng.integers(0, pw - W + 1))
    canvas = Image.fromarray(np.ascontiguousarray(panorama[:, x0 : x0 + W]), "RGB").convert("RGBA")
    canvas = Image.alpha_composite(canvas, _person_layer(target, (W, H)))
    occ_alpha: Optional[Image.Image] = None
    if npo is not None:
        kind, side, frac, seed, mirror = npo
        layer = _to_rgba(npo_layer(kind, side, frac, seed, (W, H), mirror=mirror))
        canvas = Image.alpha_composite(canvas, layer)
        occ_alpha = layer.getchannel("A")
    if ntp is not None:
        layer = _person_layer(ntp, (W, H))
        canvas = Image.alpha_composite(canvas, layer)
        a = layer.getchannel("A")
        occ_alpha = a if occ_alpha is None else ImageChops.lighter(occ_alpha, a)
    small = np.asarray(canvas.convert("RGB").reduce(f), np.float32)
    fraction = 0.0
    if occ_alpha is not None:  # an output pixel counts when >= half of its subpixels are covered
        a = np.asarray(occ_alpha, np.float32).reshape(h, f, w, f).mean(axis=(1, 3))
        fraction = float((a >= 127.5).mean())
    return apply_camera(small, camera, rng), fraction


def render_occluder_patch(kind: str, seed: int, out_size: Tuple[int, int],
                          panorama: np.ndarray, camera: CameraSpec,
                          rng: np.random.Generator) -> Image.Image:
    """A crop for FED's occluder bank: object ``kind`` over a background crop, no people.

    ``out_size`` is (width, height) in output pixels; tall sizes (h/w > 2) are meant for
    vertical kinds, wide ones for horizontal kinds. ``kind == "background"`` gives a plain
    background crop.
    """
    f = SUPERSAMPLE
    w, h = out_size
    W, H = w * f, h * f
    ph, pw = panorama.shape[:2]
    y0 = int(rng.integers(0, max(1, ph - H + 1)))
    x0 = int(rng.integers(0, max(1, pw - W + 1)))
    canvas = panorama[y0 : y0 + H, x0 : x0 + W].astype(np.float32)
    if canvas.shape[0] < H:  # panorama shorter than the patch: stretch it
        canvas = np.asarray(Image.fromarray(canvas.astype(np.uint8)).resize((W, H)), np.float32)
    if kind != "background":
        obj = draw_occluder(kind, seed, W, H, mirror=bool(rng.random() < 0.5))
        a = obj[..., 3:4] / 255.0
        canvas = canvas * (1 - a) + obj[..., :3] * a
    small = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB").reduce(f)
    return apply_camera(np.asarray(small, np.float32), camera, rng)
