"""Ranked-list pictures: each row is a query followed by its top-k gallery images,
true matches framed green, wrong ones red."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

GREEN, RED, GREY = (0, 170, 0), (220, 0, 0), (90, 90, 90)


def _thumb(path: str, size) -> Image.Image:
    from ..utils.io import read_image

    return read_image(path).resize((size[1], size[0]), Image.BILINEAR)


def draw_ranked_lists(
    query_paths: Sequence[str],
    gallery_paths: Sequence[str],
    ranked: np.ndarray,
    matches: np.ndarray,
    out_png: Union[str, Path],
    *,
    query_labels: Optional[Sequence[str]] = None,
    thumb_size=(128, 64),
    border: int = 4,
) -> Path:
    """``ranked[i]`` holds gallery indices of query i in rank order (top-k);
    ``matches[i, j]`` is True when ``ranked[i, j]`` is a true match."""
    ranked = np.asarray(ranked)
    matches = np.asarray(matches, dtype=bool)
    nq, k = ranked.shape
    th, tw = thumb_size
    cell_w, cell_h = tw + 2 * border + 6, th + 2 * border + 22
    gap = 16
    img = Image.new("RGB", (cell_w * (k + 1) + gap, cell_h * nq), "white")
    draw = ImageDraw.Draw(img)
    for i in range(nq):
        y = i * cell_h
        q = _thumb(query_paths[i], thumb_size)
        draw.rectangle([2, y + 2, 2 + tw + 2 * border, y + 2 + th + 2 * border], fill=GREY)
        img.paste(q, (2 + border, y + 2 + border))
        label = "query" + (f" {query_labels[i]}" if query_labels is not None else "")
        draw.text((4, y + th + 2 * border + 5), label, fill=(0, 0, 0))
        for j in range(k):
            x = gap + (j + 1) * cell_w
            col = GREEN if matches[i, j] else RED
            draw.rectangle([x, y + 2, x + tw + 2 * border, y + 2 + th + 2 * border], fill=col)
            img.paste(_thumb(gallery_paths[ranked[i, j]], thumb_size), (x + border, y + 2 + border))
            draw.text((x + 2, y + th + 2 * border + 5), f"#{j + 1}", fill=col)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
