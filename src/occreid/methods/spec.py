"""The method contract: one :class:`MethodSpec` per method owns everything about it.

A method (baseline, FED, DPM, or your own) is a package under ``occreid.methods`` with one
spec object, registered by name with :func:`register_method`. Everything outside
``occreid.methods`` asks the spec and never compares method names:

========================  ==================================================================
what                      spec member
========================  ==================================================================
typed options             :attr:`model_class` signature (defaults = official behaviour);
                          :meth:`resolve_options` checks names, types and applicability
model                     :meth:`build_model` ``(backbone, num_classes, **options)``
data the step needs       :attr:`npo` (FED's 7-channel two-view samples)
optimisers                :meth:`param_sets` (one :class:`ParamSet` per optimiser)
train-start work          :meth:`on_train_start` (FED's memory initialisation)
training step             :meth:`passes`, :meth:`forward_train`, :meth:`loss`,
                          :meth:`after_step`, :meth:`step_stats`; the engine's one
                          ``TrainStep`` runs them (``occreid.engine.step``)
eval outputs              every model returns a mapping with ``"feat"`` in eval mode;
                          :meth:`eval_outputs` names the exported ones
retrieval distance        :meth:`retrieval` (a description stored in indexes and exports)
                          and :meth:`retrieval_distance` (the evaluator's block callable)
official checkpoints      :meth:`convert_official_state_dict`, :attr:`official_keys`,
                          :meth:`complete_official_state` (``occreid.engine.official``)
========================  ==================================================================

The model contract: ``model.train(); out = spec.forward_train(model, model, batch, 0)``;
``spec.loss(model, out, batch)`` gives the weighted terms (the step sums them);
``model.eval(); model(images, cam_ids=...)`` returns ``{"feat": [B, D], ...extras}``;
``model.feature_dim`` is ``D``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import typing
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..utils import OccReIDError, Registry

__all__ = [
    "MethodSpec",
    "ParamSet",
    "Option",
    "SHARED_MODEL_KEYS",
    "METHODS",
    "register_method",
    "get_method",
    "available_methods",
]

#: ``model.*`` config keys that several methods share. A method receives the ones its model
#: accepts; any other one set to a non-default value is an error (nothing is ignored).
SHARED_MODEL_KEYS: Tuple[str, ...] = (
    "neck_feat",
    "label_smoothing",
    "triplet_margin",
    "id_loss_weight",
    "triplet_loss_weight",
)

#: The retrieval-feature choices of every method with a ``neck_feat`` option.
NECK_FEATS: Tuple[str, ...] = ("before", "after")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """``ValueError`` naming the valid values when ``value`` is not one of ``choices``
    (a method constructor's check of a named switch)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Option:
    """One typed method option, read from the model class's keyword-only parameters."""

    name: str
    default: Any
    annotation: Any

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to the option's type, or an :class:`OccReIDError`."""
        ok, converted = _coerce(value, self.annotation)
        if not ok:
            raise OccReIDError(
                f"{where}={value!r} has the wrong type: expected {_type_name(self.annotation)} "
                f"(default {self.default!r})"
            )
        return converted


_SEQUENCES = (list, tuple, collections.abc.Sequence)


def _type_name(tp: Any) -> str:
    if tp is inspect.Parameter.empty:
        return "any"
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in _SEQUENCES:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Tuple[bool, Any]:
    """(accepted, value) for ``value`` against annotation ``tp`` (ints pass as floats)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin in _SEQUENCES:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = []
        for item in value:
            ok, v = _coerce(item, args[0]) if args else (True, item)
            if not ok:
                return False, value
            items.append(v)
        return True, tuple(items) if origin is tuple else list(items)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number, float(value) if number else value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


@dataclasses.dataclass
class ParamSet:
    """The parameters one optimiser holds, with their weight decays and learning-rate schedule.

    The engine builds each set into one optimiser with the TransReID groups (parameters whose
    name contains ``"bias"`` at ``base_lr * bias_lr_factor`` with ``weight_decay_bias``).
    ``schedule``: ``"cosine"`` (the solver's warm-up cosine) or ``"constant"`` (no scheduler).
    """

    name: str
    params: List[Tuple[str, nn.Parameter]]
    weight_decay: Optional[float] = None  # None: solver.weight_decay
    weight_decay_bias: Optional[float] = None  # None: solver.weight_decay_bias
    schedule: str = "cosine"


class MethodSpec:
    """Base class of a method's spec: the defaults are the ViT baseline's behaviour.

    Subclasses set :attr:`name` and :attr:`model_class` and override what differs.
    """

    #: The registered name (``model.name`` in a config).
    name: str = ""
    #: Other names accepted for ``model.name``.
    aliases: Tuple[str, ...] = ()
    #: ``nn.Module`` class taking ``(backbone, num_classes, *, options)``.
    model_class: type = nn.Module
    #: FED's 7-channel NPO training samples: ``"required"``, ``"optional"`` (``data.npo=true``
    #: allowed) or ``"unsupported"``.
    npo: str = "unsupported"
    #: DDP must look for parameters without gradients (e.g. ablated heads).
    ddp_find_unused_parameters: bool = False

    # ------------------------------------------------------------------ options
    def options(self) -> Dict[str, Option]:
        """The method's typed options: the keyword-only parameters of :attr:`model_class`."""
        sig = inspect.signature(self.model_class.__init__)
        try:
            hints = typing.get_type_hints(self.model_class.__init__)
        except Exception:  # pragma: no cover - unresolved forward references
            hints = {}
        return {
            p.name: Option(p.name, p.default, hints.get(p.name, inspect.Parameter.empty))
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def resolve_options(self, model_cfg: Mapping[str, Any], shared_defaults: Mapping[str, Any]) -> Dict[str, Any]:
        """The options this method is built with, from a config's ``model`` section.

        ``model.kwargs`` may name only the method's options; the shared keys
        (:data:`SHARED_MODEL_KEYS`) reach the method when it has that option, and set to
        anything but their default they are an error for a method that has not.
        """
        opts = self.options()
        valid = ", ".join(sorted(opts)) or "(none)"
        out: Dict[str, Any] = {}
        for key in SHARED_MODEL_KEYS:
            if key not in model_cfg:
                continue
            value = model_cfg[key]
            if key in opts:
                out[key] = opts[key].check(value, f"model.{key}")
            elif value != shared_defaults.get(key):
                raise OccReIDError(
                    f"model.{key}={value!r} does not apply to method {self.name!r} (it has no {key!r} "
                    f"option); remove it or set it to {shared_defaults.get(key)!r}. {self.name} options: {valid}"
                )
        for key, value in dict(model_cfg.get("kwargs") or {}).items():
            if key in SHARED_MODEL_KEYS:
                raise OccReIDError(f"set model.{key}, not model.kwargs.{key} (a shared model key)")
            if key not in opts:
                close = difflib.get_close_matches(key, list(opts), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise OccReIDError(
                    f"unknown option model.kwargs.{key} for method {self.name!r}.{hint} Valid options: {valid}"
                )
            out[key] = opts[key].check(value, f"model.kwargs.{key}")
        return out

    def build_model(self, backbone: nn.Module, num_classes: int, **options: Any) -> nn.Module:
        """The method's model on ``backbone``; invalid option values raise :class:`OccReIDError`."""
        try:
            return self.model_class(backbone, num_classes, **options)
        except (TypeError, ValueError) as exc:
            raise OccReIDError(f"cannot build method {self.name!r}: {exc}") from None

    @staticmethod
    def backbone_of(model: nn.Module) -> nn.Module:
        """The ViT of a method model (every method names it ``backbone``)."""
        return model.backbone

    # ------------------------------------------------------------------ optimisers
    def param_sets(self, model: nn.Module, solver: Mapping[str, Any]) -> List[ParamSet]:
        """One optimiser over every trainable parameter with the solver's schedule."""
        return [ParamSet("main", [(n, p) for n, p in model.named_parameters() if p.requires_grad])]

    # ------------------------------------------------------------------ training
    def on_train_start(self, model: nn.Module, train_eval_loader: Callable[[], Iterable], device: torch.device) -> None:
        """Work before the first epoch. ``train_eval_loader()`` gives a loader over the
        training images with the test transform (batches ``{"images", "pids", "camids"}``)."""

    def supports_accumulation(self, model: nn.Module) -> bool:
        """Whether ``solver.accum_steps > 1`` (gradient accumulation over shares) is exact."""
        return len(self.passes(model)) == 1 and type(self).after_step is MethodSpec.after_step

    def passes(self, model: nn.Module) -> Sequence[Tuple[int, ...]]:
        """The passes of one iteration: each a forward/backward followed by a step of the
        optimisers it names (indices into :meth:`param_sets`). Default: one pass, all."""
        return ((0,),)

    def forward_train(self, forward: Callable[..., Any], model: nn.Module, batch: Mapping[str, Any], pass_index: int) -> Any:
        """The training forward of pass ``pass_index`` (``forward`` may be the DDP wrapper)."""
        return forward(batch["images"], cam_ids=batch.get("camids"))

    def loss(self, model: nn.Module, outputs: Any, batch: Mapping[str, Any]) -> Dict[str, Tensor]:
        """The weighted loss terms; the step sums them."""
        return model.loss(outputs, batch["pids"])

    def after_step(self, model: nn.Module, outputs: Any, batch: Mapping[str, Any]) -> None:
        """After the iteration's last optimiser step (FED's memory update)."""

    def step_stats(self, model: nn.Module, outputs: Any, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """Extra logged figures of an iteration (e.g. DPM's accuracy): numbers or 0-d tensors
        (the step turns every figure into a float with one host transfer, so return tensors
        rather than calling ``float()`` here)."""
        return {}

    # ------------------------------------------------------------------ inference
    def eval_outputs(self, model: nn.Module) -> Dict[str, Dict[str, Any]]:
        """The eval-mode outputs a deployed model returns (``"feat"`` first, L2-normalised by
        inference and export), each with what the export sidecar says of it."""
        return {"feat": {"l2_normalised": True}}

    def check_deployable(self, model: nn.Module) -> None:
        """Raise :class:`OccReIDError` when this model cannot be exported as it is."""

    def retrieval(self, model: nn.Module) -> Dict[str, Any]:
        """How features are compared, as stored in gallery indexes and exports."""
        return {"distance": "cosine"}

    def retrieval_distance(self, model: nn.Module, query: Mapping[str, Tensor], gallery: Mapping[str, Tensor]):
        """The method's own query-gallery distance (a matrix or an evaluator block callable),
        or ``None`` for the evaluator's plain distance."""
        return None

    # ------------------------------------------------------------------ official weights
    #: Key prefixes that every official checkpoint of this method holds (``module.`` removed);
    #: :func:`occreid.engine.official.detect_official_method` picks the method whose prefixes
    #: all occur, the most specific one when several do. Empty: no official format.
    official_keys: Tuple[str, ...] = ()
    #: The entry of a converted state dict whose rows count the training identities.
    num_classes_key: str = "classifier.weight"

    def convert_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """An official checkpoint's ``state_dict`` in this method's names."""
        raise OccReIDError(f"method {self.name!r} has no official checkpoint format")

    def official_companion_path(self, checkpoint: Any) -> Optional[Any]:
        """The file the official code saves beside ``checkpoint`` (a ``Path``) with state the
        checkpoint lacks (FED: its memory bank), or ``None``."""
        return None

    def complete_official_state(
        self, state: Dict[str, Tensor], model_state: Mapping[str, Tensor], companion: Optional[Any]
    ) -> Dict[str, Tensor]:
        """Add to a converted official ``state`` the entries of ``model_state`` (names, shapes
        and dtypes of the model's own state dict) that official checkpoints keep elsewhere,
        from ``companion`` (what :meth:`official_companion_path` holds, loaded) when given."""
        if companion is not None:
            raise OccReIDError(f"official {self.name} checkpoints have no companion file (got one)")
        return state


METHODS: Registry = Registry("method")


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register ``spec`` under ``spec.name`` (and its aliases); returns it."""
    if not spec.name:
        raise ValueError("a MethodSpec needs a name")
    METHODS.register(spec.name, aliases=tuple(spec.aliases))(spec)
    return spec


def unregister_method(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    spec = METHODS.get(name)
    for key in [k for k, v in METHODS._items.items() if v is spec]:
        del METHODS._items[key]
        METHODS._canonical.pop(key, None)


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name`` (unknown names: an error with a suggestion)."""
    return METHODS.get(name)


def available_methods() -> List[str]:
    return METHODS.names()
