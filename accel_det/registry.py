"""A strict name -> builder registry (timm style: register with a decorator, look up by name)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[F]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            key = name or fn.__name__
            if key in self._items:
                raise RegistryError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(sorted(self._items))
            raise RegistryError(f"unknown {self.kind} {name!r}{hint}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
