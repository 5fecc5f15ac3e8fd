"""How components read and change replicated documents.

The daemon hands every component the replication driver, which persists and pushes each
change before the call returns; simulations and unit tests hand them the bare
:class:`~meshd.replication.core.Replicator` and collect its outputs themselves. Either way a
component never holds more than this: it cannot change a document behind the write path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from pycrdt import Doc

from meshd.replication.core import Durability
from meshd.replication.replica import DocStore, Replica


class Documents(Protocol):
    @property
    def store(self) -> DocStore:
        """Every replica held here, to read (never to change directly)."""

    @property
    def peers(self) -> list[str]: ...

    def write(
        self,
        now: float,
        name: str,
        mutate: Callable[[Doc[Any]], None],
        *,
        epoch: int = 0,
        durability: Durability = "local",
    ) -> int | None: ...

    def open(self, name: str, epoch: int = 0) -> Replica: ...

    def replace(self, name: str, epoch: int, doc: Doc[Any]) -> Replica: ...

    def drop(self, name: str) -> None: ...

    def query(self, docs: Iterable[str], peers: Iterable[str]) -> int: ...

    def sync_with(self, now: float, peer: str) -> None: ...
