"""Name -> component registries, with dotted-path fallback and helpful errors."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name; the message lists the known ones and the closest match."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def closest(name: str, options: list[str]) -> str | None:
    """The option most similar to ``name``, or ``None`` if nothing is close."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if match:
        return match[0]
    lowered = name.lower()
    contained = [o for o in options if len(o) > 1 and (o.lower() in lowered or lowered in o.lower())]
    if contained:
        return max(contained, key=len)
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return match[0] if match else None


def import_dotted(path: str) -> Any:
    """Import ``package.module:attr`` or ``package.module.attr``."""
    if ":" in path:
        module_name, attr = path.split(":", 1)
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"'{path}' is not a dotted path (expected 'package.module:name')")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """A named collection of entries (classes or factories).

    Entries can be registered lazily as ``"module:attr"`` strings so that heavy
    dependencies are imported only when the entry is used.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, entry: T | str | None = None) -> Callable[[T], T] | T:
        """Register ``entry`` under ``name``; usable as a decorator when ``entry`` is omitted."""
        if entry is not None:
            self._entries[name] = entry
            return entry

        def decorator(obj: T) -> T:
            self._entries[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        """The entry for ``name``; a dotted path imports a user's own component."""
        if name in self._entries:
            entry = self._entries[name]
            if isinstance(entry, str):
                entry = import_dotted(entry)
                self._entries[name] = entry
            return entry
        if "." in name or ":" in name:
            try:
                return import_dotted(name)
            except (ImportError, AttributeError) as err:
                raise RegistryError(f"cannot import {self.kind} '{name}': {err}") from err
        hint = closest(name, self.names())
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        raise RegistryError(
            f"unknown {self.kind} '{name}'{suggestion} (known: {', '.join(self.names())}; "
            f"or give a dotted path 'package.module:name')"
        )
