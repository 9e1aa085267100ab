"""Market-1501-style datasets: Market-1501, DukeMTMC-reID, Occluded-Duke and SynthOcc.

All four use the same layout and naming::

    <dataset>/
        bounding_box_train/0002_c1s1_000451_03.jpg ...   (train)
        query/0001_c1s1_001051_00.jpg ...                 (query)
        bounding_box_test/0000_c1s1_000151_01.jpg ...     (gallery; pid 0 = distractor, -1 = junk)

pid and camera come from the regex ``([-\\d]+)_c(\\d+)`` searched in the *file name*; camid is
the camera number minus one; pid -1 images are dropped from every split; train pids are
relabelled ``0..C-1`` in ascending order. Files are read in sorted name order.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, List, Optional, Tuple

from ..utils import OccReIDError
from .base import (
    ImageRecord,
    ReIDDataset,
    list_images,
    parse_market_name,
    register_dataset,
    relabel_pids,
)

__all__ = ["MarketStyleDataset", "Market1501", "DukeMTMC", "OccludedDuke", "SynthOcc"]


class MarketStyleDataset(ReIDDataset):
    """Shared parser of the ``bounding_box_train / query / bounding_box_test`` layout."""

    split_dirs: ClassVar[Tuple[Tuple[str, str], ...]] = (
        ("train", "bounding_box_train"),
        ("query", "query"),
        ("gallery", "bounding_box_test"),
    )
    markers = ("bounding_box_train", "query", "bounding_box_test")
    layout = "<dataset>/{bounding_box_train,query,bounding_box_test}/<pid>_c<cam>*.jpg"
    #: Inclusive range of the 1-based camera number in file names.
    cam_range: ClassVar[Tuple[int, int]] = (1, 8)
    #: Inclusive range of valid (non-junk) pids, or None for "any pid >= 0".
    pid_range: ClassVar[Optional[Tuple[int, int]]] = None

    def _parse_split(self, folder: Path) -> List[Tuple[str, int, int]]:
        """(path, raw pid, 0-based camid) of the non-junk images of one split folder."""
        files = list_images(folder)
        if not files:
            raise self._no_images(folder)
        lo_c, hi_c = self.cam_range
        lo_p, hi_p = self.pid_range if self.pid_range is not None else (0, None)
        out = []
        for path in files:
            pid, cam = parse_market_name(path)
            if pid == -1:
                continue  # junk image
            if pid < lo_p or (hi_p is not None and pid > hi_p):
                rng = f"{lo_p}..{hi_p}" if hi_p is not None else f">= {lo_p} (or -1 for junk)"
                raise OccReIDError(
                    f"{self.name}: person id {pid} in {path} is outside the range {rng} of this "
                    f"dataset. Is this the right dataset name for this folder?"
                )
            if not lo_c <= cam <= hi_c:
                raise OccReIDError(
                    f"{self.name}: camera c{cam} in {path} is outside the range c{lo_c}..c{hi_c} "
                    f"of this dataset. Is this the right dataset name for this folder?"
                )
            out.append((path, pid, cam - 1))
        return out

    def _load(self):
        parsed = {split: self._parse_split(self._require_dir(sub)) for split, sub in self.split_dirs}
        self.pid_map = relabel_pids(pid for _, pid, _ in parsed["train"])
        train = [ImageRecord(p, self.pid_map[pid], cam) for p, pid, cam in parsed["train"]]
        query = [ImageRecord(p, pid, cam) for p, pid, cam in parsed["query"]]
        gallery = [ImageRecord(p, pid, cam) for p, pid, cam in parsed["gallery"]]
        return train, query, gallery


@register_dataset("market1501", aliases=("market",))
class Market1501(MarketStyleDataset):
    """Market-1501 (Zheng et al., ICCV 2015): 1,501 ids, 6 cameras.

    Accepted folders under ``root``: ``market1501/`` (TransReID), ``Market-1501-v15.09.15/``
    (fast-reid, bpbreid), ``market1501/Market-1501-v15.09.15/`` (torchreid), or ``root`` itself.
    """

    folder_names = ("market1501", "Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15")
    cam_range = (1, 6)
    pid_range = (0, 1501)


@register_dataset("dukemtmc", aliases=("dukemtmcreid", "duke"))
class DukeMTMC(MarketStyleDataset):
    """DukeMTMC-reID (Ristani et al. 2016 / Zheng et al. 2017): 8 cameras, names like
    ``0001_c2_f0046182.jpg``."""

    folder_names = ("dukemtmcreid", "DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID")
    cam_range = (1, 8)


@register_dataset("occluded_duke", aliases=("occ_duke",))
class OccludedDuke(MarketStyleDataset):
    """Occluded-Duke (Miao et al., ICCV 2019): the DukeMTMC-reID images re-split so that every
    query is occluded; 8 cameras."""

    folder_names = ("Occluded_Duke",)
    cam_range = (1, 8)


@register_dataset("synthocc")
class SynthOcc(OccludedDuke):
    """SynthOcc, occreid's procedural occluded-ReID benchmark (``occreid synth``).

    Exactly the Occluded-Duke parser (cameras c1..c8); its generator also writes
    ``occlusion_meta.csv``, so every record carries its occlusion type.
    """

    folder_names = ("SynthOcc",)
