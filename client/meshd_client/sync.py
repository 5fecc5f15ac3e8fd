"""The synchronous client: the async :class:`~meshd_client.Mesh` driven through an anyio
blocking portal (an event loop in a background thread). Not a second implementation: every
method forwards to the async one.

::

    from meshd_client.sync import Mesh

    with Mesh() as mesh:
        mesh.serve("echo", lambda ctx, msg: msg.body)
        print(mesh.request("echo", "hi"))

Agent handlers are plain functions ``handler(ctx, msg)`` (or objects with ``handle``); they
run in worker threads, and ``ctx`` offers the same calls as the async context, blocking.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from functools import partial
from typing import Any, Literal, TypeVar

import anyio
import anyio.from_thread
from anyio.from_thread import BlockingPortal

from meshd_client import mesh as async_mesh
from meshd_client._version import __version__
from meshd_client.agents import Agent as AsyncAgent
from meshd_client.agents import AgentContext
from meshd_client.state import Durability, PathLike
from meshd_client.state import StateDoc as AsyncStateDoc
from meshd_client.types import AgentInfo, Message, RegistryEvent, Signal

T = TypeVar("T")
SyncHandler = Callable[["SyncAgentContext", Message], Any]


@contextmanager
def _stream(
    portal: BlockingPortal, cm: AbstractAsyncContextManager[Any]
) -> Iterator[Iterator[Any]]:
    """Enter an async stream context now (so the subscription exists when the ``with``
    block starts) and iterate it with blocking calls."""
    with portal.wrap_async_context_manager(cm) as items:

        def blocking() -> Iterator[Any]:
            while True:
                try:
                    yield portal.call(items.__anext__)
                except StopAsyncIteration:
                    return

        yield blocking()


class StateDoc:
    """Blocking twin of :class:`meshd_client.StateDoc`."""

    def __init__(self, portal: BlockingPortal, doc: AsyncStateDoc) -> None:
        self._portal = portal
        self._doc = doc
        self.name = doc.name

    def get(self, path: PathLike | None = None, **kwargs: Any) -> Any:
        return self._portal.call(partial(self._doc.get, path, **kwargs))

    def update(self, ops: list[dict[str, Any]], durability: Durability = "local") -> Any:
        return self._portal.call(self._doc.update, ops, durability)

    def set(self, path: PathLike, value: Any, durability: Durability = "local") -> None:
        self._portal.call(self._doc.set, path, value, durability)

    def delete(self, path: PathLike, durability: Durability = "local") -> None:
        self._portal.call(self._doc.delete, path, durability)

    def incr(self, path: PathLike, by: int = 1, durability: Durability = "local") -> None:
        self._portal.call(self._doc.incr, path, by, durability)

    def append(self, path: PathLike, *values: Any, durability: Durability = "local") -> None:
        self._portal.call(partial(self._doc.append, path, *values, durability=durability))

    def watch(self) -> AbstractContextManager[Iterator[Any]]:
        return _stream(self._portal, self._doc.watch())


class SyncAgentContext:
    """What a synchronous handler gets; its calls block the handler's worker thread."""

    def __init__(self, ctx: AgentContext, portal: BlockingPortal) -> None:
        self._ctx = ctx
        self.name = ctx.name
        self.state = StateDoc(portal, ctx.state)

    def send(self, to: str, body: Any = None, **kwargs: Any) -> None:
        anyio.from_thread.run(partial(self._ctx.send, to, body, **kwargs))

    def request(self, to: str, body: Any = None, **kwargs: Any) -> Any:
        return anyio.from_thread.run(partial(self._ctx.request, to, body, **kwargs))

    def publish(self, topic: str, data: Any = None, **kwargs: Any) -> int:
        return int(anyio.from_thread.run(partial(self._ctx.publish, topic, data, **kwargs)))


