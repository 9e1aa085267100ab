"""``ImageDataset``: a torch ``Dataset`` over :class:`ImageRecord` lists."""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional, Sequence

from torch.utils.data import Dataset

from ..utils import read_image
from .base import ImageRecord

__all__ = ["ImageDataset"]


class ImageDataset(Dataset):
    """Reads the images of a list of records, applies ``transform`` and returns a dict.

    ``dataset[i]`` is ``{"images": Tensor[3, H, W] (a PIL image when transform is None),
    "pids": int, "camids": int, "index": i}``; ``index`` points back into ``records`` (for paths,
    occlusion types). Images are read with :func:`occreid.utils.read_image`, so a missing or
    corrupt file raises :class:`occreid.utils.OccReIDError` naming its path. The object holds
    only the records and the transform, so it pickles into DataLoader workers.

    >>> ds = build_dataset("market1501", "data")
    >>> train_set = ImageDataset(ds.train, build_train_transform())
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        index, n = operator.index(index), len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for an ImageDataset of {n} images")
        index %= n
        record = self.records[index]
        image = read_image(record.path)
        if self.transform is not None:
            image = self.transform(image)
        return {"images": image, "pids": record.pid, "camids": record.camid, "index": index}
