"""The agent runtime: register a name, receive messages, run the handler turn by turn.

An agent's handler is either an async function ``handler(ctx, msg)`` or an object with an
``async def handle(self, ctx, msg)`` method (and optionally ``on_start(ctx)`` and
``on_stop(ctx, reason)``). Its return value is the reply to a request. Messages are handled
one at a time in arrival order unless ``concurrency`` allows more.

At-least-once messages are de-duplicated here too, by message id: if the daemon restarts and
the sender retries, this process remembers the outcome and answers without running the
handler again — unless the handler failed with an error that asks for a retry (its daemon
went away under it, a majority timed out): then the retry runs it again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus

from meshd_client import tracing
from meshd_client.protocol import errors
from meshd_client.protocol.errors import MeshError
from meshd_client.state import StateDoc
from meshd_client.types import AgentInfo, Message

if TYPE_CHECKING:
    from meshd_client.mesh import Mesh

log = logging.getLogger("meshd_client.agents")
_QUEUE = 1024
_REMEMBER = 10_000


class AgentContext:
    """What a handler gets besides the message: its name, its state, and the mesh."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.name = agent.name
        self.mesh = agent.mesh
        self.state: StateDoc = agent.mesh.state(f"agent:{agent.name}")

    async def send(self, to: str, body: Any = None, **kwargs: Any) -> None:
        await self.mesh.send(to, body, sender=self.name, **kwargs)

    async def request(self, to: str, body: Any = None, **kwargs: Any) -> Any:
        return await self.mesh.request(to, body, sender=self.name, **kwargs)

    async def publish(self, topic: str, data: Any = None, **kwargs: Any) -> int:
        kwargs.setdefault("source", f"meshd-agent://{self.name}")
        return await self.mesh.publish(topic, data, **kwargs)

    def stop(self) -> None:
        self._agent.stop()

    # timers live with this activation; reminders are stored in the agent's state

    def after(self, delay: float, body: Any = None) -> Callable[[], None]:
        """Send this agent ``body`` after ``delay`` seconds, unless cancelled (call the
        returned function) or the agent stops first."""
        return self._agent.start_timer(delay, body)

    async def remind(
        self,
        name: str,
        body: Any = None,
        *,
        after: float | None = None,
        at: float | None = None,
        every: float | None = None,
    ) -> None:
        """A durable reminder: this agent gets a message from ``meshd:reminders`` with body
        ``{"reminder": name, "data": body, "id": ..., "due_ms": ...}`` after ``after``
        seconds (or at Unix time ``at``), then every ``every`` seconds if given — on whichever
        host runs it then. At least once: a repeat (the handler failed, or its host died)
        carries the same ``id``."""
        args: dict[str, Any] = {"agent": self.name, "name": name, "data": body}
        if at is not None:
            args["at_ms"] = int(at * 1000)
        else:
            args["after_ms"] = int((after or 0.0) * 1000)
        if every is not None:
            args["every_ms"] = int(every * 1000)
        await self.mesh.call("agent.remind", args)

    async def forget(self, name: str) -> None:
        """Cancel a reminder."""
        await self.mesh.call("agent.forget", {"agent": self.name, "name": name})

    async def reminders(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.mesh.call("agent.reminders", {"agent": self.name})
        return result


HandlerFunction = Callable[[AgentContext, Message], Awaitable[Any]]


class HandlerObject(Protocol):
    async def handle(self, ctx: AgentContext, msg: Message) -> Any: ...


Handler = HandlerFunction | HandlerObject


@contextmanager
def _unwrapped() -> Iterator[None]:
    """A registration failure (Conflict, Invalid, ...) leaves the worker task group wrapped
    in an exception group: raise it as itself, so that ``serve()`` raises what it says."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise


class Agent:
    """A running agent (see :meth:`Mesh.serve`)."""

    def __init__(
        self,
        mesh: Mesh,
        name: str,
        handler: Handler,
        *,
        kind: str,
        capabilities: tuple[str, ...],
        metadata: dict[str, Any],
        concurrency: int,
    ) -> None:
        if concurrency < 1:
            raise errors.Invalid("concurrency must be at least 1")
        self.mesh = mesh
        self.name = name
        self.kind = kind
        self.capabilities = capabilities
        self.metadata = metadata
        self.concurrency = concurrency
        self._handler = handler
        self._handle: HandlerFunction = handler.handle if hasattr(handler, "handle") else handler
        self.info: AgentInfo | None = None
        self.ctx = AgentContext(self)
        self.stopped = anyio.Event()
        self.stop_reason: str | None = None
        self.conflict_winner: AgentInfo | None = None
        self.error: MeshError | None = None
        self.handled = 0
        self.registrations = 0
        self._scope = anyio.CancelScope()
        self._send, self._receive = anyio.create_memory_object_stream[Message](_QUEUE)
        self._done: OrderedDict[str, tuple[bool, Any]] = OrderedDict()
        self._running: set[str] = set()
        self._leaving: str | None = None  # set when asked to deactivate (drain, idle, ...)
        self._leave = anyio.Event()
        self._serving: anyio.CancelScope | None = None  # around the current serve stream
        self._timers: TaskGroup | None = None
        self.last_activity = 0.0

    def stop(self) -> None:
        if self.stop_reason is None:
            self.stop_reason = "stopped"
        self._scope.cancel()

    def is_leaving(self) -> bool:
        """Asked to deactivate (drain, rebalance, idle, minority)?"""
        return self._leaving is not None

    def deactivate(self, reason: str) -> None:
        """Stop gracefully: finish the message in hand, hand back the rest (their senders
        get ``unreachable`` and at-least-once senders retry at the agent's next home)."""
        if self._leaving is None:
            self._leaving = reason
            self.stop_reason = reason
            self._send.close()
            self._leave.set()

    def start_timer(self, delay: float, body: Any) -> Callable[[], None]:
        scope = anyio.CancelScope()

        async def fire() -> None:
            with scope:
                await anyio.sleep(delay)
                try:
                    await self.mesh.send(self.name, body, sender=self.name)
                except MeshError as exc:
                    log.warning("agent %s: timer message failed: %s", self.name, exc)

        if self._timers is None:
            raise errors.Closed(f"{self.name!r} is not running")
        self._timers.start_soon(fire)
        return scope.cancel

    async def wait(self) -> None:
        """Until the agent stops (stopped, lost a name conflict, or failed)."""
        await self.stopped.wait()

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            with self._scope, _unwrapped():
                async with anyio.create_task_group() as workers:
                    self._timers = workers
                    self.last_activity = anyio.current_time()
                    for _ in range(self.concurrency):
                        workers.start_soon(self._worker)
                    workers.start_soon(self._leave_when_asked)
                    while not self.is_leaving():
                        with anyio.CancelScope() as self._serving:
                            conn = await self.mesh.wait_connected()
                            try:
                                async with conn.stream(
                                    "agent.serve", self._serve_args(), tap=self._tap
                                ) as items:
                                    async for item in items:
                                        if self._on_item(item) and not started:
                                            started = True
                                            await self._on_start()
                                            task_status.started()
                                        if self.is_leaving():
                                            await self._finish_in_hand()
                                            break
                            except (errors.Closed, errors.Unreachable):
                                continue  # the daemon went away: re-register after reconnecting
                            except errors.Conflict as exc:
                                if not started:
                                    raise
                                self.stop_reason = "name_conflict"
                                self.error = exc
                                break
                            except MeshError as exc:
                                if not started:
                                    raise
                                self.stop_reason = "error"
                                self.error = exc
                                break
                    workers.cancel_scope.cancel()
        finally:
            self.stopped.set()
            self.mesh._agent_stopped(self)
            if started:
                with anyio.CancelScope(shield=True):
                    await self._on_stop()

    def _serve_args(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "capabilities": list(self.capabilities),
            "metadata": self.metadata,
        }

    def _tap(self, item: Any) -> bool:
        """Messages go to the workers straight from the connection's reader, sparing a
        wake-up of the serve loop per message; the connection taps only while nothing is
        buffered, so they stay in order with the other events, which go through the loop."""
        if isinstance(item, dict) and item.get("type") in ("message", "request"):
            self._on_item(item)
            return True
        return False

    def _on_item(self, item: dict[str, Any]) -> bool:
        """Handle one event of the serve stream; True when it confirms the registration."""
        kind = item.get("type")
        if kind == "registered":
            self.info = AgentInfo.from_wire(item.get("entry", {}))
            self.registrations += 1
            return True
        if kind == "deactivate":
            self.deactivate(str(item.get("reason", "deactivated")))
            return False
        if kind == "name_conflict":
            winner = item.get("winner")
            self.conflict_winner = AgentInfo.from_wire(winner) if isinstance(winner, dict) else None
            return False
        if kind in ("message", "request"):
            msg = Message(
                id=str(item.get("id", "")),
                body=item.get("body"),
                sender=str(item.get("from", "")),
                is_request=kind == "request",
                at_least_once=bool(item.get("at_least_once")),
                traceparent=item.get("traceparent"),
                tracestate=item.get("tracestate"),
            )
            self.last_activity = anyio.current_time()
            try:
                self._send.send_nowait(msg)
            except anyio.WouldBlock:
                # Queue full: this delivery is dropped; the daemon times it out for the sender.
                log.warning(
                    "agent %s: queue full, dropped message %s (trace %s)",
                    self.name,
                    msg.id,
                    _trace_id(msg),
                )
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # deactivating: the daemon fails it for the sender when the stream ends
        return False

    async def _worker(self) -> None:
        async for msg in self._receive:
            if self._leaving is not None:
                continue  # handed back: the daemon fails it when the stream ends
            await self._run_one(msg)
            self.last_activity = anyio.current_time()

    async def _leave_when_asked(self) -> None:
        """A deactivation asked for here (idle, or by the application), not by a
        ``deactivate`` event from the daemon, must not wait for a next stream event that
        an idle agent never gets: once the messages in hand are done, end the stream."""
        await self._leave.wait()
        await self._finish_in_hand()
        if self._serving is not None:
            self._serving.cancel()

    async def _finish_in_hand(self) -> None:
        """Deactivating: wait (bounded) for the messages being handled to complete."""
        with anyio.move_on_after(30):
            while self._running:
                await anyio.sleep(0.01)

    async def _run_one(self, msg: Message) -> None:
        wants_answer = msg.is_request or msg.at_least_once
        remembered = self._done.get(msg.id) if msg.at_least_once else None
        if remembered is not None:
            await self._answer(msg, *remembered)
            return
        if msg.at_least_once and msg.id in self._running:
            return  # the first delivery is still running; it will answer
        self._running.add(msg.id)
        remember = msg.at_least_once
        try:
            with tracing.handling(self.name, msg) as span:
                try:
                    result = await self._handle(self.ctx, msg)
                    outcome: tuple[bool, Any] = (True, result)
                except MeshError as exc:
                    outcome = (False, exc.to_wire())
                    # "Not now" (its daemon went away mid-handler, a majority timed out) is
                    # no outcome: the sender retries on it, and must find the handler run
                    # again rather than be told the same until it gives up.
                    remember = remember and not isinstance(exc, errors.RETRYABLE)
                except Exception as exc:
                    log.exception(
                        "agent %s: handler failed on message %s (trace %s)",
                        self.name,
                        msg.id,
                        _trace_id(msg),
                    )
                    outcome = (False, errors.Internal(f"{type(exc).__name__}: {exc}").to_wire())
                if span is not None:
                    span.set_attribute(
                        "meshd.outcome", "ok" if outcome[0] else str(outcome[1].get("kind"))
                    )
            self.handled += 1
            if remember:
                self._done[msg.id] = outcome
                while len(self._done) > _REMEMBER:
                    self._done.popitem(last=False)
        finally:
            self._running.discard(msg.id)
        if wants_answer:
            await self._answer(msg, *outcome)

    async def _answer(self, msg: Message, ok: bool, payload: Any) -> None:
        args: dict[str, Any] = {"agent": self.name, "id": msg.id, "ok": ok}
        args["body" if ok else "error"] = payload
        if msg.traceparent is not None:
            args["traceparent"] = msg.traceparent  # for the daemon's log lines about it
        try:
            # One-way: the answer to this would be ignored anyway, so do not wait for it.
            await self.mesh.notify("agent.reply", args)
        except MeshError:
            # The daemon restarted (it no longer waits for this id) or the connection is
            # gone; an at-least-once sender retries and gets the remembered outcome.
            pass

    async def _on_start(self) -> None:
        hook = getattr(self._handler, "on_start", None)
        if hook is not None:
            await hook(self.ctx)

    async def _on_stop(self) -> None:
        hook = getattr(self._handler, "on_stop", None)
        if hook is not None:
            try:
                await hook(self.ctx, self.stop_reason or "stopped")
            except Exception:
                log.exception("agent %s: on_stop failed", self.name)


def _trace_id(msg: Message) -> str:
    """The trace id a message carried, for log lines ("-" if none)."""
    tp = msg.traceparent
    return tp[3:35] if tp is not None and len(tp) >= 55 else "-"
