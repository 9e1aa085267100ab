"""Pictures: ranked lists, occlusion maps and masks, the HTML report (training curves:
:func:`occreid.engine.curves.plot_training_log`)."""

from .ranklist import draw_ranked_lists

__all__ = ["draw_ranked_lists"]
