"""The local API server on a Unix socket.

One :class:`Session` per connection: a hello with version negotiation, then requests with
client-chosen ids answered in any order, and streams (subscriptions) that push ``evt`` frames
until cancelled. Everything is bounded: frame size, requests in flight, queued outgoing
frames. A slow reader of a stream gets its stream ended with ``overloaded`` instead of making
the daemon buffer without bound. Peer credentials are checked on accept.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from meshd import __version__
from meshd.logs import RateLimitedLog, kv
from meshd_client.protocol import errors, messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode_frame

_MAX_IN_FLIGHT = 128  # plain requests awaiting their answer, per session
_MAX_STREAMS = 65_536  # open streams per session (a runner holds one per agent it serves)
_OUTGOING_FRAMES = 1024
_HELLO_TIMEOUT = 10.0
_DRAIN_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


@dataclass(slots=True)
class ApiStats:
    connections: int = 0
    active_sessions: int = 0
    requests: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def error(self, kind: str) -> None:
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1


class Stream:
    """Handle given to a stream op: push events to the client without blocking.

    The client's request is answered (``ok``) only once the op has set itself up — when it
    first emits, or waits in :meth:`until_failed` — so that, say, a subscription exists by
    the time ``subscribe()`` returns. An op that fails before that answers with the error."""

    def __init__(self, session: Session, request_id: int) -> None:
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


RequestHandler = Callable[["Session", messages.Request], Awaitable[Any]]
StreamHandler = Callable[["Session", messages.Request, Stream], Awaitable[None]]


@dataclass(slots=True)
class _Op:
    handler: RequestHandler | None = None
    stream: StreamHandler | None = None
    # Never waits: served in the session's read loop, without a task of its own.
    inline: bool = False
    # Ops that only read may be allowed to more callers later; kept for documentation.
    description: str = ""


class Session:
    """One client connection."""

    def __init__(
        self,
        server: ApiServer,
        stream: trio.SocketStream,
        creds: PeerCredentials,
        session_id: int,
    ) -> None:
        self.server = server
        self.stream = stream
        self.creds = creds
        self.id = session_id
        self.client = ""
        self.version = 0
        self.state: dict[str, Any] = {}  # per-session data owned by op modules
        self.close_hooks: list[Callable[[Session], None]] = []
        self._send, self._outgoing = trio.open_memory_channel[bytes](_OUTGOING_FRAMES)
        # Held while bytes go to the socket (by the writer task, or by send() writing
        # directly when nothing is queued). ``_queued`` counts frames handed to the queue and
        # not yet written: trio can pass a frame straight to a waiting writer, leaving the
        # buffer empty before the writer runs, so the buffer alone cannot tell whether a
        # direct write would overtake a queued frame (a stream's end overtaking its event).
        self._socket_lock = trio.Lock()
        self._queued = 0
        self._requests: dict[int, trio.CancelScope] = {}
        self._open_streams = 0
        self._closed = False

    def send_nowait(self, frame: dict[str, Any]) -> None:
        try:
            self._send.send_nowait(encode_frame(frame, self.server.max_frame))
            self._queued += 1
        except trio.WouldBlock:
            raise errors.Overloaded("client is not reading fast enough") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise errors.Closed("session closed") from None

    async def send(self, frame: dict[str, Any]) -> None:
        try:
            data = encode_frame(frame, self.server.max_frame)
        except FrameError as exc:
            data = encode_frame(
                messages.failed(frame.get("id"), errors.Invalid(f"reply too large: {exc}")),
                self.server.max_frame,
            )
        if self._queued == 0 and not self._socket_lock.locked() and not self._closed:
            # Nothing queued or being written: write it now, sparing the writer's wake-up.
            async with self._socket_lock:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the client went away; the reader sees it too
            return
        try:
            self._send.send_nowait(data)
            self._queued += 1
        except trio.WouldBlock:
            self._queued += 1  # counted while waiting, so no direct write overtakes it
            sent = False
            try:
                await self._send.send(data)
                sent = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                if not sent:
                    self._queued -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _writer(self) -> None:
        """Send queued frames, everything already queued in one write."""
        try:
            async for data in self._outgoing:
                batch = [data]
                while len(batch) < 256:
                    try:
                        batch.append(self._outgoing.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                async with self._socket_lock:
                    await self.stream.send_all(b"".join(batch) if len(batch) > 1 else data)
                self._queued -= len(batch)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; the reader sees it too

    async def run(self) -> None:
        decoder = FrameDecoder(self.server.max_frame)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                async with trio.open_nursery() as work:
                    if await self._handshake(decoder):
                        await self._read_loop(decoder, work)
                    work.cancel_scope.cancel()  # client gone or fatal error: stop handlers
                # Let queued replies (an error frame, say) drain, but not forever.
                self._send.close()
                nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_TIMEOUT
        finally:
            self._closed = True
            for hook in self.close_hooks:
                try:
                    hook(self)
                except Exception:
                    self.server.log.exception("session close hook failed")

    async def _next_frame(self, decoder: FrameDecoder) -> dict[str, Any] | None:
        """The next frame; None when the client closed the connection."""
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
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
            await self.send(
                messages.hello_reply(version, self.server.node_name, f"meshd/{__version__}")
            )
            return True
        return await self._fatal(errors.Timeout("no hello received"))

    async def _fatal(self, error: MeshError) -> bool:
        """Queue a final error frame telling the client why the session ends."""
        self.server.stats.reject(f"session_{error.kind.value}")
        self.server.stats.error(error.kind.value)
        await self.send(messages.failed(None, error))
        return False

    async def _read_loop(self, decoder: FrameDecoder, nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await self._next_frame(decoder)
            except FrameError as exc:
                self.server.ratelog.warning(
                    "bad_frame", "closing API session after a bad frame", error=str(exc)
                )
                await self._fatal(errors.Invalid(f"bad frame: {exc}"))
                return
            if frame is None:
                return
            try:
                parsed = messages.parse_client_frame(frame)
            except MeshError as exc:
                self.server.stats.reject("bad_message")
                rid = frame.get("id")
                await self.send(messages.failed(rid if type(rid) is int else None, exc))
                continue
            if isinstance(parsed, messages.Cancel):
                scope = self._requests.get(parsed.id)
                if scope is not None:
                    scope.cancel()
                continue
            if isinstance(parsed, messages.Hello):
                await self.send(messages.failed(None, errors.Invalid("hello sent twice")))
                continue
            if isinstance(parsed, messages.Note):
                await self._serve_note(parsed, nursery)
                continue
            op = self.server.ops.get(parsed.op)
            if op is not None and op.inline and parsed.id not in self._requests:
                await self._serve_inline(op, parsed)
                continue
            if parsed.id in self._requests:
                await self.send(
                    messages.failed(parsed.id, errors.Invalid("request id already in flight"))
                )
                continue
            is_stream = op is not None and op.stream is not None
            if (
                (self._open_streams >= _MAX_STREAMS)
                if is_stream
                else (len(self._requests) - self._open_streams >= _MAX_IN_FLIGHT)
            ):
                self.server.stats.error("overloaded")
                what = "streams open" if is_stream else "requests in flight"
                await self.send(messages.failed(parsed.id, errors.Overloaded(f"too many {what}")))
                continue
            if is_stream:
                self._open_streams += 1
            scope = trio.CancelScope()
            self._requests[parsed.id] = scope
            nursery.start_soon(self._serve, parsed, scope)

    async def _serve_inline(self, op: _Op, req: messages.Request) -> None:
        self.server.stats.requests += 1
        assert op.handler is not None
        try:
            reply = messages.ok(req.id, await op.handler(self, req))
        except Exception as exc:
            reply = messages.failed(req.id, self._op_error(req, exc))
        await self.send(reply)

    async def _serve_note(self, note: messages.Note, nursery: trio.Nursery) -> None:
        op = self.server.ops.get(note.op)
        if op is None or op.handler is None:
            self.server.stats.reject("bad_note")
            return
        req = messages.Request(0, note.op, note.args)
        if op.inline:
            await self._run_note(op, req)
        elif len(self._requests) < _MAX_IN_FLIGHT:
            nursery.start_soon(self._run_note, op, req)
        else:
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
                value = await op.handler(self, req)
                await self.send(messages.ok(req.id, value))
            if scope.cancelled_caught and stream is not None and stream.opened:
                await self.send(messages.end(req.id))
        except Exception as exc:
            await self.send(messages.failed(req.id, self._op_error(req, exc)))
        finally:
            self._requests.pop(req.id, None)
            if op is not None and op.stream is not None:
                self._open_streams -= 1

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


def _peer_credentials(sock: trio.socket.SocketType) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def _groups_of(uid: int, gid: int) -> set[int]:
    try:
        name = pwd.getpwuid(uid).pw_name
        return set(os.getgrouplist(name, gid))
    except (KeyError, OSError):
        return {gid}


class ApiServer:
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
    ) -> None:
        self.path = path
        self.node_name = node_name
        self.log = log
        self.ratelog = RateLimitedLog(log)
        self.mode = mode
        self.allow_uids = frozenset((0, os.getuid(), *allow_uids))
        self.allow_gids = frozenset(allow_gids)
        self.max_frame = max_frame
        self.ops: dict[str, _Op] = {}
        self.stats = ApiStats()
        self.sessions: dict[int, Session] = {}
        self._next_session = 0

    def add_op(
        self, name: str, handler: RequestHandler, description: str = "", *, inline: bool = False
    ) -> None:
        """``inline``: the handler never awaits anything that blocks (a lookup, a read):
        it runs in the read loop, sparing a task and a cancel scope per request."""
        self.ops[name] = _Op(handler=handler, description=description, inline=inline)

    def add_stream_op(self, name: str, handler: StreamHandler, description: str = "") -> None:
        self.ops[name] = _Op(stream=handler, description=description)

    def allowed(self, creds: PeerCredentials) -> bool:
        if creds.uid in self.allow_uids:
            return True
        return bool(self.allow_gids and _groups_of(creds.uid, creds.gid) & self.allow_gids)

    async def _bind(self) -> trio.socket.SocketType:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await probe.connect(self.path)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise
                path.unlink(missing_ok=True)  # a stale socket from a daemon that died
            else:
                raise OSError(errno.EADDRINUSE, f"another daemon is serving {self.path}")
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self.mode)
        sock.listen(128)
        return sock

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = await self._bind()
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # EMFILE and friends: back off, keep serving
                        self.ratelog.error("accept", "API accept failed", error=str(exc))
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._session, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            Path(self.path).unlink(missing_ok=True)

    async def _session(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        try:
            creds = _peer_credentials(stream.socket)
        except OSError:
            await stream.aclose()
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
            with trio.move_on_after(1):
                try:
                    await stream.send_all(encode_frame(messages.failed(None, error)))
                except (trio.BrokenResourceError, OSError):
                    pass
            await stream.aclose()
            return
        self._next_session += 1
        session = Session(self, stream, creds, self._next_session)
        self.sessions[session.id] = session
        self.stats.active_sessions += 1
        try:
            await session.run()
        finally:
            self.stats.active_sessions -= 1
            del self.sessions[session.id]
            with trio.CancelScope(shield=True):
                await stream.aclose()
