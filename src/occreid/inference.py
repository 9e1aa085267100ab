"""Using a trained model: :class:`FeatureExtractor` (images in, L2-normalised features out).

Five lines from a checkpoint to features::

    from occreid import FeatureExtractor
    extractor = FeatureExtractor("outputs/demo/model_final.pth", device="cpu")
    feats = extractor(["a.jpg", "b.jpg"])            # [2, D] float32, rows of unit length
    out = extractor.extract(frames_bgr, color="BGR")  # dict: "feat", + "mask" (DPM) / "part_scores" (FED)
    similarity = feats @ feats.T                      # cosine similarity

Inputs may be image paths, PIL images, or ``uint8`` arrays ``[H, W, 3]`` (or a stack
``[N, H, W, 3]``) whose channel order is given by ``color`` (``"RGB"`` or ``"BGR"``, as
OpenCV delivers). Every image goes through the model's own test-time preprocessing (resize
to the training size, bilinear; scale to [0, 1]; normalise with the checkpoint's pixel mean
and std), in batches of ``batch_size``.

The extractor reads an occreid training checkpoint (``model_final.pth``) or a weights export
(``model.safetensors`` + its JSON sidecar, :func:`occreid.export.export_safetensors`); both
carry the metadata needed to rebuild the model, so no dataset or config file is required.
An official TransReID / FED / DPM checkpoint is read too, given the config of its architecture:
``FeatureExtractor("transformer_150.pth", config="occluded_duke/dpm.yaml")``.

:func:`model_fingerprint` hashes the model description and weights. A gallery index stores it,
so that searching an index with a different model is caught (:mod:`occreid.retrieval`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data import build_test_transform
from .engine.build import model_from_checkpoint
from .engine.checkpoint import load_checkpoint
from .engine.official import detect_official_method, load_official_checkpoint, official_state_dict_of, shipped_configs
from .methods import get_method
from .utils.device import autocast_context, resolve_amp, resolve_device
from .utils.io import OccReIDError, read_image

logger = logging.getLogger(__name__)

__all__ = ["FeatureExtractor", "model_fingerprint", "load_model_source", "load_safetensors_export", "COLOR_ORDERS"]

COLOR_ORDERS = ("RGB", "BGR")

#: The safetensors weight export (:func:`occreid.export.export_safetensors`): its sidecar format.
EXPORT_FORMAT = "occreid-export"
EXPORT_VERSION = 1
_METADATA_KEY = "occreid"

ImageInput = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: F821


def model_fingerprint(meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex, 16 characters) of the model description and every weight tensor.

    The description is hashed as canonical JSON, the weights in sorted key order with their
    dtype and shape, so a checkpoint and its safetensors export give the same fingerprint.
    """
    h = hashlib.sha256()
    h.update(json.dumps(dict(meta), sort_keys=True, default=str).encode("utf-8"))
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_model_source(
    source: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    config: Optional[Union[str, os.PathLike, Mapping[str, Any]]] = None,
    memory: Optional[Union[str, os.PathLike]] = None,
) -> Dict[str, Any]:
    """Read a checkpoint-like dict (``config``, ``model_meta``, ``model``) from a path or dict.

    ``*.safetensors`` files are read as occreid weight exports
    (:func:`load_safetensors_export`); anything else as an occreid checkpoint
    (:func:`occreid.engine.checkpoint.load_checkpoint`, ``weights_only``) or as an official
    TransReID / FED / DPM checkpoint (:mod:`occreid.engine.official`). An official file has
    no occreid metadata: ``config`` (a YAML path, a shipped config name or a loaded config)
    gives its architecture, and ``memory`` FED's memory file (default: the
    ``transformermemory_EPOCH.pth`` beside it).
    """
    if isinstance(source, Mapping):
        missing = [k for k in ("config", "model_meta", "model") if k not in source]
        if missing:
            raise OccReIDError(
                f"a checkpoint dict needs the keys config, model_meta and model; missing: {', '.join(missing)}"
            )
        return dict(source)
    path = Path(source)
    if path.suffix == ".safetensors" or path.suffix == ".json" and path.with_suffix(".safetensors").is_file():
        return load_safetensors_export(path.with_suffix(".safetensors"))
    try:
        ckpt = load_checkpoint(path)
    except OccReIDError:
        obj = _peek(path)  # only on the error path: what is it, then?
        if isinstance(obj, dict) and obj.get("format") == "occreid-index":
            raise OccReIDError(
                f"{path} is a gallery index (written by `occreid index`), not model weights: pass it as "
                "--index, and the checkpoint it was built with as --weights"
            ) from None
        official = _official_source(path, obj, config, memory)
        if official is not None:
            return official
        raise
    if memory is not None:
        raise OccReIDError(
            f"a memory file ({memory}) is only for official FED checkpoints; {path} is an occreid checkpoint, "
            "which holds the FED memory itself"
        )
    return ckpt


