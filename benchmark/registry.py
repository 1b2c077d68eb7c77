"""One generic registry: a decorator for in-tree plugins, entry points for out-of-tree ones.

Modelled on lm-evaluation-harness's ``lm_eval/api/registry.py``: an unknown name is an error that
suggests the nearest registered name.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from benchmark.errors import BenchmarkError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; ``discover`` imports in-tree modules and entry-point plugins once."""

    def __init__(self, kind: str, entry_point_group: str | None = None, package: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.package = package
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        if self.package is not None:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
        if self.entry_point_group is not None:
            for ep in entry_points(group=self.entry_point_group):
                obj = ep.load()
                self._items.setdefault(ep.name, obj)

    def get(self, name: str, where: str = "") -> T:
        self.discover()
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(self._items))}"
            prefix = f"{where}: " if where else ""
            raise BenchmarkError(f"{prefix}unknown {self.kind} '{name}'{hint}")
        return self._items[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
