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
        self._families: dict[str, Callable[[str], T]] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def register_family(self, prefix: str, resolve: Callable[[str], T]) -> None:
        """Names ``prefix:MEMBER`` resolve, on first use, to ``resolve(MEMBER)`` (which raises a
        ``BenchmarkError`` for an unknown member): a family of plugins wrapping another library."""
        if prefix in self._families:
            raise ValueError(f"{self.kind} family '{prefix}' is registered twice")
        self._families[prefix] = resolve

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
        prefix, colon, member = name.partition(":")
        if name not in self._items and colon and prefix in self._families:
            try:
                self._items[name] = self._families[prefix](member)
            except BenchmarkError as exc:
                raise BenchmarkError(f"{where}: {exc}" if where else str(exc)) from None
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1, cutoff=0.5)
            known = [*sorted(self._items), *(f"{p}:<member>" for p in self._families)]
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(known)}"
            prefix = f"{where}: " if where else ""
            raise BenchmarkError(f"{prefix}unknown {self.kind} '{name}'{hint}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names (family members resolved so far included)."""
        self.discover()
        return sorted(self._items)

    def families(self) -> list[str]:
        self.discover()
        return sorted(self._families)

    def __contains__(self, name: str) -> bool:
        self.discover()
        if name in self._items:
            return True
        prefix, colon, _ = name.partition(":")
        if not (colon and prefix in self._families):
            return False
        try:
            self.get(name)
        except BenchmarkError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
