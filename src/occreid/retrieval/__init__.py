"""Gallery index and search: exact (torch) or faiss, cosine or DPM's query-mask distance.

Five-line use::

    from occreid import FeatureExtractor
    from occreid.retrieval import GalleryIndex
    ex = FeatureExtractor("outputs/demo/model_final.pth")
    index = GalleryIndex.from_folder(ex, "gallery/"); index.save("gallery.idx")
    hits = GalleryIndex.load("gallery.idx").search(ex.extract("query.jpg"), k=10)

faiss (``pip install occreid[faiss]``) is imported only when a faiss index is built or loaded.
"""

from .index import (
    BACKENDS,
    INDEX_FORMAT,
    GalleryIndex,
    SearchResult,
    exact_topk,
    list_gallery_images,
    masked_numerator_queries,
    masked_rescore,
)
from .faiss_backend import FAISS_KINDS, FaissSearcher, faiss_available

__all__ = [
    "BACKENDS",
    "FAISS_KINDS",
    "INDEX_FORMAT",
    "FaissSearcher",
    "GalleryIndex",
    "SearchResult",
    "exact_topk",
    "faiss_available",
    "list_gallery_images",
    "masked_numerator_queries",
    "masked_rescore",
]
