"""Shared by the diagnosis scripts in tools/: one mAP line per feature / distance."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from occreid.evaluation.extract import evaluate_features, split_query_gallery
from occreid.methods.spec import get_method


def print_header(width: int) -> None:
    print(f"{'feature':>{width}} | mAP all | holistic | NPO | NTP | occluded")


def report(name: str, width: int, feats: Dict[str, torch.Tensor], n_query: int,
           groups: Sequence[Optional[str]], model=None, method: str = "dpm") -> None:
    """Evaluate ``feats`` (query rows first; ``feat``, ``pids``, ``camids``, optional ``mask``)
    with the retrieval distance of ``model``'s method (``method``: its registered name), or
    cosine without a model, and print one line."""
    q, g = split_query_gallery(feats, n_query)
    distance = None
    if model is not None:
        spec = get_method(method)
        distance = lambda qq, gg: spec.retrieval_distance(model, qq, gg)  # noqa: E731
    m = evaluate_features(q, g, distance=distance, metric="cosine", query_groups=groups)
    b = m["by_occlusion"]
    print(f"{name:>{width}} | {100 * m['mAP']:7.1f} | {100 * b['holistic']['mAP']:8.1f} | "
          f"{100 * b['npo']['mAP']:4.1f} | {100 * b['ntp']['mAP']:4.1f} | {100 * b['occluded']['mAP']:.1f}")
