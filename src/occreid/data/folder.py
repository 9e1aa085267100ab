"""``folder``: a user's own images, organised by identity folders or by Market-style names.

Layout (``train/`` is optional, for test-only use)::

    <root>/
        train/   query/   gallery/

where each split folder holds either

* identity sub-folders ``<pid_name>/<image>``: the pid is the folder name, any string
  (``0001``, ``alice``); or
* flat files ``<pid>_c<cam>_<anything>.jpg`` (or ``<pid>_<anything>.jpg`` without a camera);
  the pid is the text before the first ``_``

(both may be mixed in one split). A ``_c<cam>`` (or leading ``c<cam>_``) token in the file name
gives the 1-based camera, so ``0001_c2_f01.jpg`` and ``alice/img_c2_01.jpg`` are camid 1.

Pids: integer names keep their value (``0007`` -> 7), so numeric ids mean the same in query and
gallery. If any query/gallery name is not an integer, all query/gallery names are numbered
``0..N-1`` in sorted order over the union of the two splits, so one name is one id in both.
Train pids are relabelled ``0..C-1`` (numeric order for numeric names, else sorted names).
Images whose pid is ``-1`` are dropped as junk.

**Camera policy** (per split group, query+gallery together, train separately): if every image
has a camera token, those cameras are used; if none has one, query images get camid 0 and
gallery images camid 1 (as for Occluded-REID), so the evaluator's same-camera filter removes
nothing, and train images get camid 0. A mix of images with and without a camera token is an
error, because the two conventions would collide.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..utils import OccReIDError
from .base import ImageRecord, ReIDDataset, file_stem, list_images_tree, register_dataset
from .occluded import GALLERY_CAMID, QUERY_CAMID

__all__ = ["FolderDataset"]

#: A camera token: ``c<digits>`` at the start of the name or right after an underscore.
CAMERA_TOKEN_RE = re.compile(r"(?:^|_)c(\d+)")

_Item = Tuple[str, str, Optional[int]]  # (path, pid name, 1-based camera or None)


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def _name_order(names) -> List[str]:
    names = set(names)
    if all(_is_int(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


@register_dataset("folder")
class FolderDataset(ReIDDataset):
    """Generic dataset from ``<root>/{train,query,gallery}/`` (see the module docstring).

    Attributes besides :class:`ReIDDataset`'s: ``pid_map`` (train pid name -> label) and
    ``test_pid_map`` (query/gallery pid name -> pid).
    """

    markers = ("train", "query", "gallery")
    layout = (
        "<root>/{train (optional),query,gallery}/ with identity folders <pid>/<image> or "
        "flat files <pid>_c<cam>_*.jpg"
    )

    def _parse_split(self, folder: Path) -> List[_Item]:
        entries = list_images_tree(folder)
        if not entries:
            raise self._no_images(folder)
        out: List[_Item] = []
        for path, sub in entries:
            stem = file_stem(path)
            if sub is not None:
                pid_name = sub
            else:
                if "_" not in stem:
                    raise OccReIDError(
                        f"{self.name}: cannot tell the person id of {path}. Flat files must be "
                        f"named '<pid>_c<cam>_<anything>' such as '0001_c2_f01.jpg' (or "
                        f"'<pid>_<anything>'); or put each identity's images in a sub-folder "
                        f"named after it: {folder}/<pid>/<image>."
                    )
                pid_name = stem.split("_")[0]
            if pid_name.strip() == "-1":
                continue  # junk, as in Market-1501
            m = CAMERA_TOKEN_RE.search(stem)
            cam = int(m.group(1)) if m else None
            if cam is not None and cam < 1:
                raise OccReIDError(
                    f"{self.name}: camera token 'c{cam}' in {path}: camera numbers are 1-based "
                    f"(c1 is the first camera)."
                )
            out.append((path, pid_name, cam))
        return out

    def _camids(self, groups: Dict[str, List[_Item]], fallback: Dict[str, int]) -> Dict[str, List[int]]:
        items = [it for its in groups.values() for it in its]
        with_cam = [it for it in items if it[2] is not None]
        if with_cam and len(with_cam) < len(items):
            without = next(it for it in items if it[2] is None)
            raise OccReIDError(
                f"{self.name}: some images of {'/'.join(groups)} have a camera token "
                f"('_c<cam>', e.g. {os.path.basename(with_cam[0][0])!r}) and some do not "
                f"(e.g. {without[0]}). Name all of them with cameras, or none (then query gets "
                f"camera 0 and gallery camera 1)."
            )
        if with_cam:
            return {s: [it[2] - 1 for it in its] for s, its in groups.items()}
        return {s: [fallback[s]] * len(its) for s, its in groups.items()}

    def _load(self):
        train_items: List[_Item] = []
        if (self.root / "train").exists():
            train_items = self._parse_split(self._require_dir("train"))
        test = {s: self._parse_split(self._require_dir(s)) for s in ("query", "gallery")}

        # Train: relabel 0..C-1.
        self.pid_map = {n: i for i, n in enumerate(_name_order(it[1] for it in train_items))}
        train_cams = self._camids({"train": train_items}, {"train": 0})["train"]
        train = [
            ImageRecord(p, self.pid_map[n], c) for (p, n, _), c in zip(train_items, train_cams)
        ]

        # Query/gallery: one name -> one id across both splits.
        names = {it[1] for its in test.values() for it in its}
        if all(_is_int(n) for n in names):
            self.test_pid_map = {n: int(n) for n in names}
        else:
            self.test_pid_map = {n: i for i, n in enumerate(_name_order(names))}
        cams = self._camids(test, {"query": QUERY_CAMID, "gallery": GALLERY_CAMID})
        query, gallery = (
            [ImageRecord(p, self.test_pid_map[n], c) for (p, n, _), c in zip(test[s], cams[s])]
            for s in ("query", "gallery")
        )
        return train, query, gallery
