"""Pictures: training curves, ranked lists (and, with the methods, occlusion maps)."""

from .curves import plot_training_log
from .ranklist import draw_ranked_lists

__all__ = ["plot_training_log", "draw_ranked_lists"]
