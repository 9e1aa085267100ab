"""Shared by the diagnosis scripts in tools/: one mAP line per feature / distance."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from occreid.evaluation.extract import evaluate_features, split_query_gallery


def print_header(width: int) -> None:
    print(f"{'feature':>{width}} | mAP all | holistic | NPO | NTP | occluded")


def report(name: str, width: int, feats: Dict[str, torch.Tensor], n_query: int,
           groups: Sequence[Optional[str]], model=None) -> None:
    """Evaluate ``feats`` (query rows first; ``feat``, ``pids``, ``camids``, optional ``mask``)
    with ``model``'s own distance, or cosine without a model, and print one line."""
    q, g = split_query_gallery(feats, n_query)
    m = evaluate_features(q, g, model=model, metric="cosine", query_groups=groups)
    b = m["by_occlusion"]
    print(f"{name:>{width}} | {100 * m['mAP']:7.1f} | {100 * b['holistic']['mAP']:8.1f} | "
          f"{100 * b['npo']['mAP']:4.1f} | {100 * b['ntp']['mAP']:4.1f} | {100 * b['occluded']['mAP']:.1f}")
