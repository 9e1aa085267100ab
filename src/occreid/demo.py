"""``occreid demo``: generate SynthOcc, train a tiny ViT on the CPU, evaluate per occlusion type,
and draw the training curves and ranked lists of a few occluded queries."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .config import load_config
from .configs import config_path
from .engine.build import build_test_loader, method_spec
from .engine.trainer import Trainer
from .evaluation.extract import extract_features, query_gallery_distance
from .methods import available_methods
from .utils.io import OccReIDError
from .viz.ranklist import draw_ranked_lists, pick_queries, top_matches

logger = logging.getLogger(__name__)

def demo_config(method: str) -> str:
    """The shipped SynthOcc demo recipe of ``method`` (``synthocc/<method>_demo.yaml``)."""
    name = f"synthocc/{method}_demo.yaml"
    try:
        return config_path(name)
    except OccReIDError:
        have = [m for m in available_methods() if _has_config(f"synthocc/{m}_demo.yaml")]
        raise OccReIDError(f"demo method {method!r} has no demo recipe ({name}); choose from {', '.join(have)}") from None


def _has_config(name: str) -> bool:
    try:
        config_path(name)
    except OccReIDError:
        return False
    return True


def print_metrics(m: Dict) -> None:
    """The one-line summary of an evaluation, then one line per occlusion group."""
    print(
        f"{m.get('dataset', '')} {m.get('method', '')}: mAP {m['mAP']:.1%}  R1 {m['rank1']:.1%}  "
        f"R5 {m['rank5']:.1%}  R10 {m['rank10']:.1%}  mINP {m['mINP']:.1%}  "
        f"({m['num_valid_queries']} queries, {m['num_skipped_queries']} skipped)"
    )
    for g, v in (m.get("by_occlusion") or {}).items():
        print(f"  {g:>9}: mAP {v['mAP']:.1%}  R1 {v['rank1']:.1%}  ({v['num_queries']} queries)")


#: The method ``occreid demo`` trains after the baseline by default, to show them side by side.
DEMO_COMPARE = "dpm"

#: Columns of the side-by-side table: (heading, by_occlusion group or None for all queries).
_SIDE_COLUMNS = (("occluded", "occluded"), ("npo", "npo"), ("ntp", "ntp"), ("holistic", "holistic"), ("all", None))


def side_by_side(results: Dict[str, Dict]) -> str:
    """A table of mAP / R1 (%) per method (rows, in the order given) and query group."""
    head = f"{'method':<10}" + "".join(f"{h:>15}" for h, _ in _SIDE_COLUMNS)
    lines = ["side by side (mAP / R1, %):", head, "-" * len(head)]
    for method, m in results.items():
        cells = []
        for _, g in _SIDE_COLUMNS:
            v = m if g is None else (m.get("by_occlusion") or {}).get(g)
            cells.append(f"{100 * v['mAP']:.1f} / {100 * v['rank1']:.1f}" if v else "-")
        lines.append(f"{method:<10}" + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def run_demo(
    output: str = "outputs/demo",
    data_root: str = "data",
    method: str = "baseline",
    epochs: Optional[int] = None,
    seed: int = 0,
    device: str = "auto",
    overrides: Sequence[str] = (),
) -> Dict:
    out_dir = Path(output)
    ov = [f"output_dir={out_dir}", f"data.root={data_root}", f"device={device}", f"solver.seed={seed}"]
    if epochs is not None:
        ov.append(f"solver.max_epochs={epochs}")
    cfg = load_config(demo_config(method), ov + list(overrides))
    trainer = Trainer(cfg)
    metrics = trainer.train()
    pictures = draw_demo_ranklists(trainer, out_dir / "ranked_occluded_queries.png")
    summary = {
        "metrics": str(out_dir / "metrics.json"),
        "curves": str(out_dir / "curves.png"),
        "ranked_lists": str(pictures),
        "checkpoint": str(out_dir / "model_final.pth"),
    }
    (out_dir / "demo_outputs.json").write_text(json.dumps(summary, indent=2))
    print_metrics(metrics)
    print(f"training curves:   {summary['curves']}")
    print(f"ranked lists:      {summary['ranked_lists']}")
    print(f"metrics:           {summary['metrics']}")
    print(f"model checkpoint:  {summary['checkpoint']}")
    return metrics


def draw_demo_ranklists(trainer, out_png: Path, per_type: int = 3, topk: int = 8) -> Path:
    """Top-k gallery images for a few NPO and NTP queries (same-id same-camera items removed,
    as in the evaluation protocol)."""
    query, gallery = trainer.query, trainer.gallery
    chosen = pick_queries(query, per_type, 2 * per_type, kinds=("npo", "ntp"))
    cfg = trainer.cfg
    model = trainer.unwrapped
    recs = [query[i] for i in chosen] + list(gallery)
    feats = extract_features(model, build_test_loader(cfg, recs, shard=False), trainer.device, trainer.amp,
                             use_cameras=bool(cfg["model"]["sie_camera"]))
    n = len(chosen)
    q = {k: v[:n] for k, v in feats.items()}
    g = {k: v[n:] for k, v in feats.items()}
    spec = method_spec(cfg)
    d = query_gallery_distance(
        q, g, distance=lambda qq, gg: spec.retrieval_distance(model, qq, gg), metric=cfg["test"]["metric"]
    )
    d = torch.as_tensor(d(0, n) if callable(d) else d).float().numpy()
    ranked, matches = top_matches(
        np.argsort(d, axis=1, kind="stable"),
        np.array([query[i].pid for i in chosen]),
        np.array([query[i].camid for i in chosen]),
        np.array([r.pid for r in gallery]),
        np.array([r.camid for r in gallery]),
        topk,
    )
    labels = [f"{getattr(query[i], 'occlusion', None) or ''} id{query[i].pid}" for i in chosen]
    return draw_ranked_lists(
        [query[i].path for i in chosen],
        [r.path for r in gallery],
        ranked,
        matches,
        out_png,
        query_labels=labels,
        thumb_size=tuple(cfg["data"]["size_test"]),
    )
