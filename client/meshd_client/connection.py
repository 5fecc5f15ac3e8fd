"""One API session with the local daemon, on anyio (asyncio or trio).

Incoming frames are routed as soon as their bytes arrive (see :mod:`meshd_client._wire`:
from the asyncio protocol's callback, or trio's reader task): replies wake the request
waiting for them, stream events go to the stream's bounded buffer. Requests may run
concurrently on one connection. Connection problems become typed errors (``unreachable``,
``unauthorized``, ``closed``) instead of raw OSErrors.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from meshd_client import _wire
from meshd_client._version import __version__
from meshd_client.protocol import errors, messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode_frame

log = logging.getLogger("meshd_client.connection")
DEFAULT_SOCKET: Final = "/run/meshd/meshd.sock"
SOCKET_ENV: Final = "MESHD_SOCKET"
_STREAM_BUFFER: Final = 1024


def socket_path(explicit: str | None = None) -> str:
    """The socket to use: the argument, else ``$MESHD_SOCKET``, else the default."""
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


@dataclass(slots=True)
class _Pending:
    done: _wire.Waiter
    value: Any = None
    error: MeshError | None = None
    stream: MemoryObjectSendStream[Any] | None = None


class Connection:
    """Use :meth:`open` (an async context manager)."""

    def __init__(self, max_frame: int) -> None:
        self._wire: _wire.Wire | None = None
        self._decoder = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, MemoryObjectSendStream[Any]] = {}
        self._taps: dict[int, Callable[[Any], bool]] = {}
        self._overflowed: set[int] = set()  # streams dropped because the consumer fell behind
        self._closed: MeshError | None = None
        self._hello: _Pending | None = None  # the handshake, until the daemon's hello
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
        conn = cls(max_frame)
        try:
            with anyio.fail_after(timeout):
                wire = await _wire.connect(where, conn)
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
        conn._wire = wire
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wire.run)
                try:
                    await conn._handshake(client, timeout)
                    yield conn
                finally:
                    conn._fail_all(errors.Closed("connection closed"))
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader never raises, so a group holds the caller's own error: give it
            # back as itself, so that ``except NotFound`` works.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await wire.aclose()

    # ------------------------------------------------------------------ plumbing

    async def _write(self, frame: dict[str, Any]) -> None:
        if self._closed is not None:
            raise self._closed
        data = encode_frame(frame, self._max_frame)
        assert self._wire is not None
        try:
            await self._wire.send(data)
        except _wire.WireClosed:
            self._fail_all(errors.Closed("connection to meshd lost"))
            raise errors.Closed("connection to meshd lost") from None

    async def _handshake(self, client: str, timeout: float) -> None:
        assert self._wire is not None
        hello = self._hello = _Pending(self._wire.waiter())
        try:
            await self._wire.send(encode_frame(messages.hello(client), self._max_frame))
        except _wire.WireClosed:
            # The daemon may have refused us before reading the hello (an unauthorized
            # peer): its reason is on its way, or already read.
            pass
        with anyio.fail_after(timeout):
            await hello.done.wait()
        if hello.error is not None:
            raise hello.error
        frame = hello.value
        self.version = frame["version"]
        node = frame.get("node")
        daemon = frame.get("daemon")
        self.node = node if isinstance(node, str) else ""
        self.daemon = daemon if isinstance(daemon, str) else ""

    def _on_handshake(self, hello: _Pending, frame: dict[str, Any]) -> None:
        self._hello = None
        if frame.get("t") == "res" and frame.get("ok") is False:
            hello.error = errors.error_from_wire(frame.get("error"))
            self._fail_all(hello.error)
        elif frame.get("t") != "hello" or type(frame.get("version")) is not int:
            hello.error = errors.Internal("unexpected handshake reply from meshd")
            self._fail_all(hello.error)
        else:
            hello.value = frame
        hello.done.set()

    # The wire's sink: called with the bytes as they arrive, and once at the end.

    def on_data(self, data: bytes) -> None:
        try:
            self._decoder.feed(data)
            while (frame := self._decoder.next_frame()) is not None:
                hello = self._hello
                if hello is not None:
                    self._on_handshake(hello, frame)
                else:
                    self._route(frame)
        except FrameError as exc:
            self._fail_all(errors.Internal(f"bad frame from meshd: {exc}"))
            if self._wire is not None:
                self._wire.abort()

    def on_close(self) -> None:
        if self._hello is not None:
            hello, self._hello = self._hello, None
            hello.error = self._closed or errors.Closed(
                "meshd closed the connection during the handshake"
            )
            hello.done.set()
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
                event = frame.get("event")
                tap = self._taps.get(rid)
                if (
                    tap is not None
                    and sink.statistics().current_buffer_used == 0
                    and self._tapped(tap, event)
                ):
                    return
                try:
                    sink.send_nowait(event)
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

    def _tapped(self, tap: Callable[[Any], bool], event: Any) -> bool:
        try:
            return tap(event)
        except Exception:
            log.exception("a stream tap failed; the event goes to the stream")
            return False

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
        if self._closed is not None:
            raise self._closed
        assert self._wire is not None
        rid = next(self._ids)
        pending = _Pending(self._wire.waiter())
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
        # A write to a socket with room does not yield: let a loop of notes yield here.
        await anyio.lowlevel.checkpoint()

    @asynccontextmanager
    async def stream(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        tap: Callable[[Any], bool] | None = None,
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """Open a stream op; iterate the events. Leaving the block cancels the stream.

        ``tap(event)``, if given, sees each event as it arrives, before it is buffered for
        the iterator, while nothing is buffered (so events are seen in order): returning
        True consumes the event (the iterator never sees it). It runs in the connection's
        reader, so it must not block; it spares the consumer a task wake-up per event."""
        if self._closed is not None:
            raise self._closed
        assert self._wire is not None
        rid = next(self._ids)
        send, receive = anyio.create_memory_object_stream[Any](_STREAM_BUFFER)
        pending = _Pending(self._wire.waiter(), stream=send)
        self._pending[rid] = pending
        self._streams[rid] = send
        if tap is not None:
            self._taps[rid] = tap
        try:
            await self._write(messages.request(rid, op, args or {}))
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            yield _events(receive, lambda: rid in self._overflowed)
        finally:
            self._pending.pop(rid, None)
            self._taps.pop(rid, None)
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
