"""A one-page HTML report: model, metrics (overall and per occlusion type), CMC curve, training
curves, ranked lists and occlusion pictures, with every picture embedded (one self-contained file)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw

from ..utils.io import atomic_write_text

from ..utils.draw import line_panel

__all__ = ["draw_cmc", "write_report"]

PathLike = Union[str, Path]


def draw_cmc(metrics: Mapping[str, Any], out_png: PathLike, max_rank: int = 20) -> Path:
    """The CMC curve (``metrics["cmc"]``, rank 1..max_rank) as a PNG."""
    cmc = list(metrics.get("cmc") or [])[:max_rank]
    series = {"CMC": [(float(i + 1), float(v)) for i, v in enumerate(cmc)]}
    img = Image.new("RGB", (460, 320), "white")
    d = ImageDraw.Draw(img)
    line_panel(d, (60, 30, 440, 280), "CMC (fraction of queries matched within rank r)", series, "{:.2f}")
    d.text((230, 296), "rank r", fill=(0, 0, 0))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def _img_tag(path: PathLike, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cap = html.escape(caption)
    return (
        f'<figure><img alt="{cap}" src="data:image/png;base64,{data}">'
        f"<figcaption>{cap}</figcaption></figure>"
    )


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f}" if isinstance(v, (int, float)) else html.escape(str(v))


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    cols = ("mAP", "rank1", "rank5", "rank10", "mINP")
    head = "".join(f"<th>{c} (%)</th>" for c in cols)
    rows = [
        f"<tr><td>all</td><td>{metrics.get('num_valid_queries', '')}</td>"
        + "".join(f"<td>{_pct(metrics[c])}</td>" for c in cols if c in metrics)
        + "</tr>"
    ]
    for name, m in (metrics.get("by_occlusion") or {}).items():
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{m.get('num_queries', '')}</td>"
            + "".join(f"<td>{_pct(m[c])}</td>" if c in m else "<td></td>" for c in cols)
            + "</tr>"
        )
    skipped = metrics.get("num_skipped_queries")
    note = f"<p class=note>{skipped} queries skipped (no valid gallery match).</p>" if skipped else ""
    return f"<table><tr><th>queries</th><th>n</th>{head}</tr>{''.join(rows)}</table>{note}"


def _kv_table(info: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
        for k, v in info.items()
    )
    return f"<table class=kv>{rows}</table>"


_CSS = """
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3} table.kv th,table.kv td{text-align:left} td:first-child{text-align:left}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top} img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#555} .note{color:#666;font-size:13px}
"""


def write_report(
    out_html: PathLike,
    *,
    title: str = "occreid report",
    info: Optional[Mapping[str, Any]] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    sections: Sequence[Tuple[str, Sequence[Tuple[PathLike, str]]]] = (),
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a self-contained HTML page.

    Args:
        out_html: the file to write.
        title: page title.
        info: model / data description (key -> value), shown as a table.
        metrics: an evaluation dict (``mAP``, ``rank1``, ..., ``cmc``, ``by_occlusion``); the
            CMC curve is drawn from it and embedded.
        sections: ``[(heading, [(png_path, caption), ...]), ...]`` pictures, in order.
        extra: more numbers (e.g. DPM mask statistics), shown as JSON.
    """
    out = Path(out_html)
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if info:
        parts.append("<h2>Model</h2>" + _kv_table(info))
    if metrics:
        parts.append("<h2>Metrics</h2>" + _metrics_table(metrics))
        if metrics.get("cmc"):
            cmc_png = draw_cmc(metrics, out.with_name(out.stem + "_cmc.png"))
            parts.append(_img_tag(cmc_png, "CMC curve"))
    for heading, figures in sections:
        figs = [_img_tag(p, c) for p, c in figures if p is not None and Path(p).is_file()]
        if figs:
            parts.append(f"<h2>{html.escape(heading)}</h2>" + "".join(figs))
    if extra:
        parts.append("<h2>Statistics</h2><pre>" + html.escape(json.dumps(extra, indent=2)) + "</pre>")
    parts.append("</body></html>")
    atomic_write_text("\n".join(parts), out)
    return out
