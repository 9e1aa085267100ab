"""Ranked-list pictures: each row is a query followed by its top-k gallery images,
true matches framed green, wrong ones red."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from ..data.base import OCCLUSION_TYPES
from ..utils.io import read_image

GREEN, RED, GREY = (0, 170, 0), (220, 0, 0), (90, 90, 90)


def _thumb(path: str, size) -> Image.Image:
    return read_image(path).resize((size[1], size[0]), Image.BILINEAR)


def pick_queries(
    query: Sequence, per_type: int, limit: int, kinds: Sequence[str] = OCCLUSION_TYPES
) -> List[int]:
    """Indices of up to ``per_type`` queries of each occlusion kind (seeded, deterministic);
    random queries when the dataset has no occlusion metadata."""
    rng = np.random.default_rng(0)
    occ = [getattr(r, "occlusion", None) for r in query]
    chosen: List[int] = []
    for kind in kinds:
        idx = [i for i, k in enumerate(occ) if k == kind]
        if idx:
            chosen += sorted(rng.choice(idx, size=min(per_type, len(idx)), replace=False).tolist())
    if not chosen:
        chosen = sorted(rng.choice(len(query), size=min(limit, len(query)), replace=False).tolist())
    return chosen[:limit]


def top_matches(
    ranking: np.ndarray,
    q_pids: np.ndarray,
    q_camids: np.ndarray,
    g_pids: np.ndarray,
    g_camids: np.ndarray,
    topk: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """From full rankings ``[n, G]`` (gallery indices, best first) keep the top-k after removing
    the query's own id seen by its own camera (as the evaluation protocol does); returns the
    kept gallery indices ``[n, k]`` and whether each is a true match."""
    qp, qc = np.asarray(q_pids)[:, None], np.asarray(q_camids)[:, None]
    gp, gc = np.asarray(g_pids)[ranking], np.asarray(g_camids)[ranking]
    keep = ~((gp == qp) & (gc == qc))
    order = np.argsort(~keep, axis=1, kind="stable")[:, :topk]  # kept items first, rank order kept
    return np.take_along_axis(ranking, order, 1), np.take_along_axis(gp, order, 1) == qp


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
