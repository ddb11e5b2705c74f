"""A registry by name: the shape of the site's dataset formats (``site_agent.data.formats``) and image readers
(``site_agent.data.images``).

Each thing registers once under its name; a second registration of a name is refused, and so is a name nobody
registered, in a sentence that lists the known ones. The error is the caller's own kind (a ``FlipError``), so a
refusal reaches the site admin as the sentences of its package do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from flip_core.errors import FlipError

T = TypeVar("T")


class Registry(Generic[T]):
    """Things of one kind by name, in the order they were registered; ``noun`` names the kind in sentences
    ("dataset format"), ``error`` is what a refusal raises."""

    def __init__(self, noun: str, error: type[FlipError]) -> None:
        self.noun = noun
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; refused when the name is taken. Returns ``item``."""
        if name in self._items:
            raise self.error(f"{self.noun} {name!r} is registered already: a name is registered once")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The thing registered under ``name``; refused, naming the known ones, when there is none."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self._items) or "none"
            raise self.error(f"unknown {self.noun} {name!r}: the known ones are {known}") from None

    def names(self) -> tuple[str, ...]:
        """The registered names, in the order they were registered."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())
