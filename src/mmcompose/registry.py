"""A tiny name -> object registry filled by decorators (encoders, projectors, merge methods)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mmcompose.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """``plugins``: modules that register more entries; imported on the first unknown name, so
    a saved model naming e.g. a pretrained encoder loads without the caller importing it."""

    def __init__(self, kind: str, plugins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._plugins = list(plugins)

    def _load_plugins(self) -> None:
        import importlib

        while self._plugins:
            importlib.import_module(self._plugins.pop(0))

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}", hint=f"choose one of: {known}"
            ) from None

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self._load_plugins()
        return name in self._items

    def find(self, match: Callable[[T], bool]) -> tuple[str, T] | None:
        """The first entry, by name, that ``match`` accepts; those registered already are tried
        before the plugins are imported, so a caller whose answer is built in never pays for
        the plugins' imports (the checkpoint importers pull in the model code: seconds)."""
        tried: set[str] = set()
        for load in (False, True):
            if load:
                if not self._plugins:
                    break
                self._load_plugins()
            for name in sorted(self._items.keys() - tried):
                tried.add(name)
                if match(self._items[name]):
                    return name, self._items[name]
        return None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)
