"""Chart primitives drawn with PIL (no plotting dependency): line panels and a palette."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

from PIL import ImageDraw

__all__ = ["PALETTE", "line_panel"]

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def line_panel(
    draw: ImageDraw.ImageDraw,
    box: Tuple[int, int, int, int],
    title: str,
    series: Dict[str, Sequence[Tuple[float, float]]],
    y_fmt: str = "{:.3g}",
) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 - 14), title, fill=(0, 0, 0))
    pts = [p for s in series.values() for p in s]
    if not pts:
        draw.text((x0 + 10, y0 + 10), "no data", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymax = ymin + (abs(ymin) * 0.1 or 1.0)
    pad = 6

    def tx(x: float) -> float:
        return x0 + pad + (x - xmin) / (xmax - xmin) * (x1 - x0 - 2 * pad)

    def ty(y: float) -> float:
        return y1 - pad - (y - ymin) / (ymax - ymin) * (y1 - y0 - 2 * pad)

    for frac in (0.0, 0.5, 1.0):
        yv = ymin + frac * (ymax - ymin)
        draw.line([(x0, ty(yv)), (x0 + 4, ty(yv))], fill=(0, 0, 0))
        draw.text((x0 - 46, ty(yv) - 6), y_fmt.format(yv), fill=(60, 60, 60))
    draw.text((x0, y1 + 2), f"{xmin:g}", fill=(60, 60, 60))
    draw.text((x1 - 24, y1 + 2), f"{xmax:g}", fill=(60, 60, 60))
    ly = y0 + 4
    for i, (name, s) in enumerate(series.items()):
        col = PALETTE[i % len(PALETTE)]
        line = [(tx(x), ty(y)) for x, y in s]
        if len(line) > 1:
            draw.line(line, fill=col, width=2)
        for px, py in line:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=col)
        draw.text((x1 - 110, ly), name, fill=col)
        ly += 12
