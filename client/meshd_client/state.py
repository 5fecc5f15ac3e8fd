"""Handles on shared state documents.

A state document is a map replicated to every daemon. Reads are local to the daemon; writes
are CRDT operations that merge without conflict (see the operations below). ``durability``
is ``"local"`` (return at once) or ``"majority"`` (return once a majority of the live
members hold the change; raises Timeout naming how many did otherwise).

Numbers are doubles underneath (integers up to 2**53 read back as ints). Concurrent writes
to one key keep one of the values; use :meth:`StateDoc.incr` counters for counts, and
``{"$text": "..."}`` values for text edited concurrently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

from meshd_client import tracing

Durability = Literal["local", "majority"]
PathLike = str | int | list[str | int] | tuple[str | int, ...]
Caller = Callable[..., Awaitable[Any]]
StreamOpener = Callable[[str, dict[str, Any]], AbstractAsyncContextManager[AsyncIterator[Any]]]


def _path(path: PathLike | None) -> list[str | int]:
    if path is None:
        return []
    if isinstance(path, str | int):
        return [path]
    return list(path)


class StateDoc:
    def __init__(self, call: Caller, open_stream: StreamOpener, name: str) -> None:
        self._call = call
        self._open_stream = open_stream
        self.name = name

    _MISSING: Any = object()

    async def get(self, path: PathLike | None = None, *, default: Any = _MISSING) -> Any:
        """The value at ``path`` (the whole document by default). A missing document reads
        as ``{}``; a missing path raises NotFound unless a ``default`` is given."""
        from meshd_client.protocol.errors import NotFound

        args: dict[str, Any] = {"doc": self.name}
        if path is not None:
            args["path"] = _path(path)
        try:
            return await self._call("state.get", args)
        except NotFound:
            if default is not StateDoc._MISSING:
                return default
            if path is None:
                return {}
            raise

    async def update(
        self,
        ops: list[dict[str, Any]],
        durability: Durability = "local",
        *,
        once: str | None = None,
    ) -> dict[str, Any]:
        """Apply operations atomically (all or nothing). With ``once`` — an idempotency key,
        typically the id of the message being handled — a repeat of the same key changes
        nothing (``{"duplicate": True}``), even after the agent moved to another host."""
        args: dict[str, Any] = {"doc": self.name, "ops": ops, "durability": durability}
        if once is not None:
            args["once"] = once
        if not tracing.AVAILABLE:
            result: dict[str, Any] = await self._call("state.update", args)
            return result
        with tracing.outgoing("state.update", args):
            result = await self._call("state.update", args)
        return result

    async def set(self, path: PathLike, value: Any, durability: Durability = "local") -> None:
        await self.update([{"op": "set", "path": _path(path), "value": value}], durability)

    async def delete(self, path: PathLike, durability: Durability = "local") -> None:
        await self.update([{"op": "delete", "path": _path(path)}], durability)

    async def incr(
        self,
        path: PathLike,
        by: int = 1,
        durability: Durability = "local",
        *,
        once: str | None = None,
    ) -> None:
        """Add to a counter (created at 0 if missing); concurrent increments all count."""
        await self.update([{"op": "incr", "path": _path(path), "by": by}], durability, once=once)

    async def append(self, path: PathLike, *values: Any, durability: Durability = "local") -> None:
        await self.update(
            [{"op": "append", "path": _path(path), "values": list(values)}], durability
        )

    async def insert(
        self, path: PathLike, index: int, *values: Any, durability: Durability = "local"
    ) -> None:
        await self.update(
            [{"op": "insert", "path": _path(path), "index": index, "values": list(values)}],
            durability,
        )

    async def text_insert(
        self, path: PathLike, index: int, text: str, durability: Durability = "local"
    ) -> None:
        await self.update(
            [{"op": "text_insert", "path": _path(path), "index": index, "text": text}],
            durability,
        )

    async def text_delete(
        self, path: PathLike, index: int, length: int, durability: Durability = "local"
    ) -> None:
        await self.update(
            [{"op": "text_delete", "path": _path(path), "index": index, "length": length}],
            durability,
        )

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[Any]]:
        """The document's value now, then after every change (replicated or local)."""
        async with self._open_stream("state.watch", {"doc": self.name}) as changes:
            yield _values(changes)


async def _values(changes: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for change in changes:
        yield change.get("value") if isinstance(change, dict) else None
