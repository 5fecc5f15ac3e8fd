"""A minimal HTTP/1.1 server for Prometheus scrapes.

The daemon needs exactly one resource, ``GET /metrics``, so a few dozen lines on trio are less to
audit than an HTTP framework dependency. Every connection carries one request and is closed
after the response, which removes keep-alive and pipelining state entirely. The port faces the
network, so each connection is bounded in time (head read and response write), in request size,
and in number; and nothing a client does can raise out of the server.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Final

import trio

from meshd.metrics.exposition import CONTENT_TYPE, render_text
from meshd.metrics.registry import MetricsRegistry

_log: Final = logging.getLogger(__name__)

_ALLOWED_METHODS: Final = ("GET", "HEAD")
_METHOD: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LINGER_SECONDS: Final = 1.0
_MAX_DRAIN_BYTES: Final = 64 * 1024
_RECEIVE_CHUNK: Final = 4096


async def serve_metrics(
    registry: MetricsRegistry,
    host: str,
    port: int,
    *,
    head_timeout: float = 5.0,
    max_head_bytes: int = 8 * 1024,
    max_connections: int = 64,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves ``registry`` on ``host:port`` until cancelled.

    Use with ``nursery.start``: it reports the port actually bound, so ``port=0`` works (when
    ``host`` resolves to several addresses, the first listener's port). A client has
    ``head_timeout`` seconds to send at most ``max_head_bytes`` of request head, and the same
    time again to take the response. Connections beyond ``max_connections`` are refused with
    503 rather than queued, so idle clients cannot exhaust file descriptors.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot bind the metrics endpoint {host}:{port} (metrics.bind): {exc.strerror}",
        ) from None
    bound_port: int = listeners[0].socket.getsockname()[1]
    server = _MetricsHTTP(registry, head_timeout, max_head_bytes, max_connections)
    task_status.started(bound_port)
    await trio.serve_listeners(server.handle, listeners)


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    reason: str
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    allow: str | None = None

    def encode(self, *, include_body: bool) -> bytes:
        head = (
            f"HTTP/1.1 {self.status} {self.reason}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Connection: close\r\n"
        )
        if self.allow is not None:
            head += f"Allow: {self.allow}\r\n"
        return (head + "\r\n").encode("ascii") + (self.body if include_body else b"")


def _error(status: int, reason: str, **kwargs: str) -> _Response:
    return _Response(status, reason, f"{reason.lower()}\n".encode("ascii"), **kwargs)


class _Reject(Exception):
    """Ends request processing early with an error response."""

    def __init__(self, response: _Response) -> None:
        super().__init__(response.status)
        self.response = response


class _MetricsHTTP:
    """Per-server state: the registry, the limits, and the open connection count."""

    def __init__(
        self,
        registry: MetricsRegistry,
        head_timeout: float,
        max_head_bytes: int,
        max_connections: int,
    ) -> None:
        self.registry = registry
        self.head_timeout = head_timeout
        self.max_head_bytes = max_head_bytes
        self.max_connections = max_connections
        self.active = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection, start to close. Client misbehaviour is logged at debug level only;
        anything else unexpected is logged with its traceback. Neither escapes."""
        self.active += 1
        try:
            async with stream:
                await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            _log.debug("metrics client connection failed: %r", exc)
        except Exception:
            _log.exception("metrics connection handler failed")
        finally:
            self.active -= 1

    async def _exchange(self, stream: trio.SocketStream) -> None:
        method = "GET"
        if self.active > self.max_connections:
            response = _error(503, "Service Unavailable")
        else:
            head: bytes | None = None
            try:
                with trio.move_on_after(self.head_timeout):
                    head = await self._read_head(stream)
                if head is None:
                    raise _Reject(_error(408, "Request Timeout"))
                if not head:
                    return  # the client closed without asking anything
                method, response = self._route(head)
            except _Reject as reject:
                response = reject.response
        with trio.move_on_after(self.head_timeout):
            await stream.send_all(response.encode(include_body=method != "HEAD"))
            await stream.send_eof()
        # Closing with unread input in the kernel buffer makes TCP send a reset, which can
        # destroy the response before the client reads it; read what the client still sends
        # (a request body, say) until it closes, for a bounded time and amount.
        with trio.move_on_after(min(_LINGER_SECONDS, self.head_timeout)):
            drained = 0
            while drained < _MAX_DRAIN_BYTES:
                chunk = await stream.receive_some(_RECEIVE_CHUNK)
                if not chunk:
                    break
                drained += len(chunk)

    async def _read_head(self, stream: trio.SocketStream) -> bytes:
        """The request head without its terminating blank line; b"" on an immediate EOF."""
        buf = bytearray()
        while True:
            for terminator in (b"\r\n\r\n", b"\n\n"):
                end = buf.find(terminator)
                if end >= 0:
                    return bytes(buf[:end])
            room = self.max_head_bytes - len(buf)
            if room <= 0:
                raise _Reject(_error(431, "Request Header Fields Too Large"))
            chunk = await stream.receive_some(min(room, _RECEIVE_CHUNK))
            if not chunk:
                if buf:
                    raise _Reject(_error(400, "Bad Request"))
                return b""
            buf += chunk

    def _route(self, head: bytes) -> tuple[str, _Response]:
        """The request method and the response to it."""
        try:
            request_line = head.decode("ascii").splitlines()[0]
        except (UnicodeDecodeError, IndexError):
            raise _Reject(_error(400, "Bad Request")) from None
        parts = request_line.split(" ")
        if len(parts) != 3 or not _METHOD.fullmatch(parts[0]):
            raise _Reject(_error(400, "Bad Request"))
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            raise _Reject(_error(505, "HTTP Version Not Supported"))
        if method not in _ALLOWED_METHODS:
            raise _Reject(_error(405, "Method Not Allowed", allow=", ".join(_ALLOWED_METHODS)))
        if target.partition("?")[0] != "/metrics":
            return method, _error(404, "Not Found")
        try:
            body = render_text(self.registry.collect()).encode("utf-8")
        except Exception:
            _log.exception("rendering metrics failed")
            return method, _error(500, "Internal Server Error")
        return method, _Response(200, "OK", body, CONTENT_TYPE)
