"""Export a trained model: ONNX graph (image -> feature) and safetensors weights + JSON sidecar.

ONNX (``pip install occreid[onnx]`` to check it with onnxruntime)::

    export_onnx("model_final.pth", "reid.onnx")     # also writes reid.onnx.json (the sidecar)

The graph takes **RGB float32 images in [0, 1], ``[B, 3, H, W]``** at the model's input size
(resize before; the batch axis is dynamic) and applies the pixel normalisation itself, so a
tracker only scales pixels by 1/255. Outputs: ``feat`` ``[B, D]`` L2-normalised; DPM adds
``mask`` ``[B, D]`` (the HMG channel mask for the query-mask distance), FED adds
``part_scores`` ``[B, P]``. An SIE model takes a second input ``camids`` (int64 ``[B]``).

safetensors::

    export_safetensors("model_final.pth", "reid.safetensors")   # + reid.json
    extractor = load_export("reid.safetensors")                  # a FeatureExtractor

The JSON sidecar (also embedded in the safetensors header, so the ``.safetensors`` file alone
is enough) records the architecture, input size, colour order, normalisation, feature dimension,
outputs, the retrieval distance, the training config the model was built from and the model
fingerprint (:func:`occreid.inference.model_fingerprint`), which loading checks against the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .engine.checkpoint import unwrap
from .inference import (
    _METADATA_KEY,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    FeatureExtractor,
    _sidecar_path,
    load_safetensors_export,
)
from .methods import get_method
from .utils.io import OccReIDError, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMAT",
    "InferenceModule",
    "export_metadata",
    "export_onnx",
    "export_safetensors",
    "load_safetensors_export",
    "load_export",
    "onnx_output_names",
    "check_onnx",
]


Source = Union[str, os.PathLike, Mapping[str, Any], Any]  # path, checkpoint dict or FeatureExtractor


def _extractor(source: Source, device: Union[str, torch.device] = "cpu") -> FeatureExtractor:
    if isinstance(source, FeatureExtractor):
        return source
    return FeatureExtractor(source, device=device)


def onnx_output_names(extractor: FeatureExtractor) -> List[str]:
    """Output names of the exported graph: the method's eval outputs, ``"feat"`` first."""
    return list(extractor.outputs)


