"""One client connection to the local API.

A session is a hello with version negotiation, then requests with client-chosen ids answered
in any order, notes (one-way requests), and streams (subscriptions) that push ``evt`` frames
until cancelled. Owns: the hello state machine, the read loop and its bounds (partial frames
within a deadline and the server's byte budget), dispatch to the op table, and the accounting
of requests, deferred answers and streams. Writing is the :class:`Outbox`'s job.

The socket is driven directly (non-blocking system calls, :func:`trio.lowlevel.wait_readable`
only when the kernel says to wait): trio's socket streams would add a scheduling round to
every receive; on the lookup path that was a large share of the daemon's time.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol

import trio

from meshd import __version__
from meshd.api.handles import BEGIN_IN_TASK, Deferred, Stream
from meshd.api.outbox import Outbox, close_socket
from meshd.api.peercred import PeerCredentials
from meshd.api.stats import ApiStats
from meshd.logs import RateLimitedLog, kv, message_fields
from meshd_client.protocol import errors, messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import HEADER, FrameDecoder, FrameError, encode_frame

MAX_IN_FLIGHT = 128  # plain requests awaiting their answer, per session
_HELLO_TIMEOUT = 10.0
_HELLO_MAX_FRAME = 4096  # the hello is a few dozen bytes; more is refused before buffered
_DRAIN_TIMEOUT = 5.0
_READ_SIZE = 256 * 1024
_READS_PER_YIELD = 16  # a client that always has more to read still lets others run
_WAKES_PER_YIELD = 32  # tasks the read loop starts or cancels before it lets them run


RequestHandler = Callable[["Session", messages.Request], Awaitable[Any]]
StreamHandler = Callable[["Session", messages.Request, Stream], Awaitable[None]]
# Starts a request without waiting: returns the value, a Deferred, or BEGIN_IN_TASK (then the
# op's handler serves the request in a task of its own, as for any other op).
BeginHandler = Callable[["Session", messages.Request], Any]


@dataclass(slots=True)
class OpEntry:
    handler: RequestHandler | None = None
    stream: StreamHandler | None = None
    begin: BeginHandler | None = None
    # Never waits: served in the session's read loop, without a task of its own.
    inline: bool = False
    # Ops that only read may be allowed to more callers later; kept for documentation.
    description: str = ""


class SessionHost(Protocol):
    """What a session shares with its server (:class:`~meshd.api.server.ApiServer`): the op
    table, the counters, the log, and the bounds and budgets kept across all sessions."""

    node_name: str
    log: logging.Logger
    ratelog: RateLimitedLog
    ops: dict[str, OpEntry]
    stats: ApiStats
    max_frame: int
    max_streams: int  # per session
    max_streams_total: int
    open_streams: int  # in every session
    partial_frame_timeout: float
    max_buffered: int
    buffered: int  # bytes reserved by partial frames, in every session


class Session:
    """One client connection."""

    def __init__(
        self,
        server: SessionHost,
        sock: socket.socket,
        creds: PeerCredentials,
        session_id: int,
    ) -> None:
        self.server = server
        self.sock = sock  # non-blocking
        self.creds = creds
        self.id = session_id
        self.client = ""
        self.version = 0
        self.state: dict[str, Any] = {}  # per-session data owned by op modules
        self.close_hooks: list[Callable[[Session], None]] = []
        self.outbox = Outbox(sock)  # what is on its way to the client
        self._requests: dict[int, trio.CancelScope] = {}
        self._deferred: dict[int, Deferred] = {}
        self._open_streams = 0
        self._woken = 0  # tasks started or cancelled since the read loop last yielded
        # A frame that has not arrived whole: when it must have, and the bytes it holds
        # against the server's budget (``SessionHost.buffered``).
        self._partial_deadline: float | None = None
        self._reserved = 0
        self._notes = 0  # notes (one-way requests) running in tasks
        self._closed = False

    # ------------------------------------------------------------------ writing

    def send_nowait(self, frame: dict[str, Any]) -> None:
        if self._closed or self.outbox.broken:
            raise errors.Closed("session closed")
        if self.outbox.backlogged():
            raise errors.Overloaded("client is not reading fast enough")
        self.outbox.push(encode_frame(frame, self.server.max_frame))

    def _encode_reply(self, frame: dict[str, Any]) -> bytes:
        """The frame's bytes; a reply too large to send becomes an ``invalid`` error."""
        try:
            return encode_frame(frame, self.server.max_frame)
        except FrameError as exc:
            return encode_frame(
                messages.failed(frame.get("id"), errors.Invalid(f"reply too large: {exc}")),
                self.server.max_frame,
            )

    async def send(self, frame: dict[str, Any]) -> None:
        """Send a frame; waits only while the client lets its queue fill up."""
        data = self._encode_reply(frame)
        out = self.outbox
        while out.backlogged() and not (self._closed or out.broken):
            out.flush()  # even while corked: what was gathered goes out first
            if out.backlogged():
                await out.wait_room()
        if not (self._closed or out.broken):
            out.push(data)

    def close_connection(self) -> None:
        """Close the socket now (the session then ends as if the client had left)."""
        if not self.outbox.broken:
            self.outbox.fail()
        close_socket(self.sock)

    # ------------------------------------------------------------------ the session

    async def run(self) -> None:
        decoder = FrameDecoder(_HELLO_MAX_FRAME)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.outbox.writer)
                async with trio.open_nursery() as work:
                    if await self._handshake(decoder):
                        await self._read_loop(decoder, work)
                    work.cancel_scope.cancel()  # client gone or fatal error: stop handlers
                # Let queued replies (an error frame, say) drain, but not forever.
                self.outbox.uncork()
                with trio.move_on_after(_DRAIN_TIMEOUT):
                    await self.outbox.drain()
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            self.outbox.release()
            self._reserve(0)
            for deferred in self._deferred.values():
                deferred.cancelled = True
            self._deferred.clear()
            for hook in self.close_hooks:
                try:
                    hook(self)
                except Exception:
                    self.server.log.exception("session close hook failed")

    async def _receive(self) -> bytes:
        """The next bytes from the client; b"" when it closed the connection."""
        while True:
            try:
                return self.sock.recv(_READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError:
                return b""

    async def _next_frame(self, decoder: FrameDecoder) -> dict[str, Any] | None:
        """The next frame; None when the client closed the connection."""
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self._receive()
            except trio.ClosedResourceError:
                return None
            if not data:
                return None
            decoder.feed(data)

    async def _handshake(self, decoder: FrameDecoder) -> bool:
        """Negotiate the protocol version; False if the session must end."""
        with trio.move_on_after(_HELLO_TIMEOUT):
            try:
                frame = await self._next_frame(decoder)
            except FrameError as exc:
                return await self._fatal(errors.Invalid(f"bad frame: {exc}"))
            if frame is None:
                return False
            try:
                hello = messages.parse_client_frame(frame)
            except MeshError as exc:
                return await self._fatal(exc)
            if not isinstance(hello, messages.Hello):
                return await self._fatal(errors.Invalid("the first frame must be a hello"))
            version = messages.negotiate(hello.versions)
            if version is None:
                return await self._fatal(
                    errors.Invalid(
                        "no common protocol version",
                        detail={"supported": list(messages.SUPPORTED_VERSIONS)},
                    )
                )
            self.version = version
            self.client = hello.client
            decoder.max_frame = self.server.max_frame
            await self.send(
                messages.hello_reply(version, self.server.node_name, f"meshd/{__version__}")
            )
            return True
        return await self._fatal(errors.Timeout("no hello received"))

    async def _fatal(self, error: MeshError) -> bool:
        """Queue a final error frame telling the client why the session ends (without
        waiting for room: a client that does not read must not hold the session open)."""
        self.server.stats.reject(f"session_{error.kind.value}")
        self.server.stats.error(error.kind.value)
        self._push_reply(messages.failed(None, error))
        await trio.lowlevel.checkpoint()
        return False

    def _reserve(self, size: int) -> bool:
        """Hold ``size`` bytes of the server's budget for this session's partial frame
        (0 releases it); False if that would exceed the budget."""
        server = self.server
        grow = size - self._reserved
        if grow > 0 and server.buffered + grow > server.max_buffered:
            return False
        server.buffered += grow
        self._reserved = size
        return True

    async def _receive_partial(self, decoder: FrameDecoder) -> bytes | None:
        """More bytes of a frame that has not arrived whole: within its deadline, and while
        the bytes it announced fit the server's budget. None if it ran out of either (the
        client is told why)."""
        if self._partial_deadline is None:
            self._partial_deadline = trio.current_time() + self.server.partial_frame_timeout
        head = decoder.head_size
        if not self._reserve(decoder.buffered if head is None else HEADER.size + head):
            self.server.ratelog.warning(
                "buffer_budget", "closing an API session: frames in transit exceed the budget"
            )
            self.server.stats.reject("buffer_budget")
            await self._fatal(
                errors.Overloaded(
                    "the daemon holds too many partial frames; retry",
                    detail={"max_buffered": self.server.max_buffered},
                )
            )
            return None
        with trio.move_on_at(self._partial_deadline):
            return await self._receive()
        self.server.ratelog.warning(
            "partial_frame", "closing an API session: a frame did not arrive whole in time"
        )
        self.server.stats.reject("partial_frame_timeout")
        await self._fatal(
            errors.Timeout(
                f"a frame did not arrive whole within {self.server.partial_frame_timeout:g} s"
            )
        )
        return None

    async def _read_loop(self, decoder: FrameDecoder, nursery: trio.Nursery) -> None:
        """Read frames and dispatch each, until the client leaves or a frame is bad."""
        reads = 0
        while True:
            try:
                frame = decoder.next_frame()
                if frame is None:
                    reads += 1
                    if not await self._read_more(
                        decoder, yield_first=reads % _READS_PER_YIELD == 0
                    ):
                        return
                    continue
            except FrameError as exc:
                self.outbox.corked = False
                self.server.ratelog.warning(
                    "bad_frame", "closing API session after a bad frame", error=str(exc)
                )
                await self._fatal(errors.Invalid(f"bad frame: {exc}"))
                return
            self._partial_deadline = None  # the next frame has its own time to arrive
            await self._dispatch(frame, nursery)

    async def _read_more(self, decoder: FrameDecoder, *, yield_first: bool) -> bool:
        """Everything read so far is answered: write the answers, then read on (within the
        partial-frame deadline if a frame is half here). False when the client is gone."""
        self.outbox.uncork()
        if yield_first:
            await trio.lowlevel.checkpoint()
        try:
            if decoder.buffered:
                data = await self._receive_partial(decoder)
                if data is None:
                    return False
            else:
                if self._reserved:
                    self._reserve(0)
                data = await self._receive()
        except trio.ClosedResourceError:
            return False
        if not data:
            return False
        decoder.feed(data)
        self.outbox.corked = True
        return True

    async def _dispatch(self, frame: dict[str, Any], nursery: trio.Nursery) -> None:
        try:
            parsed = messages.parse_client_frame(frame)
        except MeshError as exc:
            self.server.stats.reject("bad_message")
            await self.send(messages.failed(messages.usable_id(frame), exc))
            return
        if isinstance(parsed, messages.Cancel):
            scope = self._requests.get(parsed.id)
            if scope is not None:
                scope.cancel()
                await self._pace()
            deferred = self._deferred.pop(parsed.id, None)
            if deferred is not None:
                deferred.cancelled = True
        elif isinstance(parsed, messages.Hello):
            await self.send(messages.failed(None, errors.Invalid("hello sent twice")))
        elif isinstance(parsed, messages.Note):
            await self._serve_note(parsed, nursery)
        else:
            await self._request(parsed, nursery)

    async def _request(self, req: messages.Request, nursery: trio.Nursery) -> None:
        """Serve a request: inline, started (``begin``), or in a task of its own."""
        op = self.server.ops.get(req.op)
        in_flight = req.id in self._requests or req.id in self._deferred
        if op is not None and op.inline and not in_flight:
            await self._serve_inline(op, req)
            return
        if in_flight:
            await self.send(messages.failed(req.id, errors.Invalid("request id already in flight")))
            return
        is_stream = op is not None and op.stream is not None
        refusal = self._stream_refusal() if is_stream else self._request_refusal()
        if refusal is not None:
            self.server.stats.error("overloaded")
            await self.send(messages.failed(req.id, errors.Overloaded(refusal)))
            await self._pace()
            return
        if op is not None and op.begin is not None and self._begin(op.begin, req):
            return
        if is_stream:
            self._open_streams += 1
            self.server.open_streams += 1
        scope = trio.CancelScope()
        self._requests[req.id] = scope
        nursery.start_soon(self._serve, req, scope)
        await self._pace()

    def _request_refusal(self) -> str | None:
        """Why another plain request may not start now, or None."""
        plain = len(self._requests) - self._open_streams + len(self._deferred)
        return "too many requests in flight" if plain >= MAX_IN_FLIGHT else None

    async def _pace(self) -> None:
        """After every so many tasks started or cancelled, let them (and everyone else) run
        before reading on: a client pipelining thousands of stream opens or cancels would
        otherwise wake them all in one scheduling round, and stall every other session
        (and the daemon's failure detector) for as long as they take together."""
        self._woken += 1
        if self._woken >= _WAKES_PER_YIELD:
            self._woken = 0
            # Still corked: the answers those tasks give (``ok`` when a stream is set up,
            # ``end`` when one is cancelled) go out together when this loop writes next.
            await trio.lowlevel.checkpoint()

    def _stream_refusal(self) -> str | None:
        """Why another stream may not open now, or None."""
        server = self.server
        if self._open_streams >= server.max_streams:
            return f"too many streams open in this session (at most {server.max_streams})"
        if server.open_streams >= server.max_streams_total:
            return f"too many streams open on this daemon (at most {server.max_streams_total})"
        return None

    def _begin(self, begin: BeginHandler, req: messages.Request) -> bool:
        """Start ``req`` with its op's ``begin``; False if it needs a task after all."""
        started = perf_counter()
        try:
            result = begin(self, req)
        except Exception as exc:
            self.server.stats.requests += 1
            self.server.stats.answered(req.op, started)
            self._push_reply(messages.failed(req.id, self._op_error(req, exc)))
            return True
        if result is BEGIN_IN_TASK:
            return False
        self.server.stats.requests += 1
        if isinstance(result, Deferred):
            result._started = started
            result._op = req.op
            if not result.settled:
                self._deferred[req.id] = result
            result._attach(self, req.id)
        else:
            self.server.stats.answered(req.op, started)
            self._push_reply(messages.ok(req.id, result))
        return True

    def deferred_done(self, deferred: Deferred) -> None:
        """A deferred answer is known: send it (unless its request is gone)."""
        request_id = deferred._request_id
        if self._deferred.get(request_id) is deferred:
            del self._deferred[request_id]
        assert deferred._outcome is not None
        self.server.stats.answered(deferred._op, deferred._started)
        value, error = deferred._outcome
        if error is not None:
            self.server.stats.error(error.kind.value)
            self._push_reply(messages.failed(request_id, error))
        else:
            self._push_reply(messages.ok(request_id, value))

    def _push_reply(self, reply: dict[str, Any]) -> None:
        """Queue a reply without waiting (as :meth:`send`, but a full queue does not wait:
        the reply goes over the limit, by one; replies are bounded by the requests in
        flight)."""
        if self._closed or self.outbox.broken:
            return
        data = self._encode_reply(reply)
        if self.outbox.over_hard_limit(len(data)):
            # The client lets its replies pile up without reading them: it is gone or stuck.
            self.server.stats.reject("slow_reader")
            self.server.ratelog.warning(
                "slow_reader", "closing an API session that does not read its replies"
            )
            self.close_connection()
            return
        self.outbox.push(data)

    async def _serve_inline(self, op: OpEntry, req: messages.Request) -> None:
        self.server.stats.requests += 1
        assert op.handler is not None
        started = perf_counter()
        try:
            reply = messages.ok(req.id, await op.handler(self, req))
        except Exception as exc:
            reply = messages.failed(req.id, self._op_error(req, exc))
        self.server.stats.answered(req.op, started)
        await self.send(reply)

    async def _serve_note(self, note: messages.Note, nursery: trio.Nursery) -> None:
        op = self.server.ops.get(note.op)
        if op is None or op.handler is None:
            self.server.stats.reject("bad_note")
            return
        req = messages.Request(0, note.op, note.args)
        if op.inline:
            await self._run_note(op, req)
        elif self._notes < MAX_IN_FLIGHT:
            # A note has no answer to hold back, so the bound is on the tasks running them;
            # beyond it, notes are dropped (and counted), as a full queue drops a message.
            self._notes += 1
            nursery.start_soon(self._run_note, op, req)
        else:
            self.server.stats.reject("note_overloaded")
            self.server.stats.error("overloaded")

    async def _run_note(self, op: OpEntry, req: messages.Request) -> None:
        self.server.stats.requests += 1
        assert op.handler is not None
        try:
            await op.handler(self, req)
        except Exception as exc:
            error = self._op_error(req, exc)
            self.server.ratelog.debug(
                ("note", req.op),
                "note failed",
                op=req.op,
                kind=error.kind.value,
                error=error.message,
                **message_fields(req.args),
            )
        finally:
            if not op.inline:
                self._notes -= 1

    async def _serve(self, req: messages.Request, scope: trio.CancelScope) -> None:
        self.server.stats.requests += 1
        op = self.server.ops.get(req.op)
        stream: Stream | None = None
        try:
            with scope:
                if op is None:
                    raise errors.Invalid(f"unknown op {req.op!r}")
                if op.stream is not None:
                    stream = Stream(self, req.id)
                    try:
                        await op.stream(self, req, stream)
                    except Exception as exc:
                        error = self._op_error(req, exc)
                        # Once answered, a stream ends with ``end`` (never a second ``res``).
                        await self.send(
                            messages.end(req.id, error)
                            if stream.opened
                            else messages.failed(req.id, error)
                        )
                        return
                    stream.ready()
                    await self.send(messages.end(req.id))
                    return
                assert op.handler is not None
                started = perf_counter()
                try:
                    value = await op.handler(self, req)
                finally:
                    self.server.stats.answered(req.op, started)
                await self.send(messages.ok(req.id, value))
            if scope.cancelled_caught and stream is not None and stream.opened:
                await self.send(messages.end(req.id))
        except Exception as exc:
            await self.send(messages.failed(req.id, self._op_error(req, exc)))
        finally:
            self._requests.pop(req.id, None)
            if op is not None and op.stream is not None:
                self._open_streams -= 1
                self.server.open_streams -= 1

    def _op_error(self, req: messages.Request, exc: Exception) -> MeshError:
        """What to tell the client about an op's failure. A MeshError raised inside a
        nursery arrives wrapped in an exception group: it keeps its kind. Anything else is
        a bug: logged, and reported as ``internal``."""
        error: BaseException = exc
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if not isinstance(error, MeshError):
            self.server.log.exception(
                "API op failed", extra=kv(op=req.op, **message_fields(req.args))
            )
            error = errors.Internal(f"{req.op} failed")
        self.server.stats.error(error.kind.value)
        return error
