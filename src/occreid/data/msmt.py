"""MSMT17 (Wei et al., CVPR 2018): 4,101 ids, 15 cameras, split by list files.

Two releases are accepted::

    MSMT17_V1/                          MSMT17_V2/
        train/0000/0000_000_01_0303morning_0015_0.jpg     mask_train_v2/0000/...
        test/0000/...                                      mask_test_v2/0000/...
        list_train.txt  list_val.txt                       (same four list files)
        list_query.txt  list_gallery.txt

Each list line is ``<relative path> <pid>``, e.g. ``0000/0000_000_01_0303morning_0015_0.jpg 0``;
the pid is taken from the list and the camera from the third ``_`` field of the file name
(``01`` -> camid 0). ``list_train``/``list_val`` images live in the train folder,
``list_query``/``list_gallery`` images in the test folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

from ..utils import OccReIDError
from .base import ImageRecord, ReIDDataset, register_dataset, relabel_pids

__all__ = ["MSMT17"]

_NUM_CAMS = 15


@register_dataset("msmt17", aliases=("msmt",))
class MSMT17(ReIDDataset):
    """MSMT17, V1 or V2 layout (detected from the folder names).

    Args:
        root: the dataset folder, or a folder containing ``MSMT17/``, ``MSMT17_V1/``,
            ``MSMT17_V2/``, ``msmt17/MSMT17_V1/`` or ``msmt17/MSMT17_V2/``.
        combine_val: train on ``list_train + list_val`` (True, what TransReID/FED/DPM do, and
            what their published MSMT17 numbers use: 1,041 ids / 32,621 images) or on
            ``list_train`` only (False, the torchreid / fast-reid default: 30,248 images).
            Train pids are relabelled ``0..C-1`` over the images actually used.
    """

    folder_names = ("MSMT17", "MSMT17_V1", "MSMT17_V2", "msmt17/MSMT17_V1", "msmt17/MSMT17_V2")
    markers = (
        "list_train.txt", "list_query.txt", "list_gallery.txt",
        "train", "test", "mask_train_v2", "mask_test_v2",
    )
    layout = (
        "<dataset>/{train,test}/ (V1) or {mask_train_v2,mask_test_v2}/ (V2) plus "
        "list_train.txt, list_val.txt, list_query.txt, list_gallery.txt"
    )

    def __init__(self, root: "str | os.PathLike", combine_val: bool = True) -> None:
        self.combine_val = bool(combine_val)
        super().__init__(root)

    @property
    def version(self) -> str:
        """``'V2'`` when the ``mask_*_v2`` folders exist, else ``'V1'``."""
        v2 = (self.root / "mask_train_v2").is_dir() or (self.root / "mask_test_v2").is_dir()
        return "V2" if v2 else "V1"

    def _read_list(self, list_name: str, image_dir: Path) -> List[Tuple[str, int, int]]:
        list_path = self.root / list_name
        if not list_path.is_file():
            raise OccReIDError(
                f"{self.name}: list file {list_name!r} not found in {self.root}. Expected "
                f"layout: {self.layout}. The list files ship with the MSMT17 archive."
            )
        out = []
        folder = os.fspath(image_dir)
        with open(list_path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.split()
                try:
                    if len(parts) != 2:
                        raise ValueError
                    rel, pid = parts[0], int(parts[1])
                    cam = int(os.path.basename(rel).split("_")[2])
                except (ValueError, IndexError):
                    raise OccReIDError(
                        f"{list_path}, line {line_no}: cannot parse {line!r}. Expected "
                        f"'<pid>/<pid>_<idx>_<cam>_<date>_<frame>_<k>.jpg <pid>', e.g. "
                        f"'0000/0000_000_01_0303morning_0015_0.jpg 0'."
                    ) from None
                if not 1 <= cam <= _NUM_CAMS:
                    raise OccReIDError(
                        f"{list_path}, line {line_no}: camera {cam} outside 1..{_NUM_CAMS}."
                    )
                out.append((os.path.join(folder, rel), pid, cam - 1))
        if not out:
            raise OccReIDError(f"{self.name}: list file {list_path} has no entries.")
        return out

    def _load(self):
        v2 = self.version == "V2"
        train_dir = self._require_dir("mask_train_v2" if v2 else "train", "image folder")
        test_dir = self._require_dir("mask_test_v2" if v2 else "test", "image folder")
        train_items = self._read_list("list_train.txt", train_dir)
        if self.combine_val:
            train_items += self._read_list("list_val.txt", train_dir)
        self.pid_map = relabel_pids(pid for _, pid, _ in train_items)
        train = [ImageRecord(p, self.pid_map[pid], cam) for p, pid, cam in train_items]
        query = [ImageRecord(p, pid, cam) for p, pid, cam in self._read_list("list_query.txt", test_dir)]
        gallery = [
            ImageRecord(p, pid, cam) for p, pid, cam in self._read_list("list_gallery.txt", test_dir)
        ]
        return train, query, gallery
