"""One API session with the local daemon, on anyio (asyncio or trio).

A background task reads frames and routes them: replies to the request waiting for them,
stream events to the stream's bounded buffer. Requests may run concurrently on one
connection. Connection problems become typed errors (``unreachable``, ``unauthorized``,
``closed``) instead of raw OSErrors.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from anyio.abc import SocketStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from meshd_client._version import __version__
from meshd_client.protocol import errors, messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode_frame

DEFAULT_SOCKET: Final = "/run/meshd/meshd.sock"
SOCKET_ENV: Final = "MESHD_SOCKET"
_STREAM_BUFFER: Final = 1024


def socket_path(explicit: str | None = None) -> str:
    """The socket to use: the argument, else ``$MESHD_SOCKET``, else the default."""
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


@dataclass(slots=True)
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    value: Any = None
    error: MeshError | None = None
    stream: MemoryObjectSendStream[Any] | None = None


class Connection:
    """Use :meth:`open` (an async context manager)."""

    def __init__(self, stream: SocketStream, max_frame: int) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, MemoryObjectSendStream[Any]] = {}
        self._overflowed: set[int] = set()  # streams dropped because the consumer fell behind
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._closed: MeshError | None = None
        self.lost = anyio.Event()  # set once the connection is gone, for any reason
        self.node = ""
        self.daemon = ""
        self.version = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | None = None,
        *,
        client: str = f"meshd-client/{__version__}",
        timeout: float = 5.0,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> AsyncIterator[Connection]:
        where = socket_path(path)
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_unix(where)
        except FileNotFoundError:
            raise errors.Unreachable(
                f"meshd is not running: no socket at {where}", detail={"socket": where}
            ) from None
        except PermissionError:
            raise errors.Unauthorized(
                f"permission denied on {where} (is this user in the daemon's group?)",
                detail={"socket": where},
            ) from None
        except ConnectionRefusedError:
            raise errors.Unreachable(
                f"meshd is not accepting connections on {where}", detail={"socket": where}
            ) from None
        except TimeoutError:
            raise errors.Timeout(f"connecting to {where} timed out") from None
        except OSError as exc:
            raise errors.Unreachable(f"cannot connect to {where}: {exc}") from None
        conn = cls(stream, max_frame)
        async with stream:
            await conn._handshake(client, timeout)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(conn._read_loop)
                    try:
                        yield conn
                    finally:
                        conn._fail_all(errors.Closed("connection closed"))
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The reader task never raises, so a group holds the caller's own error:
                # give it back as itself, so that ``except NotFound`` works.
                if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                    raise group.exceptions[0] from None
                raise

    # ------------------------------------------------------------------ plumbing

    async def _write(self, frame: dict[str, Any]) -> None:
        if self._closed is not None:
            raise self._closed
        data = encode_frame(frame, self._max_frame)
        try:
            async with self._send_lock:
                await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._fail_all(errors.Closed("connection to meshd lost"))
            raise errors.Closed("connection to meshd lost") from None

    async def _read_frame(self) -> dict[str, Any] | None:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self._stream.receive()
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                return None
            self._decoder.feed(data)

    async def _handshake(self, client: str, timeout: float) -> None:
        try:
            await self._write(messages.hello(client))
        except errors.Closed:
            # The daemon may have refused us before reading the hello (an unauthorized
            # peer): its reason is already waiting to be read.
            self._closed = None
        with anyio.fail_after(timeout):
            try:
                frame = await self._read_frame()
            except FrameError as exc:
                raise errors.Internal(f"bad frame from meshd: {exc}") from None
        if frame is None:
            raise errors.Closed("meshd closed the connection during the handshake")
        if frame.get("t") == "res" and frame.get("ok") is False:
            raise errors.error_from_wire(frame.get("error"))
        if frame.get("t") != "hello" or type(frame.get("version")) is not int:
            raise errors.Internal("unexpected handshake reply from meshd")
        self.version = frame["version"]
        node = frame.get("node")
        daemon = frame.get("daemon")
        self.node = node if isinstance(node, str) else ""
        self.daemon = daemon if isinstance(daemon, str) else ""

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._read_frame()
                if frame is None:
                    break
                self._route(frame)
        except FrameError as exc:
            self._fail_all(errors.Internal(f"bad frame from meshd: {exc}"))
            return
        self._fail_all(errors.Closed("meshd closed the connection"))

    def _route(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        rid = frame.get("id")
        if kind == "res":
            pending = self._pending.pop(rid, None) if type(rid) is int else None
            if pending is None:
                if rid is None and frame.get("ok") is False:
                    self._fail_all(errors.error_from_wire(frame.get("error")))
                return
            if frame.get("ok") is True:
                pending.value = frame.get("value")
            else:
                pending.error = errors.error_from_wire(frame.get("error"))
                if pending.stream is not None:
                    self._streams.pop(rid, None)  # type: ignore[arg-type]
                    pending.stream.close()
            pending.done.set()
        elif kind == "evt" and type(rid) is int:
            sink = self._streams.get(rid)
            if sink is not None:
                try:
                    sink.send_nowait(frame.get("event"))
                except anyio.WouldBlock:
                    # The consumer is not keeping up: end its stream rather than buffer. It
                    # gets Overloaded after what was buffered, and the daemon is told to stop.
                    self._streams.pop(rid, None)
                    self._overflowed.add(rid)
                    sink.close()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._streams.pop(rid, None)
        elif kind == "end" and type(rid) is int:
            sink = self._streams.pop(rid, None)
            if sink is not None:
                error = frame.get("error")
                if error is not None:
                    try:
                        sink.send_nowait(errors.error_from_wire(error))
                    except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                sink.close()

    def _fail_all(self, error: MeshError) -> None:
        if self._closed is None:
            self._closed = error
        self.lost.set()
        for pending in self._pending.values():
            pending.error = error
            pending.done.set()
        self._pending.clear()
        for sink in self._streams.values():
            sink.close()
        self._streams.clear()

    # ------------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def call(
        self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send a request and wait for its reply; failures raise a :class:`MeshError`."""
        rid = next(self._ids)
        pending = _Pending()
        self._pending[rid] = pending
        try:
            await self._write(messages.request(rid, op, args or {}))
            if timeout is None:
                await pending.done.wait()  # no cancel scope: the common, cheapest path
            else:
                with anyio.fail_after(timeout):
                    await pending.done.wait()
        except TimeoutError:
            self._pending.pop(rid, None)
            raise errors.Timeout(f"{op}: no reply from meshd within {timeout} s") from None
        finally:
            self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        return pending.value

    async def notify(self, op: str, args: dict[str, Any] | None = None) -> None:
        """A one-way request (a ``note``): no answer is sent or awaited."""
        await self._write(messages.note(op, args or {}))

    @asynccontextmanager
    async def stream(
        self, op: str, args: dict[str, Any] | None = None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """Open a stream op; iterate the events. Leaving the block cancels the stream."""
        rid = next(self._ids)
        send, receive = anyio.create_memory_object_stream[Any](_STREAM_BUFFER)
        pending = _Pending(stream=send)
        self._pending[rid] = pending
        self._streams[rid] = send
        try:
            await self._write(messages.request(rid, op, args or {}))
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            yield _events(receive, lambda: rid in self._overflowed)
        finally:
            self._pending.pop(rid, None)
            overflowed = rid in self._overflowed
            self._overflowed.discard(rid)
            if (self._streams.pop(rid, None) is not None or overflowed) and self._closed is None:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._write(messages.cancel(rid))
                    except MeshError:
                        pass
            send.close()
            receive.close()


async def _events(
    receive: MemoryObjectReceiveStream[Any], overflowed: Callable[[], bool]
) -> AsyncIterator[Any]:
    async for item in receive:
        if isinstance(item, MeshError):
            raise item
        yield item
    if overflowed():
        raise errors.Overloaded(
            f"more than {_STREAM_BUFFER} stream events were waiting to be read; "
            "the stream was dropped"
        )


@asynccontextmanager
async def connect(path: str | None = None, **kwargs: Any) -> AsyncIterator[Connection]:
    """Shorthand for :meth:`Connection.open`."""
    async with Connection.open(path, **kwargs) as conn:
        yield conn


__all__ = ["DEFAULT_SOCKET", "SOCKET_ENV", "Connection", "connect", "socket_path"]