class InferenceModule(nn.Module):
    """The deployable model: ``images`` RGB in [0, 1] ``[B, 3, H, W]`` (+ ``camids`` for SIE)
    -> ``(feat [B, D] L2-normalised, *extras)`` in the order of :func:`onnx_output_names`.

    Pixel normalisation ``(x - mean) / std`` is part of the module.
    """

    def __init__(self, model: nn.Module, outputs: List[str], pixel_mean, pixel_std) -> None:
        super().__init__()
        self.model = model.eval()
        self.outputs = list(outputs)
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor, camids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        out = self.model((images - self.pixel_mean) / self.pixel_std, cam_ids=camids)
        return (F.normalize(out["feat"], dim=1), *(out[k] for k in self.outputs[1:]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_metadata(extractor: Any, *, normalised_in_graph: bool = False) -> Dict[str, Any]:
    """The JSON sidecar describing ``extractor``'s model (see the module docstring)."""
    meta = dict(extractor.meta)
    arch_keys = ("method", "backbone", "stride", "num_classes", "num_cameras", "sie_camera", "sie_coef", "neck_feat", "kwargs")
    shapes = extractor.output_shapes()
    outputs = {k: dict(info, shape=["batch", *shapes[k]]) for k, info in extractor.outputs.items()}
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "occreid_version": __version__,
        "architecture": {k: meta.get(k) for k in arch_keys},
        "feature_dim": int(extractor.feature_dim),
        "input": {
            "size": list(extractor.img_size),
            "layout": "NCHW",
            "color": "RGB",
            "dtype": "float32",
            "resize": "bilinear",
            "pixel_mean": list(extractor.pixel_mean),
            "pixel_std": list(extractor.pixel_std),
            "normalisation": "x = (rgb / 255 - pixel_mean) / pixel_std",
            "normalised_in_graph": bool(normalised_in_graph),
            "value_range": [0.0, 1.0] if normalised_in_graph else "normalised",
            "camids": bool(extractor.uses_cameras),
        },
        "outputs": outputs,
        "retrieval": extractor.retrieval,
        "fingerprint": extractor.fingerprint,
        "model_meta": meta,
        "config": extractor.config,
    }


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------


def export_safetensors(source: Source, out: Union[str, os.PathLike]) -> Path:
    """Write the model weights as ``out`` (``.safetensors``) and the sidecar (``.json`` instead of
    ``.safetensors``).

    ``source``: a checkpoint path, a checkpoint dict or a :class:`occreid.FeatureExtractor`.
    Returns the safetensors path.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise OccReIDError(f"the weights file must end in .safetensors, got {out}")
    ex = _extractor(source)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(ex.model).state_dict().items()}
    meta = export_metadata(ex, normalised_in_graph=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, out)
    sidecar = dict(meta, weights={"file": out.name, "sha256": _sha256(out)})
    atomic_write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", _sidecar_path(out))
    logger.info("wrote %s and %s (fingerprint %s)", out, _sidecar_path(out), ex.fingerprint)
    return out


def load_export(path: Union[str, os.PathLike], device: Union[str, torch.device] = "auto", **kwargs: Any):
    """A :class:`occreid.FeatureExtractor` from a safetensors export (``kwargs`` go to it)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(".safetensors")
    return FeatureExtractor(p, device=device, **kwargs)


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def export_onnx(
    source: Source,
    out: Union[str, os.PathLike],
    *,
    opset: int = 17,
    batch_size: int = 2,
    dynamic_batch: bool = True,
) -> Path:
    """Export the inference model (:class:`InferenceModule`) to ONNX at ``out``, plus the sidecar
    ``<out>.json``. Returns the ONNX path.

    Uses torch's TorchScript-based exporter (``dynamo=False``; no onnxscript needed). When the
    ``onnx`` package is installed the sidecar is also stored in the model's ``metadata_props``
    under ``"occreid"``.
    """
    out = Path(out)
    ex = _extractor(source)
    get_method(ex.method).check_deployable(ex.model)
    module = InferenceModule(ex.model, onnx_output_names(ex), ex.pixel_mean, ex.pixel_std).to(ex.device).eval()
    h, w = ex.img_size
    images = torch.rand(batch_size, 3, h, w, device=ex.device)
    args: Tuple[Any, ...] = (images,)
    inputs = ["images"]
    outputs = onnx_output_names(ex)
    if ex.uses_cameras:
        args = (images, torch.zeros(batch_size, dtype=torch.long, device=ex.device))
        inputs.append("camids")
    dyn = {name: {0: "batch"} for name in inputs + outputs} if dynamic_batch else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings / deprecation notes of the exporter
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    meta = export_metadata(ex, normalised_in_graph=True)
    meta["onnx"] = {"opset": opset, "inputs": inputs, "outputs": outputs, "dynamic_batch": dynamic_batch}
    try:
        import onnx

        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = _METADATA_KEY, json.dumps(meta, sort_keys=True)
        onnx.save(model, str(tmp))
    except ImportError:
        logger.info("onnx is not installed: the metadata is written to the JSON sidecar only")
    os.replace(tmp, out)
    atomic_write_text(json.dumps(dict(meta, weights={"file": out.name, "sha256": _sha256(out)}), indent=2, sort_keys=True) + "\n",
                      _sidecar_path(out))
    logger.info("wrote %s (%s -> %s) and %s", out, ", ".join(inputs), ", ".join(outputs), _sidecar_path(out))
    return out


def check_onnx(
    onnx_path: Union[str, os.PathLike],
    source: Source,
    *,
    batch_size: int = 8,
    images: Optional[torch.Tensor] = None,
    seed: int = 0,
) -> Dict[str, float]:
    """Run the ONNX graph with onnxruntime (CPU) and the PyTorch model on the same batch;
    returns the largest absolute difference per output.

    ``images``: RGB in [0, 1], ``[B, 3, H, W]`` (default: ``batch_size`` random images).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise OccReIDError("checking an ONNX export needs onnxruntime: pip install 'occreid[onnx]'") from None
    import numpy as np

    ex = _extractor(source)
    h, w = ex.img_size
    if images is None:
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand(batch_size, 3, h, w, generator=gen)
    images = images.float().cpu()
    cams = torch.arange(images.shape[0]) % max(1, int(ex.meta.get("num_cameras") or 1)) if ex.uses_cameras else None
    mean = torch.tensor(ex.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(ex.pixel_std).view(1, 3, 1, 1)
    ref = ex.forward_batch((images - mean) / std, cams)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}
    if cams is not None:
        feed["camids"] = cams.numpy().astype(np.int64)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, feed)))
    missing = sorted(set(ref) - set(got))
    if missing:
        raise OccReIDError(f"{onnx_path} lacks the output(s) {missing} of this {ex.method} model: it is another model's export")
    return {k: float(np.abs(got[k] - ref[k].cpu().numpy()).max()) for k in ref}
