"""DPM's query-mask retrieval distance for the evaluator (dpm-official.md §7).

It belongs to the DPM method and lives in :mod:`occreid.methods.dpm.retrieval`; the
evaluator, the gallery index and the benchmarks use it from here.
"""

from ..methods.dpm.retrieval import (  # noqa: F401
    BACKENDS,
    CHUNK_ELEMENTS,
    DEN_PIECE_ELEMENTS,
    MASKED_DISTANCES,
    MaskedCosineDistance,
    masked_distance_matrix,
)

__all__ = ["BACKENDS", "CHUNK_ELEMENTS", "DEN_PIECE_ELEMENTS", "MASKED_DISTANCES", "MaskedCosineDistance", "masked_distance_matrix"]