class Agent:
    """Blocking handle on a running agent."""

    def __init__(self, portal: BlockingPortal, agent: AsyncAgent) -> None:
        self._portal = portal
        self._agent = agent
        self.name = agent.name

    @property
    def info(self) -> AgentInfo | None:
        return self._agent.info

    @property
    def stop_reason(self) -> str | None:
        return self._agent.stop_reason

    @property
    def handled(self) -> int:
        return self._agent.handled

    def stop(self) -> None:
        self._portal.call(self._agent.stop)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the agent stops; False if ``timeout`` elapsed first."""

        async def waiter() -> bool:
            with anyio.move_on_after(timeout if timeout is not None else float("inf")):
                await self._agent.wait()
                return True
            return False

        return bool(self._portal.call(waiter))


# Open blocking meshes. Their portal runs an event loop in a non-daemon thread, which the
# interpreter waits for at exit: a script that raised before close() would hang there. So
# they are closed at interpreter shutdown, before non-daemon threads are joined.
_OPEN: weakref.WeakSet[Mesh] = weakref.WeakSet()


def _close_open_meshes() -> None:
    for mesh in list(_OPEN):
        with contextlib.suppress(Exception):
            mesh.close()


threading._register_atexit(_close_open_meshes)  # type: ignore[attr-defined]


class Mesh:
    """Blocking twin of :class:`meshd_client.Mesh`. Use as a context manager, or call
    :meth:`close` when done (a script that ends without closing it still exits: open meshes
    are closed at interpreter shutdown)."""

    def __init__(
        self,
        socket: str | None = None,
        *,
        client: str = f"meshd-client-sync/{__version__}",
        connect_timeout: float = 5.0,
        backend: Literal["asyncio", "trio"] = "asyncio",
    ) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal(backend)
        self._portal = self._portal_cm.__enter__()
        try:
            self._mesh_cm = self._portal.wrap_async_context_manager(
                async_mesh.Mesh.connect(socket, client=client, connect_timeout=connect_timeout)
            )
            self._mesh: async_mesh.Mesh = self._mesh_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False
        _OPEN.add(self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        try:
            self._mesh_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def node(self) -> str:
        return self._mesh.node

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(partial(fn, *args, **kwargs))

    # registry
    def lookup(self, name: str) -> AgentInfo:
        return self._run(self._mesh.lookup, name)  # type: ignore[no-any-return]

    def agents(self, **filters: Any) -> list[AgentInfo]:
        return self._run(self._mesh.agents, **filters)  # type: ignore[no-any-return]

    def find(self, capability: str) -> list[AgentInfo]:
        return self._run(self._mesh.find, capability)  # type: ignore[no-any-return]

    def health(self, name: str) -> str:
        return str(self._run(self._mesh.health, name))

    def watch_registry(self) -> AbstractContextManager[Iterator[RegistryEvent]]:
        return _stream(self._portal, self._mesh.watch_registry())

    # messaging
    def send(self, to: str, body: Any = None, **kwargs: Any) -> None:
        self._run(self._mesh.send, to, body, **kwargs)

    def request(self, to: str, body: Any = None, **kwargs: Any) -> Any:
        return self._run(self._mesh.request, to, body, **kwargs)

    # signals
    def publish(self, topic: str, data: Any = None, **kwargs: Any) -> int:
        return int(self._run(self._mesh.publish, topic, data, **kwargs))

    def subscribe(self, pattern: str) -> AbstractContextManager[Iterator[Signal]]:
        return _stream(self._portal, self._mesh.subscribe(pattern))

    # state
    def state(self, name: str) -> StateDoc:
        return StateDoc(self._portal, self._mesh.state(name))

    # agents
    def serve(
        self,
        name: str,
        handler: SyncHandler | Any,
        *,
        kind: str = "",
        capabilities: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
        concurrency: int = 1,
    ) -> Agent:
        """Run a synchronous handler for agent ``name`` (in worker threads)."""
        function: SyncHandler = handler.handle if hasattr(handler, "handle") else handler
        portal = self._portal

        async def run_in_thread(ctx: AgentContext, msg: Message) -> Any:
            return await anyio.to_thread.run_sync(function, SyncAgentContext(ctx, portal), msg)

        agent = self._run(
            self._mesh.serve,
            name,
            run_in_thread,
            kind=kind,
            capabilities=capabilities,
            metadata=metadata,
            concurrency=concurrency,
        )
        return Agent(portal, agent)
