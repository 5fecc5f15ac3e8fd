"""Sealed, length-prefixed frames over TCP, and a listener that routes streams by channel.

Each frame is a 4-byte big-endian length and a sealed envelope. The first frame of every
connection names its channel (``[STREAM_VERSION, channel]``) so one port serves membership,
key management (one exchange per connection), replication and routing (persistent links).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from meshd.logs import RateLimitedLog, kv
from meshd.security.envelope import Envelope, SealError
from meshd.transport.stats import TransportStats
from meshd.wire.validate import Address
from meshd_client.protocol import cbor

STREAM_VERSION: Final = 1
_LENGTH: Final = struct.Struct(">I")
DEFAULT_MAX_FRAME: Final = 8 << 20
# The first frame of an accepted connection (the sealed ``[STREAM_VERSION, channel]``, a few
# dozen bytes) may be at most this large: it is read before the peer proved it holds a key.
HEADER_MAX_FRAME: Final = 256
DEFAULT_HEADER_TIMEOUT: Final = 5.0
DEFAULT_MAX_CONNECTIONS: Final = 8192
DEFAULT_MAX_EXCHANGES: Final = 512
DEFAULT_MAX_UNAUTHENTICATED: Final = 256
DEFAULT_MAX_PREAUTH_BYTES: Final = 64 << 10
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset
_READ_SIZE: Final = 256 * 1024
_READS_PER_YIELD: Final = 16  # a peer that always has more to read still lets others run


class Channel(enum.IntEnum):
    MEMBERSHIP = 1
    KEYRING = 2
    REPLICATION = 3
    ROUTING = 4


class StreamError(Exception):
    """The stream broke: closed early, oversized or unauthenticated frame, bad header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FramedStream:
    """Sealed frames over one byte stream.

    On a socket (the daemon's only kind of stream) reads go straight to the non-blocking file
    descriptor and wait with :func:`trio.lowlevel.wait_readable` only when it has nothing: a
    trio ``receive_some`` adds a scheduling round to every read, on the path of every routed
    message. :meth:`write_now` writes without waiting at all, for a sender that must not
    yield (see :class:`~meshd.transport.links.PeerLinks`).

    An accepted connection starts *unauthenticated* (``first_frame_max``): its first frame may
    be at most that large and is read exactly, byte for byte as announced, so a peer without
    a key can make the daemon hold only a few hundred bytes. Once a frame opened (the peer
    holds a cluster key), frames up to ``max_frame`` are allowed and reads may take more than
    the current frame (the next frames' bytes, up to 256 KiB per read). A frame larger than
    that is read into one buffer of exactly its size: no read allocates more than it needs."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        envelope: Envelope,
        stats: TransportStats,
        peer: Address,
        max_frame: int = DEFAULT_MAX_FRAME,
        *,
        first_frame_max: int | None = None,
    ) -> None:
        self.stream = stream
        self.envelope = envelope
        self.stats = stats
        self.peer = peer
        self.max_frame = max_frame
        # Until a frame opened: the largest frame allowed, and reads of exactly what is due.
        self._limit = max_frame if first_frame_max is None else first_frame_max
        self.authenticated = first_frame_max is None
        self._buffer = bytearray()
        # The socket's descriptor (non-blocking, as trio keeps it), or -1 for other streams.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._reads = 0

    @property
    def buffered(self) -> int:
        """Bytes read from the connection and not yet handed out."""
        return len(self._buffer)

    def seal(self, payloads: list[bytes]) -> bytes:
        """The bytes of ``payloads`` sealed as frames, ready to write."""
        out = bytearray()
        for payload in payloads:
            sealed = self.envelope.seal(payload)
            if len(sealed) > self.max_frame:
                raise StreamError("frame_too_large")
            out += _LENGTH.pack(len(sealed))
            out += sealed
        return bytes(out)

    async def send(self, payload: bytes) -> None:
        await self.send_many([payload])

    async def send_many(self, payloads: list[bytes]) -> None:
        """Seal each payload as its own frame; write them all at once."""
        await self.send_sealed(self.seal(payloads), len(payloads))

    async def send_sealed(self, data: bytes, frames: int) -> None:
        """Write bytes from :meth:`seal` (or what :meth:`write_now` left of them)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            self._count_reset(exc)
            raise
        self.stats.tcp_frames_out += frames
        self.stats.tcp_bytes_out += len(data)

    def write_now(self, data: bytes, frames: int) -> int:
        """Write as much of ``data`` as the socket takes without waiting; returns how much
        (0 for streams that are not sockets). Raises StreamError if the connection broke."""
        if self._fd < 0:
            return 0
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._count_reset(exc)
            raise StreamError("closed") from None
        self.stats.tcp_bytes_out += sent
        if sent == len(data):
            self.stats.tcp_frames_out += frames
        return sent

    def _count_reset(self, exc: BaseException) -> None:
        """Count a connection the peer reset (not closed in order)."""
        if isinstance(exc, ConnectionResetError) or isinstance(exc.__cause__, ConnectionResetError):
            self.stats.tcp_resets += 1

    async def _wait_readable(self) -> None:
        self._reads = 0
        await trio.lowlevel.wait_readable(self._fd)

    async def _yield_now_and_then(self) -> None:
        self._reads += 1
        if self._reads >= _READS_PER_YIELD:
            self._reads = 0
            await trio.lowlevel.checkpoint()

    async def _read(self, size: int) -> bytes | bytearray:
        """At most ``size`` bytes (b"" at the end of the stream)."""
        if self._fd < 0:
            return await self.stream.receive_some(size)
        while True:
            try:
                chunk = os.read(self._fd, size)
            except BlockingIOError:
                await self._wait_readable()
                continue
            await self._yield_now_and_then()
            return chunk

    async def _read_into(self, view: memoryview) -> int:
        """Read into ``view``; how many bytes (0 at the end of the stream)."""
        if self._fd < 0:
            data = await self.stream.receive_some(len(view))
            view[: len(data)] = data
            return len(data)
        while True:
            try:
                got = os.readv(self._fd, [view])
            except BlockingIOError:
                await self._wait_readable()
                continue
            await self._yield_now_and_then()
            return got

    async def _fill(self, size: int) -> None:
        """Until the buffer holds ``size`` bytes (``size`` is at most _READ_SIZE, or the
        stream is unauthenticated and ``size`` is tiny)."""
        buffer = self._buffer
        while len(buffer) < size:
            want = size - len(buffer)
            chunk = await self._read(want if not self.authenticated else _READ_SIZE)
            if not chunk:
                raise StreamError("closed")
            buffer += chunk

    async def receive_length(self) -> int:
        """The length the next frame announces (its prefix consumed). Raises StreamError
        (``frame_too_large``) past the current limit, before any of the frame is read."""
        try:
            await self._fill(_LENGTH.size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._count_reset(exc)
            raise StreamError("closed") from None
        (size,) = _LENGTH.unpack_from(self._buffer)
        if size > self._limit:
            raise StreamError("frame_too_large")
        del self._buffer[: _LENGTH.size]
        return int(size)

    async def receive_body(self, size: int) -> bytes:
        """The frame of ``size`` bytes announced by :meth:`receive_length`, opened."""
        try:
            sealed = await self._take(size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._count_reset(exc)
            raise StreamError("closed") from None
        self.stats.tcp_frames_in += 1
        self.stats.tcp_bytes_in += size + _LENGTH.size
        try:
            payload = self.envelope.open(sealed)
        except SealError as exc:
            raise StreamError(exc.reason) from None
        if not self.authenticated:
            # The peer holds a cluster key: from now on, frames of any allowed size.
            self.authenticated = True
            self._limit = self.max_frame
        return payload

    async def _take(self, size: int) -> bytes | bytearray:
        buffer = self._buffer
        if len(buffer) < size and (not self.authenticated or size - len(buffer) > _READ_SIZE):
            # Read exactly the frame's bytes into one buffer of its size, in place.
            frame = bytearray(size)
            view = memoryview(frame)
            have = len(buffer)
            view[:have] = buffer
            buffer.clear()
            while have < size:
                got = await self._read_into(view[have:])
                if not got:
                    raise StreamError("closed")
                have += got
            return frame
        await self._fill(size)
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    async def receive(self) -> bytes:
        return await self.receive_body(await self.receive_length())

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def abort(self) -> None:
        """Close with a reset, discarding what the kernel still holds to send. A graceful
        close keeps retransmitting queued bytes after we gave up on the peer, so frames
        written before a partition would be delivered after it heals — long after their
        senders retried elsewhere."""
        await abort(self.stream)


async def abort(stream: trio.abc.Stream) -> None:
    """Close ``stream`` with a reset (see :meth:`FramedStream.abort`)."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    await stream.aclose()


async def dial(
    addr: Address,
    channel: Channel,
    envelope: Envelope,
    stats: TransportStats,
    *,
    timeout: float,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> FramedStream:
    """Connect and announce the channel. Raises ConnectionRefusedError (nothing listens),
    trio.TooSlowError (no answer in time) or OSError."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        with trio.fail_after(timeout):
            await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    framed = FramedStream(trio.SocketStream(sock), envelope, stats, addr, max_frame)
    stats.tcp_dialed += 1
    with trio.fail_after(timeout):
        await framed.send(cbor.dumps([STREAM_VERSION, int(channel)]))
    return framed


async def request(
    addr: Address,
    channel: Channel,
    payload: bytes,
    envelope: Envelope,
    stats: TransportStats,
    *,
    timeout: float,
) -> bytes:
    """One request frame, one reply frame, all within ``timeout``."""
    with trio.fail_after(timeout):
        stream = await dial(addr, channel, envelope, stats, timeout=timeout)
        try:
            await stream.send(payload)
            return await stream.receive()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


Handler = Callable[[FramedStream], Awaitable[None]]


class StreamServer:
    """Accepts connections, reads the channel header and hands the stream to its handler.

    Until its header frame opened, a connection is *unauthenticated*: anyone can open one
    without a key. Those are bounded apart from the rest — at most ``max_unauthenticated``
    at once, each given ``header_timeout`` to send a header of at most
    :data:`HEADER_MAX_FRAME` bytes, and all of them together at most ``max_preauth_bytes``
    buffered — and the excess is refused at once (reset, counted in ``tcp_refused_busy`` and
    under a ``stream_*`` reason), so a flood of connections costs a bounded few descriptors
    and bytes, and no authenticated link waits behind it."""

    def __init__(
        self,
        envelope: Envelope,
        stats: TransportStats,
        log: logging.Logger,
        *,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_exchanges: int = DEFAULT_MAX_EXCHANGES,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
        max_preauth_bytes: int = DEFAULT_MAX_PREAUTH_BYTES,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.envelope = envelope
        self.stats = stats
        self.log = log
        self._ratelog = RateLimitedLog(log)
        self.header_timeout = header_timeout
        # All connections at once; each peer holds two persistent links (replication and
        # routing), so this bounds the cluster size a daemon serves (about 4,000 peers).
        self.max_connections = max_connections
        # Of those, one-exchange connections (membership probes and syncs, key rotation):
        # a burst of them must not crowd out the links, nor the links starve them.
        self.max_exchanges = max_exchanges
        self.max_unauthenticated = max_unauthenticated
        self.max_preauth_bytes = max_preauth_bytes
        self.max_frame = max_frame
        self._handlers: dict[int, Handler] = {}
        self._persistent: set[int] = set()
        self._active = 0
        self._exchanges = 0
        self.unauthenticated = 0  # connections whose header has not opened yet
        self.preauth_bytes = 0  # bytes those may hold (reserved as their header is announced)

    def register(self, channel: Channel, handler: Handler, *, persistent: bool = False) -> None:
        """Serve ``channel`` with ``handler``; ``persistent``: its connections are long-lived
        links, not counted against ``max_exchanges``."""
        self._handlers[int(channel)] = handler
        if persistent:
            self._persistent.add(int(channel))

    def _refuse(self, reason: str, peer: str) -> None:
        self.stats.tcp_refused_busy += 1
        self.stats.reject(reason)
        self._ratelog.warning(reason, "refused connection", peer=peer, reason=reason)

    async def handle(self, raw: trio.SocketStream) -> None:
        """Serve one accepted connection; never raises."""
        self.stats.tcp_accepted += 1
        try:
            peername = raw.socket.getpeername()
            peer: Address = (peername[0], peername[1])
        except OSError:
            await abort(raw)
            return
        if self._active >= self.max_connections:
            self._refuse("stream_busy", peer[0])
            await abort(raw)
            return
        if self.unauthenticated >= self.max_unauthenticated:
            self._refuse("stream_unauthenticated_busy", peer[0])
            await abort(raw)
            return
        self._active += 1
        self.unauthenticated += 1
        pending = True
        stream = FramedStream(
            raw,
            self.envelope,
            self.stats,
            peer,
            self.max_frame,
            first_frame_max=HEADER_MAX_FRAME,
        )
        try:
            header = await self._header(stream)
            self.unauthenticated -= 1
            pending = False
            if header is None:
                return
            channel = self._channel(header)
            if channel is None:
                return
            if channel in self._persistent:
                await self._handlers[channel](stream)
            elif self._exchanges >= self.max_exchanges:
                self.stats.tcp_refused_busy += 1
            else:
                self._exchanges += 1
                try:
                    await self._handlers[channel](stream)
                finally:
                    self._exchanges -= 1
        except StreamError as exc:
            self.stats.reject(f"stream_{exc.reason}")
            self._ratelog.warning(exc.reason, "dropped stream", peer=peer[0], reason=exc.reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.stats.reject("stream_broken")
        except trio.TooSlowError:
            # The peer did not finish its exchange in time (a lossy or cut link, a paused
            # peer): the channel's own deadline, not a fault of this daemon.
            self.stats.reject("stream_timeout")
            self._ratelog.info("timeout", "stream timed out", peer=peer[0])
        except Exception:
            self.log.exception("stream handler failed", extra=kv(peer=peer[0]))
            self.stats.reject("stream_handler_error")
        finally:
            self._active -= 1
            if pending:
                self.unauthenticated -= 1
            with trio.CancelScope(shield=True):
                if stream.authenticated:
                    await stream.aclose()
                else:
                    await stream.abort()  # nothing owed to a peer that never authenticated

    async def _header(self, stream: FramedStream) -> bytes | None:
        """The connection's header frame, opened; None if it did not come in time or the
        bytes it announced do not fit the budget of unauthenticated bytes (both counted)."""
        with trio.move_on_after(self.header_timeout):
            size = await stream.receive_length()
            reserved = _LENGTH.size + size
            if self.preauth_bytes + reserved > self.max_preauth_bytes:
                self._refuse("stream_preauth_budget", stream.peer[0])
                return None
            self.preauth_bytes += reserved
            try:
                return await stream.receive_body(size)
            finally:
                self.preauth_bytes -= reserved
        self.stats.reject("stream_header_timeout")
        return None

    def _channel(self, header: bytes) -> int | None:
        try:
            value = cbor.loads(header)
        except cbor.CodecError:
            self.stats.reject("stream_bad_header")
            return None
        if (
            not isinstance(value, list)
            or len(value) != 2
            or value[0] != STREAM_VERSION
            or type(value[1]) is not int
        ):
            self.stats.reject("stream_bad_header")
            return None
        if value[1] not in self._handlers:
            self.stats.reject("stream_unknown_channel")
            return None
        channel: int = value[1]
        return channel
