"""Feature extraction over a loader and end-to-end evaluation of a model on query/gallery.

The model contract (:mod:`occreid.methods`): in eval mode ``model(images, cam_ids=...)``
returns a mapping with key ``"feat"`` plus named extras (e.g. DPM's ``"mask"``). A method
with a distance of its own (DPM's query mask) passes it as ``distance(query, gallery)``,
returning a matrix, a block callable accepted by :func:`occreid.evaluation.evaluate_rank`,
or ``None`` for the plain distance.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data.base import OCCLUSION_TYPES
from ..utils import distributed as du
from ..utils.device import autocast_context
from .distance import compute_distance
from .rank import evaluate_rank
from .rerank import re_ranking as rerank_fn

logger = logging.getLogger(__name__)

#: The occlusion types reported per group (one constant for loaders, SynthOcc and metrics).
OCCLUSION_GROUPS = OCCLUSION_TYPES


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device,
    amp: Optional[torch.dtype] = None,
    use_cameras: bool = True,
) -> Dict[str, torch.Tensor]:
    """Run ``model`` in eval mode over ``loader``; returns concatenated float32 CPU tensors.

    Keys: ``feat`` (and any other tensor outputs of the model), ``pids``, ``camids``, ``index``.
    Under ``torch.distributed`` each rank runs its own loader shard and the results are gathered
    (in index order) on every rank.
    """
    was_training = model.training
    model.eval()
    outs: Dict[str, List[torch.Tensor]] = {}
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        cams = batch["camids"].to(device) if use_cameras else None
        with autocast_context(device, amp):
            out = model(images, cam_ids=cams)
        if not isinstance(out, Mapping) or "feat" not in out:
            raise TypeError(f"{type(model).__name__} in eval mode must return a mapping with 'feat', got {type(out).__name__}")
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                outs.setdefault(k, []).append(v.detach().float().cpu())
        for k in ("pids", "camids", "index"):
            outs.setdefault(k, []).append(torch.as_tensor(batch[k]).cpu())
    model.train(was_training)
    result = {k: torch.cat(v, 0) for k, v in outs.items()}
    if du.is_dist():
        gathered = {k: du.all_gather_cat(v.to(device)).cpu() for k, v in result.items()}
        order = torch.argsort(gathered["index"])
        result = {k: v[order] for k, v in gathered.items()}
    return result


def split_query_gallery(feats: Dict[str, torch.Tensor], n_query: int):
    """``(query, gallery)`` dicts from features extracted over ``query + gallery`` records."""
    q = {k: v[:n_query] for k, v in feats.items()}
    g = {k: v[n_query:] for k, v in feats.items()}
    return q, g


def query_gallery_distance(
    query: Dict[str, torch.Tensor],
    gallery: Dict[str, torch.Tensor],
    *,
    distance: Optional[Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Any]] = None,
    feat_norm: bool = True,
    metric: str = "euclidean",
    re_ranking: bool = False,
    rerank_params: Sequence[float] = (20, 6, 0.3),
):
    """The method's own distance (``distance(query, gallery)``: a matrix or a block callable)
    when it gives one, else ``metric`` on (L2-normalised) features, optionally k-reciprocal
    re-ranked."""
    if distance is not None:
        dist = distance(query, gallery)  # None: the method has no distance of its own here
        if dist is not None:
            return dist
    qf, gf = query["feat"], gallery["feat"]
    if feat_norm:
        qf = torch.nn.functional.normalize(qf, dim=1)
        gf = torch.nn.functional.normalize(gf, dim=1)
    if re_ranking:
        k1, k2, lam = rerank_params
        return rerank_fn(qf, gf, k1=int(k1), k2=int(k2), lambda_value=float(lam))
    return compute_distance(qf, gf, metric=metric)


def evaluate_features(
    query: Dict[str, torch.Tensor],
    gallery: Dict[str, torch.Tensor],
    *,
    distance: Optional[Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Any]] = None,
    feat_norm: bool = True,
    metric: str = "euclidean",
    max_rank: int = 50,
    re_ranking: bool = False,
    rerank_params: Sequence[float] = (20, 6, 0.3),
    query_groups: Optional[Sequence[Optional[str]]] = None,
) -> Dict[str, Any]:
    """Distances and ranking metrics, overall and per query group (occlusion type)."""
    dist = query_gallery_distance(
        query, gallery, distance=distance, feat_norm=feat_norm, metric=metric,
        re_ranking=re_ranking, rerank_params=rerank_params,
    )
    q_pids, g_pids = query["pids"].numpy(), gallery["pids"].numpy()
    q_cams, g_cams = query["camids"].numpy(), gallery["camids"].numpy()
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, return_per_query=True)
    metrics = summarise(res)
    if query_groups is not None and any(g is not None for g in query_groups):
        groups = np.asarray([g if g is not None else "unknown" for g in query_groups])
        valid = np.asarray(res["valid_mask"], dtype=bool)
        ap_all = np.zeros(len(groups))
        inp_all = np.zeros(len(groups))
        fmr_all = np.full(len(groups), np.iinfo(np.int64).max, dtype=np.int64)
        ap_all[valid] = np.asarray(res["ap"])
        inp_all[valid] = np.asarray(res["inp"])
        fmr_all[valid] = np.asarray(res["first_match_rank"])
        def subset(sel: np.ndarray) -> Dict[str, Any]:
            return {
                "num_queries": int(sel.sum()),
                "mAP": float(ap_all[sel].mean()),
                "mINP": float(inp_all[sel].mean()),
                "rank1": float((fmr_all[sel] <= 1).mean()),
                "rank5": float((fmr_all[sel] <= 5).mean()),
                "rank10": float((fmr_all[sel] <= 10).mean()),
            }

        masks = {g: groups == g for g in OCCLUSION_GROUPS if g in set(groups)}
        masks.update({g: groups == g for g in sorted(set(groups) - set(OCCLUSION_GROUPS))})
        masks["occluded"] = np.isin(groups, ("npo", "ntp"))
        per = {name: subset(m & valid) for name, m in masks.items() if (m & valid).any()}
        metrics["by_occlusion"] = per
    return metrics


def summarise(res: Mapping[str, Any]) -> Dict[str, Any]:
    cmc = np.asarray(res["cmc"], dtype=np.float64)
    return {
        "rank1": float(res["rank1"]),
        "rank5": float(res["rank5"]),
        "rank10": float(res["rank10"]),
        "mAP": float(res["mAP"]),
        "mINP": float(res["mINP"]),
        "num_valid_queries": int(res["num_valid_queries"]),
        "num_skipped_queries": int(res["num_skipped_queries"]),
        "cmc": [float(c) for c in cmc[:20]],
    }
