"""Methods: one package per method, each with one :class:`MethodSpec` (see :mod:`.spec`).

Adding a method is one package plus one registration line below (or a
:func:`register_method` call in your own code): docs/methods/adding.md.
"""

from .spec import (
    METHODS,
    SHARED_MODEL_KEYS,
    MethodSpec,
    Option,
    ParamSet,
    available_methods,
    get_method,
    register_method,
    unregister_method,
)
from .build import build_model

# the shipped methods: one registration line each
from . import baseline, fed, dpm  # noqa: E402,F401  (registers BaselineSpec, FEDSpec, DPMSpec)

__all__ = [
    "METHODS",
    "SHARED_MODEL_KEYS",
    "MethodSpec",
    "Option",
    "ParamSet",
    "available_methods",
    "build_model",
    "get_method",
    "register_method",
    "unregister_method",
]
