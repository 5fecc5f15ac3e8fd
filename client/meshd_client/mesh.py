"""The high-level client: one :class:`Mesh` per process (or per concern), on anyio.

``Mesh.connect()`` keeps a connection to the local daemon alive: when the daemon restarts,
the mesh reconnects with backoff and re-registers its agents and subscriptions. While it is
disconnected, calls fail fast with :class:`~meshd_client.errors.Unreachable` instead of
hanging — except ``at_least_once`` calls, which keep retrying (with the same message id, so
the receiver runs the handler once) until their timeout.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup

from meshd_client import tracing
from meshd_client._version import __version__
from meshd_client.agents import Agent, Handler
from meshd_client.connection import Connection, socket_path
from meshd_client.protocol import errors
from meshd_client.protocol.errors import MeshError
from meshd_client.runners import Factory, Runner, Strategy
from meshd_client.state import StateDoc
from meshd_client.types import AgentInfo, RegistryEvent, Signal

_NOT_FOUND_GRACE = 3.0


class Mesh:
    """Use ``async with Mesh.connect() as mesh:``."""

    def __init__(self, path: str, client: str, connect_timeout: float) -> None:
        self.socket = path
        self.client = client
        self.connect_timeout = connect_timeout
        self._conn: Connection | None = None
        self._connected = anyio.Event()
        self._closing = False
        self._tg: TaskGroup | None = None
        self._agents: dict[str, Agent] = {}
        self.node = ""
        self.reconnects = 0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        socket: str | None = None,
        *,
        client: str = f"meshd-client/{__version__}",
        connect_timeout: float = 5.0,
        wait: bool = True,
    ) -> AsyncIterator[Mesh]:
        """Connect to the local daemon (``socket``, else ``$MESHD_SOCKET``, else the
        default). With ``wait`` (the default) the first connection must succeed, or this
        raises; afterwards, connection loss is handled by reconnecting."""
        mesh = cls(socket_path(socket), client, connect_timeout)
        try:
            async with anyio.create_task_group() as tg:
                mesh._tg = tg
                ready = anyio.Event()
                failure: list[MeshError] = []
                tg.start_soon(mesh._supervise, ready, failure, wait)
                await ready.wait()
                if failure:
                    raise failure[0]
                try:
                    yield mesh
                finally:
                    mesh._closing = True
                    for agent in list(mesh._agents.values()):
                        agent.stop()
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise

    async def _supervise(self, ready: anyio.Event, failure: list[MeshError], wait: bool) -> None:
        backoff = 0.05
        first = True
        while not self._closing:
            try:
                async with Connection.open(
                    self.socket, client=self.client, timeout=self.connect_timeout
                ) as conn:
                    self._conn = conn
                    self.node = conn.node
                    if not first:
                        self.reconnects += 1
                    first = False
                    backoff = 0.05
                    self._connected.set()
                    ready.set()
                    await conn.lost.wait()
            except MeshError as exc:
                if first and wait:
                    failure.append(exc)
                    ready.set()
                    return
                ready.set()
            finally:
                self._conn = None
                if self._connected.is_set():
                    self._connected = anyio.Event()
            await anyio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def wait_connected(self, timeout: float = math.inf) -> Connection:
        """The live connection, waiting up to ``timeout`` for one."""
        with anyio.move_on_after(timeout):
            while True:
                conn = self._conn
                if conn is not None and not conn.closed:
                    return conn
                await self._connected.wait()
        raise errors.Unreachable(f"meshd is not reachable on {self.socket}; reconnecting")

    def _current(self) -> Connection:
        conn = self._conn
        if conn is None or conn.closed:
            raise errors.Unreachable(f"meshd is not reachable on {self.socket}; reconnecting")
        return conn

    async def call(
        self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """A raw API call (fails fast with Unreachable while disconnected)."""
        try:
            return await self._current().call(op, args, timeout=timeout)
        except errors.Closed:
            if self._closing:
                raise
            raise errors.Unreachable(
                f"lost the connection to meshd on {self.socket}; reconnecting"
            ) from None

    async def notify(self, op: str, args: dict[str, Any] | None = None) -> None:
        """A one-way request (fails fast with Unreachable while disconnected)."""
        try:
            await self._current().notify(op, args)
        except errors.Closed:
            raise errors.Unreachable(
                f"lost the connection to meshd on {self.socket}; reconnecting"
            ) from None

    # ------------------------------------------------------------------ registry

    async def lookup(self, name: str) -> AgentInfo:
        """Where ``name`` runs. Answered from the local daemon's index (no network)."""
        return AgentInfo.from_wire(await self.call("lookup", {"name": name}))

    async def agents(
        self,
        *,
        kind: str | None = None,
        capability: str | None = None,
        node: str | None = None,
        limit: int = 10_000,
    ) -> list[AgentInfo]:
        filters = {"kind": kind, "capability": capability, "node": node}
        args: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
        args["limit"] = limit
        result = await self.call("agents", args)
        return [AgentInfo.from_wire(a) for a in result.get("agents", [])]

    async def find(self, capability: str) -> list[AgentInfo]:
        """Every live agent offering ``capability``."""
        return await self.agents(capability=capability)

    async def health(self, name: str) -> str:
        """``healthy``, ``degraded``, ``unreachable`` or ``not_found``."""
        result = await self.call("health", {"name": name})
        return str(result.get("health"))

    @asynccontextmanager
    async def watch_registry(self) -> AsyncIterator[AsyncIterator[RegistryEvent]]:
        async with self._resilient_stream("registry.watch", {}) as events:
            yield _mapped(events, RegistryEvent.from_wire)

    # ------------------------------------------------------------------ messaging

    async def send(
        self,
        to: str,
        body: Any = None,
        *,
        at_least_once: bool = False,
        timeout: float = 10.0,
        id: str | None = None,
        sender: str = "",
        traceparent: str | None = None,
    ) -> None:
        """Send a message to the agent named ``to``. Returns once it was handed over (at
        most once), or once the agent handled it (``at_least_once``). The message carries
        the caller's OpenTelemetry trace context, or ``traceparent`` if given (see
        docs/client.md#tracing)."""
        await self._message("send", to, body, at_least_once, timeout, id, sender, traceparent)

    async def request(
        self,
        to: str,
        body: Any = None,
        *,
        timeout: float = 10.0,
        at_least_once: bool = False,
        id: str | None = None,
        sender: str = "",
        traceparent: str | None = None,
    ) -> Any:
        """Ask the agent named ``to`` and return its reply (or raise its error). Traced like
        :meth:`send`."""
        return await self._message(
            "request", to, body, at_least_once, timeout, id, sender, traceparent
        )

    async def _message(
        self,
        op: str,
        to: str,
        body: Any,
        at_least_once: bool,
        timeout: float,
        msg_id: str | None,
        sender: str,
        traceparent: str | None,
    ) -> Any:
        msg_id = msg_id or uuid.uuid4().hex
        args = {
            "to": to,
            "body": body,
            "id": msg_id,
            "from": sender,
            "at_least_once": at_least_once,
        }
        if not tracing.AVAILABLE and traceparent is None:
            return await self._deliver(op, to, args, at_least_once, timeout, msg_id)
        with tracing.outgoing(op, args, to=to, traceparent=traceparent):
            return await self._deliver(op, to, args, at_least_once, timeout, msg_id)

    async def _deliver(
        self,
        op: str,
        to: str,
        args: dict[str, Any],
        at_least_once: bool,
        timeout: float,
        msg_id: str,
    ) -> Any:
        if not at_least_once:
            return await self.call(op, {**args, "timeout": timeout}, timeout=timeout + 1)
        started = time.monotonic()
        deadline = started + timeout
        backoff = 0.05
        not_found_since: float | None = None  # the start of an unbroken run of not_found
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.Timeout(
                    f"{op} to {to!r} not acknowledged within {timeout} s", detail={"id": msg_id}
                )
            try:
                conn = await self.wait_connected(remaining)
                attempt = min(remaining, max(1.0, timeout / 4))
                return await conn.call(op, {**args, "timeout": attempt}, timeout=attempt + 1)
            except errors.RETRYABLE:
                not_found_since = None
            except errors.NotFound:
                # An agent re-registering after its daemon restarted, or moving, is briefly
                # not found; keep trying for a short grace, not the whole timeout. The grace
                # runs from the first not_found in a row: a call that waited out a restart
                # still gets it in full when the agent's host comes back.
                now = time.monotonic()
                not_found_since = now if not_found_since is None else not_found_since
                if now - not_found_since > min(timeout, _NOT_FOUND_GRACE):
                    raise
            await anyio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(1.0, backoff * 2)

    # ------------------------------------------------------------------ signals

    async def publish(
        self,
        topic: str,
        data: Any = None,
        *,
        type: str | None = None,
        source: str | None = None,
        subject: str | None = None,
        id: str | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> int:
        """Publish a CloudEvents-shaped signal; returns how many hosts it was sent to."""
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": id or uuid.uuid4().hex,
            "source": source or f"meshd://{self.node or 'local'}/{self.client}",
            "type": type or topic,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "datacontenttype": "application/cbor",
            **(extensions or {}),
        }
        if data is not None:
            event["data"] = data
        if subject is not None:
            event["subject"] = subject
        if not tracing.AVAILABLE or "traceparent" in event:
            result = await self.call("publish", {"topic": topic, "event": event})
        else:
            # The CloudEvents distributed-tracing extension: traceparent/tracestate attributes.
            with tracing.outgoing("publish", event):
                result = await self.call("publish", {"topic": topic, "event": event})
        return int(result.get("hosts", 0))

    @asynccontextmanager
    async def subscribe(self, pattern: str) -> AsyncIterator[AsyncIterator[Signal]]:
        """Signals on topics matching ``pattern`` (``a.*``: one segment, ``a.**``: any
        depth). Survives reconnects; signals published while disconnected are missed
        (signals are at most once)."""
        async with self._resilient_stream("subscribe", {"pattern": pattern}) as items:
            yield _mapped(items, Signal.from_wire)

    @asynccontextmanager
    async def _resilient_stream(
        self, op: str, args: dict[str, Any]
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """A stream op re-opened after every reconnect, as one iterator."""
        send, receive = anyio.create_memory_object_stream[Any](1024)
        opened = anyio.Event()
        failure: list[MeshError] = []

        async def pump() -> None:
            while not self._closing:
                conn = await self.wait_connected()
                streaming = False
                try:
                    async with conn.stream(op, args) as items:
                        streaming = True
                        opened.set()
                        async for item in items:
                            await send.send(item)
                except (errors.Closed, errors.Unreachable):
                    continue
                except MeshError as exc:
                    if streaming and isinstance(exc, errors.Overloaded):
                        continue  # dropped for falling behind: open it again
                    failure.append(exc)
                    opened.set()
                    send.close()
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                await opened.wait()
                if failure:
                    raise failure[0]
                try:
                    yield _drain(receive, failure)
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # An error from the caller's block (or the stream's own) comes back as itself,
            # so that ``except Invalid`` works, as with Mesh.connect().
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise

    # ------------------------------------------------------------------ state

    def state(self, name: str) -> StateDoc:
        """A handle on the shared state document ``name`` (no I/O until used)."""
        return StateDoc(self.call, self._resilient_stream, name)

    # ------------------------------------------------------------------ agents

    async def serve(
        self,
        name: str,
        handler: Handler,
        *,
        kind: str = "",
        capabilities: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
        concurrency: int = 1,
    ) -> Agent:
        """Register ``name`` and run ``handler`` for its messages until stopped. Returns
        once the agent is registered (raises Conflict if the name is taken)."""
        if name in self._agents:
            raise errors.Conflict(f"this client already serves {name!r}")
        assert self._tg is not None
        agent = Agent(
            self,
            name,
            handler,
            kind=kind,
            capabilities=tuple(capabilities),
            metadata=metadata or {},
            concurrency=concurrency,
        )
        self._agents[name] = agent
        try:
            await self._tg.start(agent.run)
        except BaseException:
            self._agents.pop(name, None)
            raise
        return agent

    async def serve_kind(
        self,
        kind: str,
        factory: Factory,
        *,
        capacity: int = 1000,
        strategy: Strategy = "keep_majority",
        idle_timeout: float | None = 300.0,
        concurrency: int = 1,
    ) -> Runner:
        """Offer to run agents of ``kind``: ``factory(name)`` returns the handler for each
        agent placed here (activated on its first message, by ``spawn``, on failover or by a
        move). ``strategy`` decides what happens in a partition: ``keep_majority`` agents run
        only on a majority side; ``allow_duplicates`` agents run on both sides."""
        assert self._tg is not None
        runner = Runner(
            self,
            kind,
            factory,
            capacity=capacity,
            strategy=strategy,
            idle_timeout=idle_timeout,
            concurrency=concurrency,
        )
        await self._tg.start(runner.run)
        return runner

    async def spawn(self, kind: str, name: str, *, timeout: float = 10.0) -> AgentInfo:
        """Place and activate agent ``name`` of ``kind`` now (it would otherwise start on
        its first message)."""
        result = await self.call(
            "spawn", {"kind": kind, "name": name, "timeout": int(timeout)}, timeout=timeout + 1
        )
        return AgentInfo.from_wire(result)

    async def drain(self, node: str | None = None) -> dict[str, Any]:
        """Move every agent off ``node`` (the local daemon's host by default)."""
        result: dict[str, Any] = await self.call("drain", {"node": node} if node else {})
        return result

    def _agent_stopped(self, agent: Agent) -> None:
        if self._agents.get(agent.name) is agent:
            del self._agents[agent.name]


async def _drain(receive: Any, failure: list[MeshError]) -> AsyncIterator[Any]:
    async with receive:
        async for item in receive:
            yield item
    if failure:
        # The daemon ended the stream with an error (an invalid pattern, say): the
        # consumer gets it instead of an iteration that just stops.
        raise failure[0]


async def _mapped(items: AsyncIterator[Any], fn: Callable[[Any], Any]) -> AsyncIterator[Any]:
    async for item in items:
        yield fn(item)
