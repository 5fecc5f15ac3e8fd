"""The local API server on a Unix socket.

One :class:`Session` per connection: a hello with version negotiation, then requests with
client-chosen ids answered in any order, and streams (subscriptions) that push ``evt`` frames
until cancelled. Everything is bounded: frame size, requests in flight, queued outgoing
frames. A slow reader of a stream gets its stream ended with ``overloaded`` instead of making
the daemon buffer without bound. Peer credentials are checked on accept.

The socket is driven directly (non-blocking system calls, :func:`trio.lowlevel.wait_readable`
and ``wait_writable`` only when the kernel says to wait): a frame to a client is written the
moment it is ready, by whoever produced it, unless earlier frames are still waiting for room
in the socket (then it queues behind them, in order, and the session's writer task sends them
as room appears). The frames of one read are answered with one write. trio's socket streams
would add a scheduling round to every send and receive, and a queue hop through a writer task
to every stream event; on the lookup path those were a third of the daemon's time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Final

import trio

from meshd import __version__
from meshd.api.handles import BEGIN_IN_TASK, Deferred, Stream
from meshd.api.peercred import PeerCredentials, groups_of, peer_credentials
from meshd.logs import RateLimitedLog, kv
from meshd.metrics.histogram import Histogram
from meshd.rejections import Rejections
from meshd_client.protocol import errors, messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import (
    DEFAULT_MAX_FRAME,
    HEADER,
    FrameDecoder,
    FrameError,
    encode_frame,
)

_MAX_IN_FLIGHT = 128  # plain requests awaiting their answer, per session
_OUTGOING_FRAMES = 1024
# Bytes queued for a client that does not read: past the first, streams end ``overloaded``
# and replies wait; past the second (replies to requests already in flight), the session is
# closed — a client that never reads holds at most this much of the daemon's memory.
_OUTGOING_BYTES = 4 << 20
_OUTGOING_HARD = 16 << 20
_HELLO_TIMEOUT = 10.0
_HELLO_MAX_FRAME = 4096  # the hello is a few dozen bytes; more is refused before buffered
DEFAULT_MAX_SESSIONS: Final = 1024
DEFAULT_MAX_STREAMS: Final = 16384  # per session (a runner holds one per agent it serves)
DEFAULT_MAX_STREAMS_TOTAL: Final = 65536
DEFAULT_PARTIAL_FRAME_TIMEOUT: Final = 30.0
DEFAULT_MAX_BUFFERED: Final = 64 << 20
_DRAIN_TIMEOUT = 5.0
_READ_SIZE = 256 * 1024
_READS_PER_YIELD = 16  # a client that always has more to read still lets others run
_CORK_FRAMES = 256  # answers of one read gathered into one write, at most
_WAKES_PER_YIELD = 32  # tasks the read loop starts or cancels before it lets them run
# accept() errors that concern only the connection being accepted (as trio ignores them)
_ACCEPT_IGNORED = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
)  # fmt: skip


@dataclass(slots=True)
class ApiStats(Rejections):
    connections: int = 0
    active_sessions: int = 0
    requests: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    # Seconds from a request's arrival to its answer, by op (registered ops only; streams
    # are not timed: they last as long as their client wants).
    latency: dict[str, Histogram] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    def answered(self, op: str, started: float) -> None:
        """``started``: ``time.perf_counter()`` when the request arrived (cheaper than
        trio's clock, which this runs twice per request)."""
        histogram = self.latency.get(op)
        if histogram is None:
            histogram = self.latency[op] = Histogram()
        histogram.observe(perf_counter() - started)


RequestHandler = Callable[["Session", messages.Request], Awaitable[Any]]
StreamHandler = Callable[["Session", messages.Request, Stream], Awaitable[None]]
# Starts a request without waiting: returns the value, a Deferred, or BEGIN_IN_TASK (then the
# op's handler serves the request in a task of its own, as for any other op).
BeginHandler = Callable[["Session", messages.Request], Any]


@dataclass(slots=True)
class _Op:
    handler: RequestHandler | None = None
    stream: StreamHandler | None = None
    begin: BeginHandler | None = None
    # Never waits: served in the session's read loop, without a task of its own.
    inline: bool = False
    # Ops that only read may be allowed to more callers later; kept for documentation.
    description: str = ""


class Session:
    """One client connection."""

    def __init__(
        self,
        server: ApiServer,
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
        # Frames not yet handed to the socket, in order. Appending and writing happen in
        # the same call unless the socket is full (``_blocked``: the writer task owns the
        # rest) or the read loop is answering the frames of one read (``_corked``: it writes
        # them all at once when done).
        self._out: deque[bytes] = deque()
        self._out_bytes = 0  # bytes in ``_out``
        self._blocked = False
        self._corked = False
        self._broken = False  # the socket failed: nothing more can be written
        self._unblock = trio.Event()  # set for the writer when a write left bytes behind
        self._room = trio.Event()  # set when the queue drained (for send() and the drain)
        self._requests: dict[int, trio.CancelScope] = {}
        self._deferred: dict[int, Deferred] = {}
        self._open_streams = 0
        self._woken = 0  # tasks started or cancelled since the read loop last yielded
        # A frame that has not arrived whole: when it must have, and the bytes it holds
        # against the server's budget (``ApiServer.buffered``).
        self._partial_deadline: float | None = None
        self._reserved = 0
        self._notes = 0  # notes (one-way requests) running in tasks
        self._closed = False

    # ------------------------------------------------------------------ writing

    def send_nowait(self, frame: dict[str, Any]) -> None:
        if self._closed or self._broken:
            raise errors.Closed("session closed")
        if self._backlogged():
            raise errors.Overloaded("client is not reading fast enough")
        self._push(encode_frame(frame, self.server.max_frame))

    def _backlogged(self) -> bool:
        return len(self._out) >= _OUTGOING_FRAMES or self._out_bytes >= _OUTGOING_BYTES

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
        while self._backlogged() and not (self._closed or self._broken):
            self._flush()  # even while corked: what was gathered goes out first
            if self._backlogged():
                await self._room.wait()
        if not (self._closed or self._broken):
            self._push(data)

    def _push(self, data: bytes) -> None:
        out = self._out
        out.append(data)
        self._out_bytes += len(data)
        if not self._blocked and (not self._corked or len(out) >= _CORK_FRAMES):
            self._flush()

    def _flush(self) -> None:
        """Write what is queued, as far as the socket takes it now."""
        out = self._out
        if not out or self._blocked or self._broken:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._break()  # the client went away; the reader sees it too
            return
        out.clear()
        self._out_bytes = len(data) - sent
        if sent < len(data):
            out.append(data[sent:])
            self._blocked = True
            self._unblock.set()
            return
        self._room.set()
        self._room = trio.Event()

    def _break(self) -> None:
        self._broken = True
        self._out.clear()
        self._out_bytes = 0
        self._room.set()

    async def _writer(self) -> None:
        """Sends what a full socket left behind, as room appears."""
        try:
            while True:
                await self._unblock.wait()
                self._unblock = trio.Event()
                while self._blocked and not self._broken:
                    await trio.lowlevel.wait_writable(self.sock)
                    self._blocked = False
                    self._flush()
        except (trio.ClosedResourceError, OSError):
            self._break()

    async def _drain(self) -> None:
        """Until every queued frame went to the socket (or the socket failed)."""
        while self._out and not self._broken:
            await self._room.wait()

    def close_connection(self) -> None:
        """Close the socket now (the session then ends as if the client had left)."""
        if not self._broken:
            self._break()
        _close(self.sock)

    # ------------------------------------------------------------------ the session

    async def run(self) -> None:
        decoder = FrameDecoder(_HELLO_MAX_FRAME)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                async with trio.open_nursery() as work:
                    if await self._handshake(decoder):
                        await self._read_loop(decoder, work)
                    work.cancel_scope.cancel()  # client gone or fatal error: stop handlers
                # Let queued replies (an error frame, say) drain, but not forever.
                self._corked = False
                self._flush()
                with trio.move_on_after(_DRAIN_TIMEOUT):
                    await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            self._room.set()
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
                self._corked = False
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
        self._corked = False
        self._flush()
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
        self._corked = True
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
        return "too many requests in flight" if plain >= _MAX_IN_FLIGHT else None

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

    def _deferred_done(self, deferred: Deferred) -> None:
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
        if self._closed or self._broken:
            return
        data = self._encode_reply(reply)
        if self._out_bytes + len(data) > _OUTGOING_HARD:
            # The client lets its replies pile up without reading them: it is gone or stuck.
            self.server.stats.reject("slow_reader")
            self.server.ratelog.warning(
                "slow_reader", "closing an API session that does not read its replies"
            )
            self.close_connection()
            return
        self._push(data)

    async def _serve_inline(self, op: _Op, req: messages.Request) -> None:
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
        elif self._notes < _MAX_IN_FLIGHT:
            # A note has no answer to hold back, so the bound is on the tasks running them;
            # beyond it, notes are dropped (and counted), as a full queue drops a message.
            self._notes += 1
            nursery.start_soon(self._run_note, op, req)
        else:
            self.server.stats.reject("note_overloaded")
            self.server.stats.error("overloaded")

    async def _run_note(self, op: _Op, req: messages.Request) -> None:
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
            self.server.log.exception("API op failed", extra=kv(op=req.op))
            error = errors.Internal(f"{req.op} failed")
        self.server.stats.error(error.kind.value)
        return error


def _close(sock: socket.socket) -> None:
    """Close a socket trio may be waiting on (its waiters get ClosedResourceError)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()


_REFUSAL_LINGER: Final = 1.0
_REFUSAL_DRAIN: Final = 64 * 1024


async def _linger_until_peer_closes(sock: socket.socket) -> None:
    """Keep a refused connection open until the client has read the reason and closed.

    Closing at once would lose the reason: a Unix socket closed with unread input (the
    client's hello) resets its peer, and a client whose hello meets a closed socket may
    tear its connection down before reading. So stop writing, read and discard what the
    client sends (bounded in bytes and time), and close on its end of stream."""
    sock.shutdown(socket.SHUT_WR)
    drained = 0
    with trio.move_on_after(_REFUSAL_LINGER):
        while drained < _REFUSAL_DRAIN:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not data:
                return
            drained += len(data)


class ApiServer:
    """The local Unix-socket API: sessions, the op table, peer-credential checks, bounds.

    Owns: the listening socket (and removes only its own at exit), every client session and
    its streams, the op table the node's ``*_ops`` modules fill. Knows nothing of the
    domain: ops are handlers given to it; what they return or raise is what it answers."""

    def __init__(
        self,
        path: str,
        node_name: str,
        log: logging.Logger,
        *,
        mode: int = 0o660,
        allow_uids: tuple[int, ...] = (),
        allow_gids: tuple[int, ...] = (),
        max_frame: int = DEFAULT_MAX_FRAME,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_streams_total: int = DEFAULT_MAX_STREAMS_TOTAL,
        partial_frame_timeout: float = DEFAULT_PARTIAL_FRAME_TIMEOUT,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        self.path = path
        self._inode = -1  # of the socket this server bound (removed at shutdown)
        self.node_name = node_name
        self.log = log
        self.ratelog = RateLimitedLog(log)
        self.mode = mode
        self.allow_uids = frozenset((0, os.getuid(), *allow_uids))
        self.allow_gids = frozenset(allow_gids)
        self.max_frame = max_frame
        self.max_sessions = max_sessions
        self.max_streams = max_streams  # per session
        self.max_streams_total = max_streams_total
        self.partial_frame_timeout = partial_frame_timeout
        self.max_buffered = max_buffered
        self.open_streams = 0  # in every session
        self.buffered = 0  # bytes reserved by partial frames, in every session
        self.ops: dict[str, _Op] = {}
        self.stats = ApiStats()
        self.sessions: dict[int, Session] = {}
        self._next_session = 0

    def add_op(
        self,
        name: str,
        handler: RequestHandler,
        description: str = "",
        *,
        inline: bool = False,
        begin: BeginHandler | None = None,
    ) -> None:
        """``inline``: the handler never awaits anything that blocks (a lookup, a read):
        it runs in the read loop, sparing a task and a cancel scope per request.

        ``begin``: a synchronous start of the op, run in the read loop, that answers at
        once or returns a :class:`Deferred` answered later by whoever learns the outcome
        (sparing the task and its wake-up), or BEGIN_IN_TASK to have ``handler`` serve the
        request in a task after all. It counts against the requests in flight like a task."""
        self.ops[name] = _Op(handler=handler, description=description, inline=inline, begin=begin)

    def add_stream_op(self, name: str, handler: StreamHandler, description: str = "") -> None:
        self.ops[name] = _Op(stream=handler, description=description)

    def describe(self) -> list[dict[str, Any]]:
        """Every op: its name, whether it is a stream, and what it does."""
        return [
            {"name": name, "stream": op.stream is not None, "description": op.description}
            for name, op in sorted(self.ops.items())
        ]

    def allowed(self, creds: PeerCredentials) -> bool:
        if creds.uid in self.allow_uids:
            return True
        return bool(self.allow_gids and groups_of(creds.uid, creds.gid) & self.allow_gids)

    async def _bind(self) -> socket.socket:
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot create the API socket's directory {path.parent}: {exc.strerror}"
            ) from None
        try:
            existing = os.lstat(path)
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot use {path} as the API socket: {exc.strerror}"
            ) from None
        if existing is not None:
            if not stat.S_ISSOCK(existing.st_mode):
                # Never remove what is not ours: only a stale socket may be replaced.
                raise OSError(
                    errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it"
                )
            probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await probe.connect(self.path)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise OSError(exc.errno, f"cannot use {path}: {exc.strerror}") from None
                path.unlink(missing_ok=True)  # a stale socket from a daemon that died
            else:
                raise OSError(errno.EADDRINUSE, f"another daemon is serving {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            os.chmod(self.path, self.mode)
            sock.setblocking(False)
            sock.listen(128)
            self._inode = os.lstat(self.path).st_ino
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot serve the API on {path}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _remove_socket(self) -> None:
        """At shutdown: remove our socket, and only ours (not one a successor made)."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
            Path(self.path).unlink(missing_ok=True)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    except OSError as exc:
                        if exc.errno in _ACCEPT_IGNORED:
                            continue
                        # EMFILE and friends: back off, keep serving
                        self.ratelog.error("accept", "API accept failed", error=str(exc))
                        await trio.sleep(0.1)
                        continue
                    conn.setblocking(False)
                    nursery.start_soon(self._session, conn)
                    await trio.lowlevel.checkpoint()
        finally:
            _close(sock)
            self._remove_socket()

    async def _session(self, sock: socket.socket) -> None:
        self.stats.connections += 1
        try:
            try:
                creds = peer_credentials(sock)
            except OSError:
                return
            if not self.allowed(creds):
                self.stats.reject("unauthorized")
                self.ratelog.warning(
                    ("unauthorized", creds.uid),
                    "refused API connection",
                    uid=creds.uid,
                    gid=creds.gid,
                    pid=creds.pid,
                )
                error = errors.Unauthorized(f"uid {creds.uid} may not use this daemon")
                with contextlib.suppress(OSError):
                    sock.send(encode_frame(messages.failed(None, error)))  # a fresh socket: room
                    await _linger_until_peer_closes(sock)
                return
            if len(self.sessions) >= self.max_sessions:
                self.stats.reject("session_limit")
                self.stats.error("overloaded")
                self.ratelog.warning(
                    "session_limit", "refused API connection: too many sessions", pid=creds.pid
                )
                busy = errors.Overloaded(
                    f"too many sessions (at most {self.max_sessions}); retry later",
                    detail={"max_sessions": self.max_sessions},
                )
                with contextlib.suppress(OSError):
                    sock.send(encode_frame(messages.failed(None, busy)))
                    await _linger_until_peer_closes(sock)
                return
            self._next_session += 1
            session = Session(self, sock, creds, self._next_session)
            self.sessions[session.id] = session
            self.stats.active_sessions += 1
            try:
                await session.run()
            finally:
                self.stats.active_sessions -= 1
                del self.sessions[session.id]
        finally:
            _close(sock)
