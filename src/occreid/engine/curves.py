"""Training curves of a run's ``log.jsonl``, drawn with PIL (no plotting dependency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple, Union

from PIL import Image, ImageDraw

from ..utils.draw import line_panel

__all__ = ["plot_training_log"]


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
    line_panel(d, (60, 30, 380, 340), "losses", losses)
    line_panel(d, (450, 30, 770, 340), "learning rate", lr, "{:.1e}")
    line_panel(d, (840, 30, 1160, 340), "evaluation", metric, "{:.2f}")
    d.text((w // 2 - 20, h - 18), "epoch", fill=(0, 0, 0))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
