"""The handles an op receives: a :class:`Stream` to push events on, a :class:`Deferred` to
answer later. They talk to their session only through ``send_nowait`` and the deferred
hooks, so the domain can hold them (as :class:`~meshd.routing.ports.EventSink`) without
knowing the server."""

from __future__ import annotations

from typing import Any, Final, Protocol

import trio

from meshd_client.protocol import messages
from meshd_client.protocol.errors import MeshError


class SessionPort(Protocol):
    """What a handle needs of its session (:class:`~meshd.api.session.Session`)."""

    def send_nowait(self, frame: dict[str, Any]) -> None: ...

    def deferred_done(self, deferred: Deferred) -> None: ...


class Stream:
    """Handle given to a stream op: push events to the client without blocking.

    The client's request is answered (``ok``) only once the op has set itself up — when it
    first emits, or waits in :meth:`until_failed` — so that, say, a subscription exists by
    the time ``subscribe()`` returns. An op that fails before that answers with the error."""

    def __init__(self, session: SessionPort, request_id: int) -> None:
        self._session = session
        self.request_id = request_id
        self.opened = False
        self._failure: MeshError | None = None
        self._failed = trio.Event()

    def ready(self) -> None:
        """Answer the request: the stream is set up."""
        if not self.opened:
            self.opened = True
            self._session.send_nowait(messages.ok(self.request_id, None))

    def emit(self, payload: Any) -> None:
        """Queue one event; raises Overloaded if the client is not keeping up."""
        self.ready()
        self._session.send_nowait(messages.event(self.request_id, payload))

    def offer(self, payload: Any) -> None:
        """Like :meth:`emit`, for synchronous listeners: a failure ends the stream (see
        :meth:`until_failed`) instead of raising into the caller."""
        if self._failure is not None:
            return
        try:
            self.emit(payload)
        except MeshError as exc:
            self._failure = exc
            self._failed.set()

    async def until_failed(self) -> None:
        """Wait until an :meth:`offer` failed, then raise why (the client cancelling the
        stream cancels this wait instead)."""
        self.ready()
        await self._failed.wait()
        assert self._failure is not None
        raise self._failure


class Deferred:
    """The answer to a request, to be given later: what an op's ``begin`` returns when the
    answer is not known yet (a routed request waiting for its reply). The session answers
    the client when :meth:`resolve` or :meth:`fail` is called (by whatever learns the
    outcome, e.g. the router when the reply arrives), with no task waiting in between. It
    counts as a request in flight until then. A client's ``cancel``, or the session closing,
    drops it: a later outcome is ignored."""

    __slots__ = ("_op", "_outcome", "_request_id", "_session", "_started", "cancelled")

    def __init__(self) -> None:
        self._session: SessionPort | None = None
        self._request_id = 0
        self._op = ""  # for the session's latency histogram: the op, and when it arrived
        self._started = 0.0
        self._outcome: tuple[Any, MeshError | None] | None = None  # (value, error)
        self.cancelled = False

    @property
    def settled(self) -> bool:
        return self._outcome is not None or self.cancelled

    def resolve(self, value: Any) -> None:
        self._answer((value, None))

    def fail(self, error: MeshError) -> None:
        self._answer((None, error))

    def _answer(self, outcome: tuple[Any, MeshError | None]) -> None:
        if self.settled:
            return
        self._outcome = outcome
        if self._session is not None:
            self._session.deferred_done(self)

    def _attach(self, session: SessionPort, request_id: int) -> None:
        self._session = session
        self._request_id = request_id
        if self._outcome is not None:  # answered before it was attached
            session.deferred_done(self)


BEGIN_IN_TASK: Final = object()  # a ``begin`` that cannot answer without waiting returns this
