"""A name -> object registry with helpful errors (one for datasets, one for models, ...)."""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, TypeVar

from .io import OccReIDError

T = TypeVar("T")


class UnknownNameError(OccReIDError, KeyError):
    """A registry lookup of a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps lower-case names (and aliases) to builders.

    >>> DATASETS = Registry("dataset")
    >>> @DATASETS.register("market1501", aliases=("market",))
    ... class Market: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._canonical: Dict[str, str] = {}

    def register(self, name: str, aliases: tuple = ()) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for key in (name, *aliases):
                key = key.lower()
                if key in self._items:
                    raise ValueError(f"{self.kind} {key!r} is already registered")
                self._items[key] = obj
                self._canonical[key] = name.lower()
            return obj

        return deco

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, list(self._items), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}"
            )
        return self._items[key]

    def canonical(self, name: str) -> str:
        self.get(name)
        return self._canonical[str(name).lower()]

    def names(self) -> list:
        """Canonical names only (aliases hidden), sorted."""
        return sorted(set(self._canonical.values()))

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
