"""Builders: the only place that turns a config into objects (datasets, loaders, model, solver)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..config import DEFAULTS
from ..data import (
    ImageDataset,
    RandomIdentitySampler,
    build_dataset,
    build_test_transform,
    build_train_transform,
)
from ..data.npo import NPOTransform, build_npo_common_transform, find_occluder_folder
from ..data.synthetic import ensure_synthocc
from ..methods import MethodSpec, get_method
from ..methods import build_model as build_method_model
from ..utils import distributed as du
from ..utils.device import resolve_amp, resolve_device  # noqa: F401  (re-exported for the CLI)
from ..utils.io import OccReIDError
from .checkpoint import load_model_state

logger = logging.getLogger(__name__)


def _dataset_root(cfg: Dict[str, Any], name: str, root: str) -> str:
    """For SynthOcc, the folder holding the preset and seed the config asks for (generated on
    first use where allowed, see :func:`occreid.data.synthetic.ensure_synthocc`)."""
    if name.lower() != "synthocc":
        return root
    preset, seed = cfg["data"]["synth_preset"], int(cfg["data"]["synth_seed"])
    if du.is_main():
        target = ensure_synthocc(root, preset, seed)
    du.barrier()
    if not du.is_main():  # the main process generated it, if that was needed
        target = ensure_synthocc(root, preset, seed, allow_generate=False)
    return str(target)


def build_datasets(cfg: Dict[str, Any]):
    """Returns ``(train_dataset, test_dataset)`` (the same object unless ``data.test_name``)."""
    d = cfg["data"]
    kwargs = dict(d.get("kwargs") or {})
    train_ds = build_dataset(d["name"], _dataset_root(cfg, d["name"], d["root"]), **kwargs)
    if d.get("test_name"):
        troot = d.get("test_root") or d["root"]
        test_ds = build_dataset(
            d["test_name"], _dataset_root(cfg, d["test_name"], troot), **dict(d.get("test_kwargs") or {})
        )
    else:
        test_ds = train_ds
    return train_ds, test_ds


def _occluder_folders(value: Any, data_root: str):
    """``data.occluders`` (a folder or a list = FED*) with relative paths that do not exist
    from the working folder taken relative to ``data.root``."""
    if not value:
        return None

    def one(p: Any) -> Path:
        path = Path(str(p)).expanduser()
        if not path.is_absolute() and not path.exists() and (Path(data_root) / path).exists():
            return Path(data_root) / path
        return path

    if isinstance(value, (list, tuple)):
        return [one(p) for p in value]
    return one(value)


def method_spec(cfg: Dict[str, Any]) -> MethodSpec:
    """The spec of the config's ``model.name``."""
    return get_method(cfg["model"]["name"])


def use_npo(cfg: Dict[str, Any]) -> bool:
    """Whether training batches are FED's 7-channel NPO samples (``data.npo``: ``auto`` = what
    the method requires)."""
    spec = method_spec(cfg)
    npo = cfg["data"].get("npo", "auto")
    if npo == "auto":
        return spec.npo == "required"
    if not isinstance(npo, bool):
        raise OccReIDError(f"data.npo must be auto, true or false, got {npo!r}")
    if not npo and spec.npo == "required":
        raise OccReIDError(f"{spec.name} trains on NPO samples: data.npo=false is not possible with model.name={spec.name}")
    if npo and spec.npo == "unsupported":
        raise OccReIDError(f"data.npo=true is not supported by method {spec.name!r} (it trains on RGB images)")
    return npo


