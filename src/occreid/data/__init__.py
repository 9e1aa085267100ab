"""Datasets, the PK identity sampler and image transforms.

>>> from occreid.data import build_dataset, build_train_transform, ImageDataset, RandomIdentitySampler
>>> ds = build_dataset("occluded_duke", "data")           # data/Occluded_Duke/...
>>> train_set = ImageDataset(ds.train, build_train_transform())
>>> sampler = RandomIdentitySampler([r.pid for r in ds.train], batch_size=64, num_instances=4)
"""

from .base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    OCCLUSION_TYPES,
    ImageRecord,
    ReIDDataset,
    build_dataset,
    list_datasets,
    register_dataset,
)
from .market import DukeMTMC, Market1501, MarketStyleDataset, OccludedDuke, SynthOcc
from .msmt import MSMT17
from .occluded import OccludedREID, PartialREID
from .folder import FolderDataset
from .image_dataset import ImageDataset
from .sampler import RandomIdentitySampler
from .transforms import RandomErasing, build_test_transform, build_train_transform

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "OCCLUSION_TYPES",
    "ImageRecord",
    "ReIDDataset",
    "build_dataset",
    "list_datasets",
    "register_dataset",
    "MarketStyleDataset",
    "Market1501",
    "DukeMTMC",
    "OccludedDuke",
    "SynthOcc",
    "MSMT17",
    "OccludedREID",
    "PartialREID",
    "FolderDataset",
    "ImageDataset",
    "RandomIdentitySampler",
    "RandomErasing",
    "build_train_transform",
    "build_test_transform",
]
