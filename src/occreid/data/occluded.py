"""Test-only occluded/partial benchmarks: Occluded-REID and Partial-REID.

Neither dataset has camera labels or a training split (the usual protocol trains on
Market-1501 and tests on the whole set). **Camera policy:** every query image gets camid 0 and
every gallery image camid 1. The evaluator's "same pid and same camera" filter therefore removes
no gallery image, and every query keeps all its whole-body matches. This is bpbreid's policy and
has the same effect as DPM's ``Rename.py`` (query ``c1``, gallery ``c3``). Parsing the camera
from the ``<pid>_<k>`` image index (fast-reid's PartialReID project) would instead drop the
gallery image with the same index as the query, and change the numbers.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import ClassVar, List, Optional, Tuple

from ..utils import OccReIDError
from .base import (
    ImageRecord,
    ReIDDataset,
    file_stem,
    list_images,
    list_images_tree,
    parse_market_name,
    register_dataset,
)

__all__ = ["OccludedREID", "PartialREID", "QUERY_CAMID", "GALLERY_CAMID"]

#: Camera ids given to query and gallery images of datasets without camera labels.
QUERY_CAMID = 0
GALLERY_CAMID = 1


def _pid_from_name(path: str, folder: Optional[str], dataset: str) -> int:
    """pid from ``<pid>_<k>.<ext>``; falls back to the numeric identity folder name."""
    head = file_stem(path).split("_")[0]
    if head.isdigit():
        return int(head)
    if folder is not None and folder.isdigit():
        return int(folder)
    raise OccReIDError(
        f"{dataset}: cannot parse a person id from {path}. Expected '<pid>_<k>' file names such "
        f"as '001_01.tif' (or a numeric identity folder '<pid>/')."
    )


class _TwoFolderTestSet(ReIDDataset):
    """A test-only dataset: one folder of query images, one of gallery images."""

    #: (query folder, gallery folder) of the original release.
    original_dirs: ClassVar[Tuple[str, str]] = ("", "")
    #: (query folder, gallery folder) of a Market-style renamed copy, if one is accepted.
    renamed_dirs: ClassVar[Optional[Tuple[str, str]]] = None

    def __init__(
        self, root: "str | os.PathLike", query_camid: int = QUERY_CAMID, gallery_camid: int = GALLERY_CAMID
    ) -> None:
        """``query_camid``/``gallery_camid`` are the made-up cameras (defaults 0 and 1). They must
        differ so that the same-id same-camera filter removes nothing; they matter beyond that
        only for a model with a camera embedding (SIE): DPM's renaming script gives the gallery
        camera index 2, so its Market -> Occluded-REID config sets ``gallery_camid: 2``."""
        if int(query_camid) == int(gallery_camid):
            raise OccReIDError(
                f"{type(self).__name__}: query_camid and gallery_camid must differ (got {query_camid}); "
                "otherwise every true match is removed by the same-camera filter"
            )
        self.query_camid, self.gallery_camid = int(query_camid), int(gallery_camid)
        super().__init__(root)

    def _parse_original(self, folder: Path) -> List[Tuple[str, int]]:
        items = list_images_tree(folder)
        if not items:
            raise self._no_images(folder)
        return [(p, _pid_from_name(p, sub, self.name)) for p, sub in items]

    def _parse_renamed(self, folder: Path) -> List[Tuple[str, int]]:
        files = list_images(folder)
        if not files:
            raise self._no_images(folder)
        out = []
        for p in files:
            pid, _ = parse_market_name(p)  # the renamed cameras are ignored (policy above)
            if pid != -1:
                out.append((p, pid))
        return out

    def _load(self):
        q_sub, g_sub = self.original_dirs
        use_renamed = (
            self.renamed_dirs is not None
            and not any((self.root / d).exists() for d in self.original_dirs)
        )
        if use_renamed:
            q_sub, g_sub = self.renamed_dirs
            parse = self._parse_renamed
        else:
            parse = self._parse_original
        query = [ImageRecord(p, pid, self.query_camid) for p, pid in parse(self._require_dir(q_sub))]
        gallery = [ImageRecord(p, pid, self.gallery_camid) for p, pid in parse(self._require_dir(g_sub))]
        return [], query, gallery


@register_dataset("occluded_reid", aliases=("occ_reid",))
class OccludedREID(_TwoFolderTestSet):
    """Occluded-REID (Zhuo et al., ICME 2018): 200 ids x (5 occluded + 5 whole-body) images.

    Layouts (tried in this order)::

        Occluded_REID/occluded_body_images/<pid>/<pid>_<k>.tif   -> query   (camid 0)
        Occluded_REID/whole_body_images/<pid>/<pid>_<k>.tif      -> gallery (camid 1)
        (files may also lie directly in those two folders)

        Occluded_REID/query/0001_c1s1_000050_00.tif              -> query   (DPM Rename.py copy)
        Occluded_REID/bounding_box_test/0001_c3s3_000050_00.tif  -> gallery

    When both exist (``Rename.py`` copies), the original folders are used. No training split.
    """

    folder_names = ("Occluded_REID", "OccludedREID")
    markers = ("occluded_body_images", "whole_body_images", "query", "bounding_box_test")
    layout = (
        "<dataset>/{occluded_body_images,whole_body_images}/<pid>/<pid>_<k>.tif, or the "
        "DPM-renamed <dataset>/{query,bounding_box_test}/<pid>_c<cam>*.tif"
    )
    original_dirs = ("occluded_body_images", "whole_body_images")
    renamed_dirs = ("query", "bounding_box_test")


@register_dataset("partial_reid")
class PartialREID(_TwoFolderTestSet):
    """Partial-REID (Zheng et al., ICCV 2015): 60 ids, 300 partial + 300 whole-body images.

    Layout::

        Partial_REID/partial_body_images/<pid>_<k>.jpg   -> query   (camid 0)
        Partial_REID/whole_body_images/<pid>_<k>.jpg     -> gallery (camid 1)

    Identity sub-folders (``<pid>/<pid>_<k>.jpg``) are accepted too. No training split.
    """

    folder_names = ("Partial_REID", "Partial-REID", "PartialREID")
    markers = ("partial_body_images", "whole_body_images")
    layout = "<dataset>/{partial_body_images,whole_body_images}/<pid>_<k>.jpg"
    original_dirs = ("partial_body_images", "whole_body_images")