def _official_source(path: Path, obj: Any, config: Any, memory: Any) -> Optional[Dict[str, Any]]:
    """``obj`` (the content of ``path``) read as an official checkpoint, or ``None`` if it is not one."""
    sd = official_state_dict_of(obj)
    if sd is None:
        return None
    if config is None:
        try:
            method = detect_official_method(sd)
        except OccReIDError:  # base.* keys of no known method: the caller's error says what it looks like
            return None
        shipped = [c for c in shipped_configs(method) if not c.startswith("synthocc/")]
        raise OccReIDError(
            f"{path} is an official {method} checkpoint: it carries no occreid metadata, so the config of its "
            f"architecture is needed: pass --config (a config with model.name={method}"
            + (f", e.g. the shipped {' or '.join(shipped[:4])}" if shipped else "")
            + ") or FeatureExtractor(path, config=...)"
        )
    return load_official_checkpoint(path, config, memory=memory, obj=obj)


def _peek(path: Path) -> Any:
    """The content of a file that is no occreid checkpoint (``None`` when it does not load)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def _sidecar_path(path: Path) -> Path:
    """``model.safetensors`` -> ``model.json``; ``reid.onnx`` -> ``reid.onnx.json``."""
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    return path.with_name(path.name + ".json")


def load_safetensors_export(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a safetensors export as a checkpoint-like dict (``config``, ``model_meta``, ``model``).

    The sidecar ``<name>.json`` is used when present, else the metadata embedded in the file.
    Raises :class:`OccReIDError` for files that are not occreid exports and for a sidecar that
    does not describe these weights.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise OccReIDError(f"weights file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as fh:
            embedded = (fh.metadata() or {}).get(_METADATA_KEY)
        state = load_file(str(p))
    except Exception as exc:  # safetensors raises its own error types (SafetensorError, ...)
        raise OccReIDError(f"cannot read {p} as safetensors: {exc}") from None
    side = _sidecar_path(p)
    if side.is_file():
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise OccReIDError(f"sidecar {side} is not valid JSON: {exc}") from None
    elif embedded:
        meta = json.loads(embedded)
    else:
        raise OccReIDError(
            f"{p} is not an occreid export: it has no occreid metadata and no sidecar {side.name}. "
            "Export weights with `occreid export --weights CKPT --format safetensors`; ImageNet "
            "backbone weights go to training as model.pretrained=PATH"
        )
    if meta.get("format") != EXPORT_FORMAT:
        raise OccReIDError(f"{side if side.is_file() else p}: not an occreid export sidecar (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > EXPORT_VERSION:
        raise OccReIDError(f"{p} was exported by a newer occreid (version {meta['version']}); upgrade occreid")
    fp = model_fingerprint(meta["model_meta"], state)
    if meta.get("fingerprint") and fp != meta["fingerprint"]:
        raise OccReIDError(
            f"the sidecar {side.name} describes model {meta['fingerprint']} but {p.name} holds model {fp}: "
            "the two files come from different exports; export again"
        )
    return {"config": meta["config"], "model_meta": meta["model_meta"], "model": state, "export": meta}


class _Inputs(torch.utils.data.Dataset):
    """Images given as paths, PIL images or arrays, decoded and transformed on access."""

    def __init__(self, items: Sequence[Any], transform, color: str) -> None:
        self.items = items
        self.transform = transform
        self.color = color

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(to_pil(self.items[i], self.color, index=i))


def to_pil(item: Any, color: str = "RGB", index: Optional[int] = None):
    """One input (path, PIL image, ``uint8`` array ``[H, W, 3]`` in ``color`` order) as an RGB PIL image."""
    from PIL import Image

    where = f" (input {index})" if index is not None else ""
    if isinstance(item, (str, os.PathLike)):
        return read_image(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB")  # a PIL image is RGB by definition (PIL decodes to RGB)
    if isinstance(item, torch.Tensor):
        raise OccReIDError(
            f"got a torch.Tensor{where}; pass image paths, PIL images or uint8 numpy arrays "
            "[H, W, 3] (e.g. tensor.permute(1, 2, 0).mul(255).byte().numpy())"
        )
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise OccReIDError(
                f"image array{where} must be uint8 [H, W, 3] with values 0-255, got dtype {item.dtype}; "
                "convert with (arr * 255).round().astype(np.uint8) if it holds values in [0, 1]"
            )
        if item.ndim != 3 or item.shape[2] != 3:
            raise OccReIDError(
                f"image array{where} must have shape [H, W, 3] (height, width, channels), got {item.shape}"
            )
        if color == "BGR":
            item = item[:, :, ::-1]
        return Image.fromarray(np.ascontiguousarray(item), mode="RGB")
    raise OccReIDError(
        f"unsupported image input{where} of type {type(item).__name__}; expected a path, a PIL image "
        "or a uint8 numpy array [H, W, 3]"
    )


def _as_list(images: Any) -> List[Any]:
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)  # a stack [N, H, W, 3]
        return [images]
    try:
        from PIL import Image

        if isinstance(images, Image.Image):
            return [images]
    except ImportError:  # pragma: no cover - PIL is a dependency
        pass
    if isinstance(images, (list, tuple)):
        return list(images)
    raise OccReIDError(
        f"expected an image or a list of images (paths, PIL images, uint8 arrays), got {type(images).__name__}"
    )


class FeatureExtractor:
    """Rebuild a trained occreid model from a checkpoint and extract features for any images.

    Args:
        checkpoint: ``model_final.pth`` (or any occreid checkpoint), a ``.safetensors`` weight
            export with its JSON sidecar, an official TransReID / FED / DPM checkpoint (with
            ``config``), or an already loaded checkpoint dict.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
        batch_size: images per forward pass.
        num_workers: DataLoader workers that decode and resize images (0: in this process).
        amp: ``"fp32"`` (default), ``"bf16"``, ``"fp16"`` or ``"auto"`` (bf16 on capable GPUs).
        config: for an official TransReID / FED / DPM checkpoint (which has no occreid
            metadata): the config of its architecture, e.g. ``"occluded_duke/dpm.yaml"``.
        memory: for an official FED checkpoint: its memory file (default: the
            ``transformermemory_EPOCH.pth`` beside it, if any).

    Attributes:
        method, backbone: what the checkpoint holds (``"baseline"``, ``"fed"``, ``"dpm"``).
        feature_dim: D, the width of the retrieval feature.
        img_size: (H, W) the model takes.
        pixel_mean, pixel_std: normalisation applied after scaling pixels to [0, 1].
        fingerprint: :func:`model_fingerprint` of the loaded model.
        model: the eval-mode ``torch.nn.Module``.

    :meth:`extract` returns a dict of float32 CPU tensors: ``"feat"`` [N, D], L2-normalised;
    DPM adds ``"mask"`` [N, D] (HMG channel mask in (0, 1)); FED adds ``"part_scores"`` [N, P]
    (OEM occlusion score per horizontal stripe, top to bottom, 1 = visible).
    """

    def __init__(
        self,
        checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
        device: Union[str, torch.device] = "auto",
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        amp: str = "fp32",
        config: Optional[Union[str, os.PathLike, Mapping[str, Any]]] = None,
        memory: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ckpt = load_model_source(checkpoint, config=config, memory=memory)
        self.source = None if isinstance(checkpoint, Mapping) else str(checkpoint)
        self.meta: Dict[str, Any] = dict(ckpt["model_meta"])
        self.config: Dict[str, Any] = ckpt["config"]
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.amp = resolve_amp(amp, self.device)
        self.model = model_from_checkpoint(ckpt, self.device)
        self.fingerprint = model_fingerprint(self.meta, ckpt["model"])
        self.method: str = self.meta["method"]
        self.spec = get_method(self.method)
        #: the model's eval outputs, ``"feat"`` first (what :meth:`extract` returns)
        self.outputs: Dict[str, Dict[str, Any]] = self.spec.eval_outputs(self.model)
        self.backbone: str = self.meta["backbone"]
        self.feature_dim: int = int(self.meta.get("feature_dim") or getattr(self.model, "feature_dim"))
        self.img_size = tuple(int(s) for s in self.meta["img_size"])
        self.pixel_mean = tuple(float(v) for v in self.meta["pixel_mean"])
        self.pixel_std = tuple(float(v) for v in self.meta["pixel_std"])
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.transform = build_test_transform(self.img_size, mean=self.pixel_mean, std=self.pixel_std)
        logger.info(
            "loaded %s/%s (%d-d features, %dx%d input, fingerprint %s) on %s",
            self.method, self.backbone, self.feature_dim, *self.img_size, self.fingerprint, self.device,
        )

    # ----------------------------------------------------------------------------- info
    @property
    def uses_cameras(self) -> bool:
        """True when the model has SIE camera embeddings and so needs ``camids``."""
        return getattr(self.spec.backbone_of(self.model), "sie_embed", None) is not None

    @property
    def retrieval(self) -> Dict[str, Any]:
        """How features of this model are compared (stored in gallery indexes).

        ``{"distance": "cosine"}``, or for DPM ``{"distance": "dpm_masked_cosine",
        "mask_norm": ..., "mask_query": ...}`` (dpm-official.md §7).
        """
        return self.spec.retrieval(self.model)

    def retrieval_distance(self, query: Mapping[str, torch.Tensor], gallery: Mapping[str, torch.Tensor]):
        """The method's own query-gallery distance for :meth:`extract` outputs (DPM's query
        mask), or ``None`` for the plain distance (``distance=`` of the evaluator)."""
        return self.spec.retrieval_distance(self.model, query, gallery)

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(method={self.method!r}, backbone={self.backbone!r}, feature_dim={self.feature_dim}, "
            f"img_size={self.img_size}, device={str(self.device)!r}, fingerprint={self.fingerprint!r})"
        )

    # ------------------------------------------------------------------------- forward
    def preprocess(self, images: Any, color: str = "RGB") -> torch.Tensor:
        """The model input ``[N, 3, H, W]`` (normalised) for a list of images, on the CPU."""
        items = _as_list(images)
        color = _check_color(color)
        if not items:
            return torch.empty(0, 3, *self.img_size)
        return torch.stack([self.transform(to_pil(x, color, i)) for i, x in enumerate(items)])

    @torch.inference_mode()
    def forward_batch(self, batch: torch.Tensor, camids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Run the model on a preprocessed batch ``[B, 3, H, W]``; features L2-normalised, float32."""
        x = batch.to(self.device)
        cams = None if camids is None else torch.as_tensor(camids).to(self.device).long()
        with autocast_context(self.device, self.amp):
            out = self.model(x, cam_ids=cams)
        res = {k: out[k].float() for k in self.outputs}
        res["feat"] = F.normalize(res["feat"], dim=1)
        return res

    def output_shapes(self) -> Dict[str, tuple]:
        """Per-image shape of each output (``"feat"``: ``(D,)``)."""
        return {k: tuple(v.shape[1:]) for k, v in self._empty().items()}

    def extract(
        self,
        images: Any,
        *,
        color: str = "RGB",
        camids: Optional[Sequence[int]] = None,
        batch_size: Optional[int] = None,
        cam_ids: Optional[Sequence[int]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Features (and the model's extras) for ``images``, as float32 CPU tensors.

        Args:
            images: a path, PIL image or ``uint8`` array ``[H, W, 3]``, a list of those, or a
                stack ``[N, H, W, 3]``.
            color: channel order of array inputs, ``"RGB"`` or ``"BGR"`` (paths and PIL images
                are always decoded to RGB).
            camids: 0-based camera id per image; required only by SIE models (the spelling of
                camera ids across occreid's API: records, batches, indexes, metrics).
            batch_size: overrides the extractor's batch size.
            cam_ids: the former name of ``camids`` (deprecated).
        """
        if cam_ids is not None:
            warnings.warn("extract(cam_ids=...) is deprecated: pass camids=...", DeprecationWarning, stacklevel=2)
            camids = cam_ids if camids is None else camids
        items = _as_list(images)
        color = _check_color(color)
        n = len(items)
        cams = None
        if camids is not None:
            cams = torch.as_tensor(list(camids) if not isinstance(camids, torch.Tensor) else camids).long()
            if cams.shape != (n,):
                raise OccReIDError(f"expected one camera id per image ({n}), got camids of shape {tuple(cams.shape)}")
        if n == 0:
            return self._empty()
        bs = int(batch_size or self.batch_size)
        loader = torch.utils.data.DataLoader(
            _Inputs(items, self.transform, color),
            batch_size=bs,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        outs: Dict[str, List[torch.Tensor]] = {}
        start = 0
        for batch in loader:
            b = batch.shape[0]
            res = self.forward_batch(batch, None if cams is None else cams[start : start + b])
            start += b
            for k, v in res.items():
                outs.setdefault(k, []).append(v.cpu())
        return {k: torch.cat(v, 0) for k, v in outs.items()}

    def __call__(self, images: Any, **kwargs: Any) -> torch.Tensor:
        """L2-normalised features ``[N, D]`` (see :meth:`extract` for the arguments)."""
        return self.extract(images, **kwargs)["feat"]

    def _empty(self) -> Dict[str, torch.Tensor]:
        x = torch.zeros(1, 3, *self.img_size)
        with torch.inference_mode():
            shapes = self.forward_batch(x, torch.zeros(1, dtype=torch.long) if self.uses_cameras else None)
        return {k: torch.empty(0, *v.shape[1:]) for k, v in shapes.items()}


def _check_color(color: str) -> str:
    c = str(color).upper()
    if c not in COLOR_ORDERS:
        raise OccReIDError(f"color must be 'RGB' or 'BGR' (the channel order of array inputs), got {color!r}")
    return c
