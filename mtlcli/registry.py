"""Name -> component registries, filled by decorators where each component lives."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' suffix for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """A named collection of components of one kind (sharing schemes, weighting strategies)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def remove(self, name: str) -> T:
        """Take a component out again (a test's temporary component)."""
        return self._items.pop(name)

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(item: T) -> T:
            return self.add(name, item)

        return decorate

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The component called ``name``; KeyError with the known names and a suggestion."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names())
            raise KeyError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; known: {known}") from None


@dataclass(frozen=True)
class Component:
    """A recipe-selectable component: its parameter schema, its builder and a one-line summary.

    ``check`` (optional) validates the parameters against the rest of the recipe (for example
    that per-task weights name real tasks) and returns (key, message) pairs, empty when fine.
    """

    name: str
    params: type[BaseModel]
    build: Callable[..., Any]
    summary: str
    check: Callable[[Any, Any], list[tuple[str, str]]] | None = None
