"""One small generic registry, shared by attention variants, kernel implementations, tasks, task
configs, presets, data sources and benchmarks, so that every name a user can type is looked up
(and rejected) the same way.

Every registry is filled the same way: a decorator in the module that defines the entry, and
that module found by its package's ``__init__`` calling ``import_submodules(__name__)``. Adding
a variant, task, kernel implementation or benchmark is therefore one new module; no list of
imports names it."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the whole message otherwise.
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> entry mapping with loud failures.

    Args:
      kind: what the entries are ("attention variant", "task", ...), used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Adds ``entry`` under ``name``; a second entry under the same name raises ValueError."""
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"{self.kind} names must be non-empty without spaces, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated object under ``name``."""
        return lambda entry: self.register(name, entry)

    def get(self, name: str) -> T:
        """Returns the entry for ``name``; an unknown name raises listing the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        """(name, entry) pairs in registration order."""
        return self._entries.items()


def import_submodules(package: str) -> list[str]:
    """Imports every module of ``package`` (not of its subpackages), in name order, so that the
    registration decorators in them run; returns the modules' full names. A package's
    ``__init__`` calls it with its own ``__name__``."""
    modules = [info.name for info in
               pkgutil.iter_modules(importlib.import_module(package).__path__, f"{package}.")]
    for name in modules:
        importlib.import_module(name)
    return modules
