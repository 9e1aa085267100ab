"""Training curves drawn with PIL (no plotting dependency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def _panel(
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


def plot_training_log(log_path: Union[str, Path], out_png: Union[str, Path]) -> Path:
    """Losses, learning rate and evaluation metrics per epoch from a ``log.jsonl``."""
    records: List[dict] = [json.loads(l) for l in Path(log_path).read_text().splitlines() if l.strip()]
    skip = {"epoch", "lr", "iters", "epoch_time_s", "images_per_s", "metrics"}
    loss_keys = [k for k in records[0] if k not in skip] if records else []
    losses = {k: [(r["epoch"], r[k]) for r in records if k in r] for k in loss_keys}
    lr = {"lr": [(r["epoch"], r["lr"]) for r in records]}
    metric: Dict[str, List[Tuple[float, float]]] = {}
    for r in records:
        m = r.get("metrics")
        if not m:
            continue
        for k in ("mAP", "rank1"):
            metric.setdefault(k, []).append((r["epoch"], m[k]))
        for g, v in (m.get("by_occlusion") or {}).items():
            metric.setdefault(f"mAP {g}", []).append((r["epoch"], v["mAP"]))
    w, h = 1200, 380
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    _panel(d, (60, 30, 380, 340), "losses", losses)
    _panel(d, (450, 30, 770, 340), "learning rate", lr, "{:.1e}")
    _panel(d, (840, 30, 1160, 340), "evaluation", metric, "{:.2f}")
    d.text((w // 2 - 20, h - 18), "epoch", fill=(0, 0, 0))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
