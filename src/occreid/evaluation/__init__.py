"""Evaluation: distances, ranking metrics (CMC / mAP / mINP) and k-reciprocal re-ranking.

Five-line use::

    from occreid.evaluation import compute_distance, evaluate_rank
    dist = compute_distance(qf, gf, "euclidean", normalize=True)   # [nq, ng]
    res = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids)
    print(res.summary())            # mAP, mINP, R1/R5/R10, valid/skipped queries
    res["cmc"], res["mAP"]          # RankResult is also a read-only mapping
"""

from .distance import (
    DISTANCE_METRICS,
    DistanceBlocks,
    EvaluationInputError,
    compute_distance,
    normalize_features,
)
from .rank import BlockDistance, RankResult, evaluate_rank
from .masked_distance import MaskedCosineDistance, masked_distance_matrix
from .rerank import re_ranking

__all__ = [
    "BlockDistance",
    "DISTANCE_METRICS",
    "DistanceBlocks",
    "EvaluationInputError",
    "MaskedCosineDistance",
    "masked_distance_matrix",
    "RankResult",
    "compute_distance",
    "evaluate_rank",
    "normalize_features",
    "re_ranking",
]
