"""The bytes under a :class:`~meshd_client.connection.Connection`: its Unix socket, driven
natively by whichever event loop anyio runs on.

Every API call is one write and one read on this socket, so its cost is the floor of every
call. anyio's socket streams are generic and pay for it on each call: under asyncio a
``receive()`` resumes and pauses the transport's reading (two ``epoll_ctl`` calls) and wakes a
reader task that then wakes the caller, and ``send()`` yields to the loop once more; under
trio ``send_all`` and ``receive_some`` each add a scheduling round after the system call.
Here (measured against a bare echo server on a 2-core VM, per lookup round trip):

* **asyncio**: the socket is an :class:`asyncio.Protocol`. ``data_received`` hands the bytes
  to the connection at once, which resolves the caller's future directly: no reader task, no
  per-read ``epoll_ctl``; writes go to ``transport.write`` (written at once when the socket
  has room, buffered by the transport otherwise, with ``pause_writing`` as back-pressure).
  ~147 → ~62 µs.
* **trio**: one reader task waits with :func:`trio.lowlevel.wait_readable` and reads the raw
  non-blocking socket; writes go straight to the socket and wait only when its buffer is
  full. ~120 → ~77 µs.

Both behave the same towards the connection: bytes in through ``Sink.on_data`` in order, one
``Sink.on_close`` call at the end, ``send`` writes whole frames in call order.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final, Protocol

import anyio

_READ_SIZE: Final = 256 * 1024
_READS_PER_YIELD: Final = 16  # a reader that always finds data still lets other tasks run


class WireClosed(ConnectionError):
    """The socket is closed or broken: nothing more can be written."""


class Sink(Protocol):
    """The connection, as the wire sees it."""

    def on_data(self, data: bytes) -> None:
        """Bytes arrived (in order)."""

    def on_close(self) -> None:
        """The peer closed the connection, it broke, or it was closed here (called once)."""


class Waiter(Protocol):
    """A one-shot wake-up for one task (a future under asyncio, an event under trio)."""

    def set(self) -> None: ...

    async def wait(self) -> None: ...


class Wire(Protocol):
    async def send(self, data: bytes) -> None:
        """Write ``data`` whole, after everything sent before it; raises WireClosed."""

    def waiter(self) -> Waiter: ...

    async def run(self) -> None:
        """Deliver incoming bytes until the connection ends (returns at once if the event
        loop delivers them itself)."""

    def abort(self) -> None:
        """Close now (unsent data is dropped)."""

    async def aclose(self) -> None:
        """Close after the data already sent is handed to the socket."""


async def connect(path: str, sink: Sink) -> Wire:
    """Connect to the Unix socket at ``path``; raises the OSError of the failed connect."""
    if anyio.get_cancelled_exc_class() is asyncio.CancelledError:
        return await _AsyncioWire.connect(path, sink)
    return await _TrioWire.connect(path, sink)


# ---------------------------------------------------------------------------- asyncio


class _FutureWaiter:
    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        await self._future


class _AsyncioWire(asyncio.Protocol):
    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._lost = False
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None

    @classmethod
    async def connect(cls, path: str, sink: Sink) -> _AsyncioWire:
        loop = asyncio.get_running_loop()
        _, wire = await loop.create_unix_connection(lambda: cls(sink), path)
        return wire

    # protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._sink.on_data(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._wake_writers()
        self._sink.on_close()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._resumed = None

    # the wire

    async def send(self, data: bytes) -> None:
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            raise WireClosed("connection closed")
        transport.write(data)
        while self._paused and not self._lost:
            # The transport buffers more than its high-water mark: the daemon is not
            # reading. Wait for it, as a blocking write would.
            if self._resumed is None:
                self._resumed = self._loop.create_future()
            await asyncio.shield(self._resumed)
        if self._lost:
            raise WireClosed("connection lost")

    def waiter(self) -> Waiter:
        return _FutureWaiter(self._loop)

    async def run(self) -> None:
        return  # data_received delivers the bytes

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def aclose(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()  # writes what is buffered, then closes


# ---------------------------------------------------------------------------- trio


class _TrioWire:
    def __init__(self, sock: socket.socket, sink: Sink) -> None:
        import trio

        self._trio = trio
        self._sock = sock
        self._sink = sink
        self._closed = False
        self._write_error: str | None = None
        self._sink_told = False
        # Set while a write waits for room in the socket buffer; later writes queue behind
        # it (in order) instead of interleaving their bytes with its remainder.
        self._busy = False
        self._idle: trio.Event = trio.Event()

    @classmethod
    async def connect(cls, path: str, sink: Sink) -> _TrioWire:
        import trio

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:  # the daemon's accept backlog is full: wait for room
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, f"connect to {path} failed") from None
            else:
                await trio.lowlevel.checkpoint()
        except BaseException:
            sock.close()
            raise
        return cls(sock, sink)

    async def send(self, data: bytes) -> None:
        trio = self._trio
        while self._busy:
            await self._idle.wait()
        if self._closed:
            raise WireClosed("connection closed")
        if self._write_error is not None:
            raise WireClosed(self._write_error)
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            # The peer is gone. Reading goes on: what it sent before closing (the reason
            # it refused us, say) is still to be read, then the end of the stream.
            self._write_error = str(exc)
            raise WireClosed(self._write_error) from None
        if sent == len(data):
            return
        # The socket buffer is full: write the rest as room appears. A frame cut short would
        # corrupt the stream, so a write cancelled half-way closes the connection.
        self._busy = True
        view = memoryview(data)[sent:]
        try:
            while view:
                await trio.lowlevel.wait_writable(self._sock)
                try:
                    view = view[self._sock.send(view) :]
                except BlockingIOError:
                    continue
        except BaseException as exc:
            self._write_error = repr(exc)
            self.abort()
            if isinstance(exc, OSError | trio.ClosedResourceError):
                raise WireClosed(str(exc)) from None
            raise
        finally:
            view.release()
            self._busy = False
            self._idle.set()
            self._idle = trio.Event()

    def waiter(self) -> Waiter:
        return self._trio.Event()

    async def run(self) -> None:
        trio = self._trio
        sock = self._sock
        feed = self._sink.on_data
        reads = 0
        try:
            while not self._closed:
                try:
                    data = sock.recv(_READ_SIZE)
                except BlockingIOError:
                    reads = 0
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not data:
                    break
                feed(data)
                reads += 1
                if reads >= _READS_PER_YIELD:
                    reads = 0
                    await trio.lowlevel.checkpoint()
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            self._tell_sink()

    def _tell_sink(self) -> None:
        if not self._sink_told:
            self._sink_told = True
            self._sink.on_close()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    async def aclose(self) -> None:
        self.abort()