def build_train_loader(cfg: Dict[str, Any], dataset, seed: int):
    d, s = cfg["data"], cfg["solver"]
    if not dataset.train:
        raise OccReIDError(
            f"dataset {dataset.name!r} at {dataset.root} has no training split; "
            "train on another dataset and set data.test_name to evaluate on this one"
        )
    size = tuple(d["size_train"])
    jitter = tuple(d["color_jitter"]) if d.get("color_jitter") else None
    if use_npo(cfg):
        # FED trains on 7-channel samples: clean view, NPO-occluded view, |difference|.
        folder = _occluder_folders(d.get("occluders"), d["root"]) or find_occluder_folder(dataset.root)
        transform = NPOTransform(
            folder,
            size,
            common=build_npo_common_transform(size, color_jitter=jitter, flip_prob=d["flip_prob"], padding=d["padding"]),
            mean=tuple(d["pixel_mean"]),
            std=tuple(d["pixel_std"]),
            vertical_ratio=float(d["npo_vertical_ratio"]),
            patch_aug=str(d["npo_patch_aug"]),
        )
    else:
        transform = build_train_transform(
            size,
            flip_prob=d["flip_prob"],
            padding=d["padding"],
            re_prob=d["re_prob"],
            mean=tuple(d["pixel_mean"]),
            std=tuple(d["pixel_std"]),
            color_jitter=jitter,
            color_jitter_position=d["color_jitter_position"],
        )
    world = du.get_world_size()
    try:
        sampler = RandomIdentitySampler(
            [r.pid for r in dataset.train],
            batch_size=int(s["ims_per_batch"]),
            num_instances=int(d["num_instances"]),
            seed=seed,
            num_replicas=world,
            rank=du.get_rank(),
        )
    except ValueError as exc:  # a dataset too small for the batch, a batch not divisible by the world
        raise OccReIDError(f"{dataset.name} at {dataset.root}: {exc}") from None
    loader = torch.utils.data.DataLoader(
        ImageDataset(dataset.train, transform),
        batch_size=int(s["ims_per_batch"]) // world,
        sampler=sampler,
        num_workers=int(d["num_workers"]),
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    return loader, sampler


def build_test_loader(cfg: Dict[str, Any], records, shard: bool = True):
    """Loader over ``records`` (query + gallery). Under DDP each rank gets a contiguous shard."""
    d = cfg["data"]
    transform = build_test_transform(
        tuple(d["size_test"]), mean=tuple(d["pixel_mean"]), std=tuple(d["pixel_std"])
    )
    ds = ImageDataset(list(records), transform)
    if shard and du.is_dist():
        n, w, r = len(ds), du.get_world_size(), du.get_rank()
        per = (n + w - 1) // w
        ds = torch.utils.data.Subset(ds, range(r * per, min(n, (r + 1) * per)))
    return torch.utils.data.DataLoader(
        ds,
        batch_size=int(cfg["test"]["ims_per_batch"]),
        shuffle=False,
        num_workers=int(d["num_workers"]),
        pin_memory=torch.cuda.is_available(),
    )


def model_meta(cfg: Dict[str, Any], num_classes: int, num_cameras: int, feature_dim: int) -> Dict[str, Any]:
    """What is needed to rebuild the inference model from a checkpoint alone (``options``:
    the method options the model was built with, after resolution)."""
    m, d = cfg["model"], cfg["data"]
    return {
        "method": method_spec(cfg).name,
        "backbone": m["backbone"],
        "img_size": list(d["size_test"]),
        "stride": m["stride"],
        "num_classes": int(num_classes),
        "num_cameras": int(num_cameras),
        "sie_camera": bool(m["sie_camera"]),
        "sie_coef": float(m["sie_coef"]),
        "neck_feat": m["neck_feat"],
        "pixel_mean": list(d["pixel_mean"]),
        "pixel_std": list(d["pixel_std"]),
        "feature_dim": int(feature_dim),
        "kwargs": dict(m.get("kwargs") or {}),
        "options": method_options(cfg),
    }


def method_options(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The options the config's method is built with (shared ``model.*`` keys it has, and
    ``model.kwargs``), checked by name and type."""
    return method_spec(cfg).resolve_options(cfg["model"], DEFAULTS["model"])


def build_model(cfg: Dict[str, Any], num_classes: int, num_cameras: int, *, with_pretrained: bool = True) -> nn.Module:
    m, d = cfg["model"], cfg["data"]
    if tuple(d["size_train"]) != tuple(d["size_test"]):
        raise OccReIDError("data.size_train and data.size_test must be equal for a ViT with learned positions")
    return build_method_model(
        m["name"],
        num_classes=num_classes,
        num_cameras=num_cameras if m["sie_camera"] else 0,
        sie_camera=bool(m["sie_camera"]),
        backbone=m["backbone"],
        img_size=tuple(d["size_train"]),
        stride=m["stride"],
        sie_coef=m["sie_coef"],
        drop_path=m["drop_path"],
        pretrained=m["pretrained"] if with_pretrained else None,
        backbone_kwargs=dict(
            drop_rate=m["drop_rate"], attn_drop_rate=m["attn_drop_rate"], fused_attn=m["fused_attn"],
            grad_checkpointing=bool(m.get("grad_checkpointing", False)),
        ),
        **method_options(cfg),
    )


def model_from_checkpoint(
    ckpt: Dict[str, Any], device: torch.device = torch.device("cpu"), cfg: Optional[Dict[str, Any]] = None
) -> nn.Module:
    """Rebuild the model described by a checkpoint's metadata and load its weights.

    ``cfg``: the config to build from (default: the checkpoint's own), e.g. the checkpoint's
    config with a user's test-time overrides such as ``model.neck_feat=after``."""
    meta = ckpt["model_meta"]
    model = build_model(cfg or ckpt["config"], meta["num_classes"], meta["num_cameras"], with_pretrained=False)
    load_model_state(model, ckpt["model"], "checkpoint")
    return model.to(device).eval()
