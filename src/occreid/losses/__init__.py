"""Losses shared by the methods: identity (cross-entropy) and batch-hard triplet.

Method-specific losses (FED's memory contrastive loss, DPM's HEM / ArcFace, ...) live in
their own modules in this package.
"""

from .id_loss import CrossEntropyLabelSmooth
from .triplet import TripletLoss, euclidean_dist, hard_example_mining

__all__ = ["CrossEntropyLabelSmooth", "TripletLoss", "euclidean_dist", "hard_example_mining"]
