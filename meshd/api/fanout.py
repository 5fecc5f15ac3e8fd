"""Listeners that come and go with API streams: added and removed in constant time."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

E = TypeVar("E")


class Fanout(Generic[E]):
    """Calls every listener added (in the order added) with each event. Register the
    instance itself once as a component's listener; each stream then adds and removes its
    own listener here without scanning the others (thousands of watch streams open and
    close without a list scan each)."""

    def __init__(self) -> None:
        self._listeners: dict[int, Callable[[E], None]] = {}
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self._listeners)

    def add(self, listener: Callable[[E], None]) -> Callable[[], None]:
        """Add ``listener``; returns the function that removes it (idempotent)."""
        key = next(self._keys)
        self._listeners[key] = listener

        def remove() -> None:
            self._listeners.pop(key, None)

        return remove

    def __call__(self, event: E) -> None:
        for listener in list(self._listeners.values()):
            listener(event)
