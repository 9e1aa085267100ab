"""Occlusion pictures: FED's per-stripe occlusion scores on the image (FED paper, Fig. 4) and
statistics of DPM's channel masks (DPM paper, Sec. 3.2 / Fig. 5), drawn with PIL only.

* :func:`draw_occlusion_scores`: each image split into the ``P`` horizontal stripes FED's OEM
  scores (top to bottom, the stripes of :func:`occreid.methods.fed.part_pool`); a stripe is tinted
  red in proportion to ``1 - score`` (score 1 = visible, 0 = occluded) and its score is written
  beside it with a bar.
* :func:`mask_statistics` / :func:`draw_mask_statistics`: the HMG mask ``M [N, D]`` in (0, 1):
  histogram of mask values (per image group, e.g. holistic / occluded), the per-channel mean
  (channels sorted) with its spread, and a heat map of images × channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from ..utils.io import read_image

from ..utils.draw import PALETTE, line_panel

__all__ = ["draw_occlusion_scores", "mask_statistics", "draw_mask_statistics"]

ImageLike = Union[str, Path, Image.Image]

RED = np.array([220, 30, 30], dtype=np.float32)


def _open(img: ImageLike) -> Image.Image:
    return img.convert("RGB") if isinstance(img, Image.Image) else read_image(img)


def _score_colour(s: float):
    """Red (occluded, 0) -> yellow -> green (visible, 1)."""
    s = float(min(1.0, max(0.0, s)))
    if s < 0.5:
        return (220, int(60 + 340 * s), 30)
    return (int(220 - 380 * (s - 0.5)), 190, 30)


def draw_occlusion_scores(
    images: Sequence[ImageLike],
    scores: Any,
    out_png: Union[str, Path],
    *,
    labels: Optional[Sequence[str]] = None,
    thumb_size=(256, 128),
    columns: int = 6,
    max_tint: float = 0.55,
) -> Path:
    """Draw FED occlusion scores per horizontal stripe on each image.

    Args:
        images: N images (paths or PIL images).
        scores: [N, P] scores in [0, 1] (1 = visible), stripes top to bottom
            (``FeatureExtractor.extract(...)["part_scores"]``).
        out_png: where to write the picture.
        labels: an optional caption per image.
        thumb_size: (H, W) each image is drawn at.
        columns: images per row.
        max_tint: opacity of the red tint of a fully occluded stripe.
    """
    sc = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
    if sc.ndim != 2 or sc.shape[0] != len(images):
        raise ValueError(f"scores must be [N, P] with N = {len(images)} images, got shape {sc.shape}")
    n, p = sc.shape
    th, tw = int(thumb_size[0]), int(thumb_size[1])
    bar_w = 64
    cell_w, cell_h = tw + bar_w + 24, th + 34
    cols = max(1, min(columns, n))
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cell_w * cols + 8, cell_h * rows + 26), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), f"FED occlusion score per stripe (OEM, P={p}): 1 = visible, 0 = occluded; red tint = 1 - score",
              fill=(0, 0, 0))
    bounds = [round(i * th / p) for i in range(p + 1)]  # stripe rows in the thumbnail
    for i in range(n):
        x0 = 8 + (i % cols) * cell_w
        y0 = 26 + (i // cols) * cell_h
        im = np.asarray(_open(images[i]).resize((tw, th), Image.BILINEAR), dtype=np.float32).copy()
        for j in range(p):
            a = max_tint * (1.0 - float(np.clip(sc[i, j], 0, 1)))
            im[bounds[j] : bounds[j + 1]] = (1 - a) * im[bounds[j] : bounds[j + 1]] + a * RED
        canvas.paste(Image.fromarray(im.clip(0, 255).astype(np.uint8)), (x0, y0))
        draw.rectangle([x0 - 1, y0 - 1, x0 + tw, y0 + th], outline=(60, 60, 60))
        bx = x0 + tw + 6
        for j in range(p):
            ya, yb = y0 + bounds[j], y0 + bounds[j + 1]
            if j:
                draw.line([(x0, ya), (x0 + tw - 1, ya)], fill=(255, 255, 255), width=1)
            s = float(sc[i, j])
            col = _score_colour(s)
            mid = (ya + yb) // 2
            draw.rectangle([bx, mid - 5, bx + int(round(np.clip(s, 0, 1) * bar_w)), mid + 5], fill=col)
            draw.rectangle([bx, mid - 5, bx + bar_w, mid + 5], outline=(150, 150, 150))
            draw.text((bx + 2, mid + 6), f"{s:.2f}", fill=(0, 0, 0))
        if labels is not None:
            draw.text((x0, y0 + th + 4), str(labels[i])[: (tw + bar_w) // 6], fill=(0, 0, 0))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def mask_statistics(masks: Any, groups: Optional[Sequence[Optional[str]]] = None) -> Dict[str, Any]:
    """Summary numbers of DPM masks ``[N, D]``: overall and per group (e.g. occlusion type).

    Returns ``{"num_images", "num_channels", "mean", "std", "min", "max", "frac_below_0.5",
    "channel_mean_spread" (std over channels of the per-channel mean), "per_image_std" (mean
    over images of the std across channels), "groups": {name: {"num_images", "mean",
    "frac_below_0.5"}}}``.
    """
    m = np.asarray(masks.detach().float().cpu() if hasattr(masks, "detach") else masks, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"masks must be [N, D], got shape {m.shape}")
    stats: Dict[str, Any] = {
        "num_images": int(m.shape[0]),
        "num_channels": int(m.shape[1]),
        "mean": float(m.mean()) if m.size else float("nan"),
        "std": float(m.std()) if m.size else float("nan"),
        "min": float(m.min()) if m.size else float("nan"),
        "max": float(m.max()) if m.size else float("nan"),
        "frac_below_0.5": float((m < 0.5).mean()) if m.size else float("nan"),
        "channel_mean_spread": float(m.mean(0).std()) if m.size else float("nan"),
        "per_image_std": float(m.std(1).mean()) if m.size else float("nan"),
    }
    if groups is not None:
        g = np.asarray([x if x is not None else "unknown" for x in groups])
        if len(g) != m.shape[0]:
            raise ValueError(f"got {len(g)} group labels for {m.shape[0]} masks")
        stats["groups"] = {
            name: {
                "num_images": int((g == name).sum()),
                "mean": float(m[g == name].mean()),
                "frac_below_0.5": float((m[g == name] < 0.5).mean()),
            }
            for name in sorted(set(g.tolist()))
        }
    return stats


def draw_mask_statistics(
    masks: Any,
    out_png: Union[str, Path],
    *,
    groups: Optional[Sequence[Optional[str]]] = None,
    max_rows: int = 48,
    bins: int = 20,
) -> Path:
    """Three panels for DPM masks ``[N, D]``: value histogram (per group), per-channel mean
    (channels sorted by it, with mean ± std across images), and an images × channels heat map
    (channels in the same order, grey levels stretched to the shown minimum and maximum; at most
    ``max_rows`` images)."""
    m = np.asarray(masks.detach().float().cpu() if hasattr(masks, "detach") else masks, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"masks must be a non-empty [N, D] array, got shape {m.shape}")
    n, d = m.shape
    labels = np.asarray([x if x is not None else "all" for x in groups]) if groups is not None else np.full(n, "all")
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    hist: Dict[str, List] = {}
    for name in ["all"] + sorted(set(labels.tolist()) - {"all"}):
        sel = m if name == "all" else m[labels == name]
        if sel.size == 0:
            continue
        h, _ = np.histogram(sel.clip(0, 1), bins=edges)
        frac = h / max(1, sel.size)
        hist[f"{name} ({sel.shape[0]})"] = list(zip(centres.tolist(), frac.tolist()))
    order = np.argsort(m.mean(0))
    mean_c, std_c = m.mean(0)[order], m.std(0)[order]
    xs = np.arange(d, dtype=np.float64)
    chan = {
        "mean": list(zip(xs.tolist(), mean_c.tolist())),
        "mean + std": list(zip(xs.tolist(), (mean_c + std_c).tolist())),
        "mean - std": list(zip(xs.tolist(), (mean_c - std_c).tolist())),
    }
    w, h = 1240, 420
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    st = mask_statistics(m)
    draw.text((10, 4), f"DPM masks: {n} images x {d} channels; mean {st['mean']:.3f}, std {st['std']:.3f}, "
                       f"{st['frac_below_0.5']:.1%} of values < 0.5", fill=(0, 0, 0))
    line_panel(draw, (60, 40, 400, 370), "histogram of mask values (fraction)", hist, "{:.2f}")
    draw.text((200, 386), "mask value", fill=(0, 0, 0))
    line_panel(draw, (470, 40, 810, 370), "per-channel mean (channels sorted)", chan, "{:.2f}")
    draw.text((600, 386), "channel (sorted)", fill=(0, 0, 0))
    # heat map: rows = images, columns = channels (same order), 0 black -> 1 white
    hx0, hy0, hx1, hy1 = 860, 40, 1220, 370
    draw.text((hx0, hy0 - 14), f"images x channels (first {min(n, max_rows)})", fill=(0, 0, 0))
    sub = m[: max_rows][:, order]
    lo, hi = float(sub.min()), float(sub.max())
    scaled = (sub - lo) / (hi - lo) if hi > lo else np.full_like(sub, 0.5)  # contrast-stretched
    heat = Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L").resize((hx1 - hx0, hy1 - hy0), Image.NEAREST)
    img.paste(heat.convert("RGB"), (hx0, hy0))
    draw.rectangle([hx0 - 1, hy0 - 1, hx1, hy1], outline=(0, 0, 0))
    draw.text((hx0, hy1 + 4), f"black = {lo:.2f} (suppressed) ... white = {hi:.2f} (kept)", fill=(60, 60, 60))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
