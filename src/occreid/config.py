"""Configuration: nested defaults, YAML files, ``key=value`` overrides, strict key checking.

A config is a plain nested ``dict``. Only the builders (``occreid.engine.build``) read it;
models and losses take plain arguments. Every YAML file and every command-line override is
checked against :data:`DEFAULTS`: an unknown key is an error naming the key and suggesting the
nearest valid one, so a typo never silently falls back to a default.

A YAML file may start with ``_base_: other.yaml`` (a path relative to the file) to inherit.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import yaml

from .configs import config_path
from .utils.io import OccReIDError

# Defaults reproduce the TransReID ViT-B baseline recipe (transreid-backbone.md §3-§4).
DEFAULTS: Dict[str, Any] = {
    "model": {
        "name": "baseline",  # baseline | fed | dpm
        "backbone": "vit_base_patch16",
        "pretrained": None,  # local checkpoint path, or "timm:<name>"
        "stride": 16,
        "sie_camera": False,
        "sie_coef": 3.0,
        "drop_path": 0.1,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "neck_feat": "before",  # test feature: cls token before or after BNNeck
        "label_smoothing": 0.0,
        "triplet_margin": None,  # None = soft margin (official)
        "id_loss_weight": 1.0,
        "triplet_loss_weight": 1.0,
        "fused_attn": True,
        "grad_checkpointing": False,  # activation checkpointing of the ViT blocks (GPU memory)
        "kwargs": {},  # method-specific arguments (FED, DPM switches)
    },
    "data": {
        "name": "synthocc",  # training (and default test) dataset
        "root": "data",
        "test_name": None,  # cross-dataset protocol: test on another dataset (e.g. occluded_reid)
        "test_root": None,
        "kwargs": {},  # extra dataset arguments (e.g. combine_val for msmt17)
        "test_kwargs": {},  # extra arguments of the test dataset (e.g. gallery_camid for occluded_reid)
        "size_train": [256, 128],
        "size_test": [256, 128],
        "flip_prob": 0.5,
        "padding": 10,
        "re_prob": 0.5,
        "pixel_mean": [0.5, 0.5, 0.5],
        "pixel_std": [0.5, 0.5, 0.5],
        "color_jitter": None,  # e.g. [0.1, 0.1, 0.1, 0.0] (FED)
        "color_jitter_position": "before_resize",  # FED: before_resize; DPM (Occluded-REID): after_resize
        "occluders": None,  # FED's NPO patch folder(s) (default: <dataset>/occluders or crop_backgrounds); a list = FED*
        "npo": "auto",  # NPO two-view training samples: auto (= FED only) | true (baseline + NPO aug) | false
        "npo_vertical_ratio": 2.0,  # FED: patch h/w above this is a vertical occluder (paper: 3.0)
        "npo_patch_aug": "official",  # FED: official (no crop) | paper (random crop of the patch)
        "num_instances": 4,
        "num_workers": 4,
        "synth_preset": "demo_rich",  # used when name is synthocc and the folder does not exist yet
        "synth_seed": 0,
    },
    "solver": {
        "optimizer": "SGD",
        "base_lr": 0.008,
        "bias_lr_factor": 2.0,
        "weight_decay": 1e-4,
        "weight_decay_bias": 1e-4,
        "momentum": 0.9,
        "ims_per_batch": 64,
        "max_epochs": 120,
        "warmup_epochs": 5,
        "warmup_lr_factor": 0.01,  # warmup starts at this fraction of base_lr
        "min_lr_factor": 0.002,  # cosine floor as a fraction of base_lr
        "lr_schedule": "epoch",  # epoch (official: lr set once per epoch) | iteration (smooth, every batch)
        "seed": 1234,
        "amp": "auto",  # auto (bf16 on CUDA if supported, else fp32) | bf16 | fp16 | fp32
        "compile": False,
        "grad_clip": None,
        "accum_steps": 1,  # split each batch into this many shares (gradient accumulation)
        "checkpoint_period": 1,  # last.pth (resumable) every N epochs
        "eval_period": 10,
        "log_period": 50,
    },
    "test": {
        "ims_per_batch": 256,
        "feat_norm": True,
        "metric": "euclidean",  # squared Euclidean on (normalised) features, as TransReID
        "re_ranking": False,
        "rerank_k1": 20,
        "rerank_k2": 6,
        "rerank_lambda": 0.3,
        "max_rank": 50,
    },
    "output_dir": "outputs/run",
    "device": "auto",  # auto | cpu | cuda | cuda:N | mps
    "tensorboard": False,
    "progress": "auto",  # auto (only on a terminal) | on | off
}

# Sub-trees whose keys are free-form (checked by the component that consumes them).
_FREE_FORM = {("model", "kwargs"), ("data", "kwargs"), ("data", "test_kwargs")}


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


# Keys whose values may have another type than their default (besides None defaults, which take any).
_TYPES: Dict[tuple, tuple] = {
    ("progress",): (str, bool),  # YAML reads on/off as booleans
    ("data", "npo"): (str, bool),  # auto | true | false
    ("model", "stride"): (int, list),  # one stride or [sy, sx]
}
# Optional keys (default None): the types a set value must have.
_OPTIONAL_TYPES: Dict[tuple, tuple] = {
    ("model", "pretrained"): (str,),
    ("model", "triplet_margin"): (float,),
    ("data", "test_name"): (str,),
    ("data", "test_root"): (str,),
    ("data", "color_jitter"): (list,),
    ("data", "occluders"): (str, list),
    ("solver", "grad_clip"): (float,),
}
_PATH_KEYS = {("data", "root"), ("output_dir",)}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a mapping"}


def _type_error(dotted: str, source: str, value: Any, expected: str, default: Any) -> OccReIDError:
    if value is None:
        got = "null"
    else:
        got = f"the text {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
    shown = "null" if default in (None, "null") else repr(default)
    return OccReIDError(f"config key {dotted!r} in {source} must be {expected} (default: {shown}), got {got}")


def _coerce(path: tuple, value: Any, default: Any, source: str) -> Any:
    """``value`` checked against the type of ``default`` (``int`` keys take integers, ``float``
    keys any number, text that reads as a number included); returns it, converted."""
    dotted = ".".join(path)
    if default is None:
        if value is None or path not in _OPTIONAL_TYPES:
            return value  # not set; or free in type, checked by the component that reads it
        allowed = _OPTIONAL_TYPES[path]
        default = "null"
    else:
        allowed = _TYPES.get(path) or (type(default),)
    if isinstance(default, tuple):
        allowed = (list, tuple)
    expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed)
    if default == "null":
        expected += " or null"
    if bool in allowed and isinstance(value, bool):
        return value
    if int in allowed or float in allowed:
        num = value
        if isinstance(value, str):
            try:
                num = float(value.strip()) if float in allowed else int(value.strip())
            except ValueError:
                num = value
        if isinstance(num, float) and float not in allowed and num.is_integer():
            num = int(num)
        if not isinstance(num, bool) and (
            (int in allowed and isinstance(num, int)) or (float in allowed and isinstance(num, (int, float)))
        ):
            return float(num) if float in allowed and int not in allowed else num
    if str in allowed and isinstance(value, str):
        return value
    if path in _PATH_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a folder named 2024
    if (list in allowed or tuple in allowed) and isinstance(value, (list, tuple)):
        return list(value)
    raise _type_error(dotted, source, value, expected, default)


def _check_keys(cfg: Mapping, ref: Mapping, prefix: tuple, source: str) -> Dict[str, Any]:
    """Check every key of ``cfg`` against ``ref`` (unknown keys, mappings, value types);
    returns a copy with values converted where the type allows (e.g. ``"1e-4"`` -> ``1e-4``)."""
    out: Dict[str, Any] = {}
    for key, value in cfg.items():
        path = prefix + (key,)
        dotted = ".".join(path)
        if key not in ref:
            valid = [".".join(prefix + (k,)) for k in ref]
            raise OccReIDError(
                f"unknown config key {dotted!r} in {source}.{_suggest(dotted, valid)} "
                f"Valid keys here: {', '.join(sorted(valid))}"
            )
        if path in _FREE_FORM:
            if value is not None and not isinstance(value, Mapping):
                raise OccReIDError(f"config key {dotted!r} in {source} must be a mapping")
            out[key] = copy.deepcopy(value)
            continue
        if isinstance(ref[key], Mapping):
            if not isinstance(value, Mapping):
                raise OccReIDError(
                    f"config key {dotted!r} in {source} must be a mapping of "
                    f"{', '.join(ref[key])}, got {value!r}"
                )
            out[key] = _check_keys(value, ref[key], path, source)
            continue
        out[key] = _coerce(path, copy.deepcopy(value), ref[key], source)
    return out


def merge(base: Dict[str, Any], update: Mapping) -> Dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and out.get(key) is not None:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    if not path.is_file():
        raise OccReIDError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise OccReIDError(f"config inheritance cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise OccReIDError(f"cannot parse YAML config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise OccReIDError(f"config {path} must be a mapping at top level")
    base_name = data.pop("_base_", None)
    if base_name:
        base = _read_yaml((path.parent / base_name), seen + (path.resolve(),))
        data = merge(base, data)
    return data


def parse_override(item: str) -> Dict[str, Any]:
    """``"solver.base_lr=0.01"`` -> ``{"solver": {"base_lr": 0.01}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise OccReIDError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise OccReIDError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    out: Dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def load_config(
    path: Optional[os.PathLike] = None,
    overrides: Iterable[str] = (),
    extra: Optional[Mapping] = None,
    base: Optional[Mapping] = None,
) -> Dict[str, Any]:
    """Defaults <- ``base`` (e.g. a checkpoint's config) <- YAML file (with ``_base_``) <-
    ``extra`` mapping <- ``key=value`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if base:
        cfg = merge(cfg, _check_keys(base, DEFAULTS, (), "the stored config"))
    if path is not None:
        path = config_path(str(path))  # a file path, or the name of a shipped config
        data = _read_yaml(Path(path))
        cfg = merge(cfg, _check_keys(data, DEFAULTS, (), str(path)))
    if extra:
        cfg = merge(cfg, _check_keys(extra, DEFAULTS, (), "arguments"))
    for item in overrides:
        upd = parse_override(item)
        cfg = merge(cfg, _check_keys(upd, DEFAULTS, (), f"override {item!r}"))
    if isinstance(cfg.get("progress"), bool):  # YAML reads on/off as booleans
        cfg["progress"] = "on" if cfg["progress"] else "off"
    validate(cfg)
    return cfg


_CHOICES = {
    ("solver", "amp"): ("auto", "bf16", "fp16", "fp32"),
    ("solver", "lr_schedule"): ("epoch", "iteration"),
    ("test", "metric"): ("euclidean", "cosine"),
    ("progress",): ("auto", "on", "off"),
}


def validate(cfg: Mapping) -> None:
    """Value checks that YAML typing cannot express."""
    for path, choices in _CHOICES.items():
        node: Any = cfg
        for p in path:
            node = node[p]
        if node not in choices:
            raise OccReIDError(
                f"config {'.'.join(path)}={node!r} is not one of {', '.join(map(str, choices))}"
            )
    for key in ("size_train", "size_test"):
        size = cfg["data"][key]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(int(s) > 0 for s in size)):
            raise OccReIDError(f"config data.{key} must be [height, width], got {size!r}")
    s = cfg["solver"]
    if int(s["ims_per_batch"]) % int(cfg["data"]["num_instances"]):
        raise OccReIDError(
            f"solver.ims_per_batch={s['ims_per_batch']} must be a multiple of "
            f"data.num_instances={cfg['data']['num_instances']}"
        )
    if int(s["accum_steps"]) < 1 or int(s["ims_per_batch"]) % (int(s["accum_steps"]) * int(cfg["data"]["num_instances"])):
        raise OccReIDError(
            f"solver.accum_steps={s['accum_steps']} must divide solver.ims_per_batch into shares that are "
            f"multiples of data.num_instances={cfg['data']['num_instances']}"
        )
    if int(s["max_epochs"]) < 1:
        raise OccReIDError("solver.max_epochs must be >= 1")


def dump_config(cfg: Mapping) -> str:
    return yaml.safe_dump(_plain(cfg), sort_keys=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def flatten(cfg: Mapping, prefix: str = "") -> List[str]:
    """All dotted keys of a config (for help texts)."""
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and (tuple(key.split(".")) not in _FREE_FORM):
            out.extend(flatten(v, key + "."))
        else:
            out.append(key)
    return out
