"""Dataset records, the ``ReIDDataset`` base class, the dataset registry and shared parsing helpers.

A dataset object is a plain, eagerly parsed description of the three splits of a person
re-identification benchmark: lists of :class:`ImageRecord` (absolute path, person id, 0-based
camera id, optional occlusion type). It reads no pixels; :class:`occreid.data.ImageDataset`
does that.

Conventions shared by every loader (they follow TransReID, whose code produced the published
FED/DPM numbers):

* camera ids are 0-based (``c1`` in a file name is camid 0);
* train pids are relabelled to ``0..C-1`` in ascending order of the raw id;
* query/gallery keep their raw ids, so Market-1501's gallery distractors (pid 0) stay;
* pid ``-1`` ("junk") images are dropped from every split;
* files are read in sorted name order, so a dataset is the same on every filesystem.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..utils import OccReIDError, Registry

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "OCCLUSION_TYPES",
    "SPLITS",
    "ImageRecord",
    "ReIDDataset",
    "DATASETS",
    "register_dataset",
    "build_dataset",
    "list_datasets",
    "list_images",
    "list_images_tree",
    "file_stem",
    "parse_market_name",
    "relabel_pids",
    "read_occlusion_meta",
]

#: File suffixes (lower case) treated as images. Anything else in a split folder
#: (``Thumbs.db``, ``.DS_Store``, README files) is ignored silently.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})

#: Values allowed in the ``occlusion`` column of ``occlusion_meta.csv``.
OCCLUSION_TYPES = ("holistic", "npo", "ntp")

#: Split names, in the order datasets and metadata files use them.
SPLITS = ("train", "query", "gallery")

#: Name of the optional per-image occlusion metadata file in a dataset folder.
OCCLUSION_META_FILE = "occlusion_meta.csv"

#: Market/Duke-style file name: ``<pid>_c<cam>...``, searched in the file name (not the path).
MARKET_NAME_RE = re.compile(r"([-\d]+)_c(\d+)")
MARKET_NAME_EXAMPLE = "0002_c1s1_000451_03.jpg"


class ImageRecord(NamedTuple):
    """One image of a dataset split."""

    path: str
    """Absolute path of the image file."""
    pid: int
    """Person id: relabelled ``0..C-1`` in train; the raw id in query/gallery (0 = distractor)."""
    camid: int
    """0-based camera id."""
    occlusion: Optional[str] = None
    """``'holistic'``, ``'npo'`` or ``'ntp'`` when the dataset ships occlusion metadata, else None."""


# --------------------------------------------------------------------------------------------
# File listing and name parsing
# --------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    # Hidden files are skipped: macOS "._0001_c1.jpg" resource forks look like images by name.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: "str | os.PathLike") -> List[str]:
    """Paths (str) of the image files directly inside ``folder`` (not recursive), sorted by
    file name. Strings, not ``Path`` objects: building 100k ``Path`` objects dominates the
    parse time of the large datasets."""
    folder = os.fspath(folder)
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and _is_image_name(e.name)]
    return [os.path.join(folder, n) for n in sorted(names)]


def list_images_tree(folder: "str | os.PathLike") -> List[Tuple[str, Optional[str]]]:
    """Images directly in ``folder`` and in its immediate sub-folders.

    Returns ``(path, subfolder_name)`` pairs; ``subfolder_name`` is None for files lying
    directly in ``folder``. Sorted by (sub-folder, file name); hidden sub-folders are skipped.
    """
    folder = os.fspath(folder)
    out: List[Tuple[str, Optional[str]]] = [(p, None) for p in list_images(folder)]
    with os.scandir(folder) as it:
        subdirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    for sub in subdirs:
        out.extend((p, sub) for p in list_images(os.path.join(folder, sub)))
    return out


def file_stem(path: str) -> str:
    """File name without folder and suffix: ``/a/0001_c1.jpg`` -> ``0001_c1``."""
    return os.path.splitext(os.path.basename(path))[0]


def parse_market_name(path: "str | os.PathLike") -> Tuple[int, int]:
    """``(pid, cam)`` from a Market/Duke-style file name such as ``0002_c1s1_000451_03.jpg``.

    ``cam`` is the 1-based number written in the name. Raises :class:`OccReIDError` naming the
    file and the expected pattern when the name does not parse.
    """
    name = os.path.basename(os.fspath(path))
    m = MARKET_NAME_RE.search(name)
    try:
        if m is None:
            raise ValueError
        return int(m.group(1)), int(m.group(2))
    except ValueError:
        raise OccReIDError(
            f"cannot parse person id and camera from the file name {name!r} ({path}). "
            f"Expected '<pid>_c<camera>...' such as {MARKET_NAME_EXAMPLE!r} "
            f"(regex {MARKET_NAME_RE.pattern!r}). Remove or rename files that do not belong "
            f"to the dataset."
        ) from None


def relabel_pids(pids: Iterable) -> Dict:
    """Map each distinct pid to ``0..C-1`` in ascending order (the TransReID relabelling)."""
    return {pid: label for label, pid in enumerate(sorted(set(pids)))}


def read_occlusion_meta(path: Path) -> Dict[Tuple[str, str], str]:
    """Read ``occlusion_meta.csv`` into ``{(split, filename): occlusion}``.

    The header must contain at least ``split``, ``filename`` and ``occlusion`` (the synthetic
    generator writes ``split,filename,pid,camid,occlusion,side,fraction``). ``split`` must be one
    of train/query/gallery and ``occlusion`` one of holistic/npo/ntp.
    """
    table: Dict[Tuple[str, str], str] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or ())
        missing = {"split", "filename", "occlusion"} - fields
        if missing:
            raise OccReIDError(
                f"{path}: missing column(s) {sorted(missing)} in the header; found "
                f"{reader.fieldnames}. Expected the header 'split,filename,pid,camid,occlusion,"
                f"side,fraction'."
            )
        for row in reader:
            line = reader.line_num
            split = (row["split"] or "").strip()
            name = (row["filename"] or "").strip()
            occ = (row["occlusion"] or "").strip().lower()
            if split not in SPLITS:
                raise OccReIDError(
                    f"{path}, line {line}: split {split!r} is not one of {list(SPLITS)}."
                )
            if occ not in OCCLUSION_TYPES:
                raise OccReIDError(
                    f"{path}, line {line}: occlusion {occ!r} is not one of {list(OCCLUSION_TYPES)}."
                )
            if not name:
                raise OccReIDError(f"{path}, line {line}: empty filename.")
            table[(split, os.path.basename(name))] = occ
    return table


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


def _split_stats(records: Sequence[ImageRecord]) -> Tuple[int, int, int]:
    return (
        len({r.pid for r in records}),
        len(records),
        len({r.camid for r in records}),
    )


class ReIDDataset:
    """Base class of all dataset loaders: three lists of :class:`ImageRecord` and statistics.

    Subclasses set the class attributes below and implement :meth:`_load`; the constructor
    resolves ``root``, parses the splits, attaches occlusion metadata when the dataset folder has
    an ``occlusion_meta.csv``, and checks that query and gallery are not empty.

    Args:
        root: the dataset folder itself, or a folder containing it under one of
            :attr:`folder_names` (tried in order; every tried path is listed if none fits).
    """

    #: Registry name (set by :func:`register_dataset`).
    name: ClassVar[str] = "dataset"
    #: Known names of the dataset folder inside a parent ``root``, tried in order.
    folder_names: ClassVar[Tuple[str, ...]] = ()
    #: Entries whose presence marks a folder as the dataset folder itself.
    markers: ClassVar[Tuple[str, ...]] = ()
    #: Human-readable layout, quoted in error messages.
    layout: ClassVar[str] = ""

    def __init__(self, root: "str | os.PathLike") -> None:
        self.root: Path = self.resolve_root(root)
        #: Raw train id -> train label (filled by loaders that relabel; keys may be str for
        #: the ``folder`` dataset).
        self.pid_map: Dict = {}
        train, query, gallery = self._load()
        self.has_occlusion_meta: bool = False
        meta_path = self.root / OCCLUSION_META_FILE
        if meta_path.is_file():
            train, query, gallery = self._attach_occlusion(meta_path, train, query, gallery)
            self.has_occlusion_meta = True
        self.train: List[ImageRecord] = train
        self.query: List[ImageRecord] = query
        self.gallery: List[ImageRecord] = gallery
        for split, recs in (("query", query), ("gallery", gallery)):
            if not recs:
                raise OccReIDError(
                    f"{self.name}: the {split} set is empty after dropping junk images "
                    f"(pid -1) in {self.root}. Expected layout: {self.layout}"
                )
        logger.info("loaded dataset\n%s", self.summary())

    # -- hooks for subclasses -----------------------------------------------------------------

    def _load(self) -> Tuple[List[ImageRecord], List[ImageRecord], List[ImageRecord]]:
        """Parse ``self.root`` into (train, query, gallery)."""
        raise NotImplementedError

    # -- root resolution ----------------------------------------------------------------------

    @classmethod
    def _looks_like_dataset(cls, folder: Path) -> bool:
        return folder.is_dir() and any((folder / m).exists() for m in cls.markers)

    @classmethod
    def resolve_root(cls, root: "str | os.PathLike") -> Path:
        """The dataset folder: ``root`` itself if it holds any split folder/list file, else
        ``root/<name>`` for the first of :attr:`folder_names` that does."""
        base = Path(os.path.expanduser(os.fspath(root))).resolve()
        if not base.exists():
            raise OccReIDError(
                f"{cls.name}: dataset root {base} does not exist. Pass the dataset folder or the "
                f"folder that contains it. Expected layout: {cls.layout}"
            )
        if not base.is_dir():
            raise OccReIDError(f"{cls.name}: dataset root {base} is a file, not a folder.")
        tried = [base]
        if cls._looks_like_dataset(base):
            return base
        for sub in cls.folder_names:
            cand = base / sub
            tried.append(cand)
            if cls._looks_like_dataset(cand):
                return cand
        tried_txt = "\n  ".join(str(t) for t in tried)
        raise OccReIDError(
            f"{cls.name}: no dataset folder found under {base}. Tried:\n  {tried_txt}\n"
            f"A dataset folder must contain one of {list(cls.markers)}. Expected layout: "
            f"{cls.layout}"
        )

    def _require_dir(self, sub: str, what: str = "split folder") -> Path:
        path = self.root / sub
        if not path.is_dir():
            raise OccReIDError(
                f"{self.name}: {what} {sub!r} not found in {self.root}. Expected layout: "
                f"{self.layout}. Check that the archive was fully extracted."
            )
        return path

    def _no_images(self, folder: Path) -> OccReIDError:
        return OccReIDError(
            f"{self.name}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}. "
            f"Expected layout: {self.layout}"
        )

    # -- occlusion metadata -------------------------------------------------------------------

    def _attach_occlusion(self, meta_path: Path, *splits: List[ImageRecord]):
        table = read_occlusion_meta(meta_path)
        out = []
        for split, recs in zip(SPLITS, splits):
            new = [r._replace(occlusion=table.get((split, os.path.basename(r.path)))) for r in recs]
            missing = sum(r.occlusion is None for r in new)
            if missing:
                logger.warning(
                    "%s: %d of %d %s images have no row in %s; their occlusion type is None",
                    self.name, missing, len(new), split, meta_path,
                )
            out.append(new)
        return tuple(out)

    # -- statistics ---------------------------------------------------------------------------

    @property
    def num_train_pids(self) -> int:
        return _split_stats(self.train)[0]

    @property
    def num_train_imgs(self) -> int:
        return len(self.train)

    @property
    def num_train_cams(self) -> int:
        return _split_stats(self.train)[2]

    @property
    def num_query_pids(self) -> int:
        return _split_stats(self.query)[0]

    @property
    def num_query_imgs(self) -> int:
        return len(self.query)

    @property
    def num_query_cams(self) -> int:
        return _split_stats(self.query)[2]

    @property
    def num_gallery_pids(self) -> int:
        return _split_stats(self.gallery)[0]

    @property
    def num_gallery_imgs(self) -> int:
        return len(self.gallery)

    @property
    def num_gallery_cams(self) -> int:
        return _split_stats(self.gallery)[2]

    @property
    def num_classes(self) -> int:
        """Number of training identities (classifier width); same as :attr:`num_train_pids`."""
        return self.num_train_pids

    @property
    def num_cams(self) -> int:
        """``1 + max camid`` over all splits: the size a camera-embedding (SIE) table needs."""
        cams = [r.camid for recs in (self.train, self.query, self.gallery) for r in recs]
        return max(cams) + 1 if cams else 0

    def _splits(self) -> Tuple[Tuple[str, List[ImageRecord]], ...]:
        return (("train", self.train), ("query", self.query), ("gallery", self.gallery))

    def describe(self) -> dict:
        """The statistics as a JSON-serialisable dict (for ``metrics.json``)."""
        d: dict = {"name": self.name, "root": str(self.root)}
        for split, recs in self._splits():
            pids, imgs, cams = _split_stats(recs)
            d[f"num_{split}_pids"] = pids
            d[f"num_{split}_imgs"] = imgs
            d[f"num_{split}_cams"] = cams
        d["has_occlusion_meta"] = self.has_occlusion_meta
        if self.has_occlusion_meta:
            for split, recs in self._splits():
                counts = Counter(r.occlusion for r in recs)
                d[f"{split}_occlusion"] = {
                    **{k: counts.get(k, 0) for k in OCCLUSION_TYPES},
                    "unknown": counts.get(None, 0),
                }
        return d

    def summary(self) -> str:
        """A small aligned text table of the statistics."""
        header = ["subset", "# ids", "# images", "# cameras"]
        if self.has_occlusion_meta:
            header += list(OCCLUSION_TYPES)
        rows = []
        for split, recs in self._splits():
            pids, imgs, cams = _split_stats(recs)
            row = [split, f"{pids:,}", f"{imgs:,}", f"{cams:,}"]
            if self.has_occlusion_meta:
                counts = Counter(r.occlusion for r in recs)
                row += [f"{counts.get(k, 0):,}" for k in OCCLUSION_TYPES]
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def fmt(row: List[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            return "  " + " | ".join(cells)

        sep = "  " + "-+-".join("-" * w for w in widths)
        return "\n".join([f"{self.name} ({self.root})", fmt(header), sep, *map(fmt, rows)])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, train={len(self.train)}, "
            f"query={len(self.query)}, gallery={len(self.gallery)})"
        )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

DATASETS: Registry = Registry("dataset")


def register_dataset(name: str, aliases: Sequence[str] = ()) -> Callable[[type], type]:
    """Class decorator: register a :class:`ReIDDataset` subclass under ``name`` (and aliases).

    The class's ``name`` attribute is set to ``name``.

    >>> @register_dataset("mydata")
    ... class MyData(ReIDDataset): ...
    """
    register = DATASETS.register(name, aliases=tuple(aliases))

    def deco(cls: type) -> type:
        cls.name = name
        return register(cls)

    return deco


def build_dataset(name: str, root: "str | os.PathLike", **kwargs) -> ReIDDataset:
    """Build the dataset registered as ``name`` (or an alias) from ``root``.

    Extra keyword arguments go to the loader (e.g. ``combine_val=False`` for MSMT17).
    Raises :class:`OccReIDError` for an unknown name (with a "did you mean" hint).
    """
    try:
        cls = DATASETS.get(name)
    except KeyError as exc:
        raise OccReIDError(exc.args[0]) from None
    return cls(root, **kwargs)


def list_datasets() -> List[str]:
    """Canonical names of the registered datasets (aliases not listed), sorted."""
    return DATASETS.names()
