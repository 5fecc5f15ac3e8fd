"""The local API server on a Unix socket: the listener, the op table, and the bounds.

Accepts connections, checks peer credentials, refuses past ``max_sessions`` (telling the
client why), and runs one :class:`~meshd.api.session.Session` per connection. Everything is
bounded: sessions, streams per session and in all, bytes of partial frames in all sessions
(``[api]`` settings in ``docs/operations.md``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any, Final

import trio

from meshd.api.outbox import close_socket
from meshd.api.peercred import PeerCredentials, groups_of, peer_credentials
from meshd.api.session import BeginHandler, OpEntry, RequestHandler, Session, StreamHandler
from meshd.api.stats import ApiStats
from meshd.logs import RateLimitedLog
from meshd_client.protocol import errors, messages
from meshd_client.protocol.framing import (
    DEFAULT_MAX_FRAME,
    encode_frame,
)

DEFAULT_MAX_SESSIONS: Final = 1024
DEFAULT_MAX_STREAMS: Final = 16384  # per session (a runner holds one per agent it serves)
DEFAULT_MAX_STREAMS_TOTAL: Final = 65536
DEFAULT_PARTIAL_FRAME_TIMEOUT: Final = 30.0
DEFAULT_MAX_BUFFERED: Final = 64 << 20
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
        self.ops: dict[str, OpEntry] = {}
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
        self.ops[name] = OpEntry(
            handler=handler, description=description, inline=inline, begin=begin
        )

    def add_stream_op(self, name: str, handler: StreamHandler, description: str = "") -> None:
        self.ops[name] = OpEntry(stream=handler, description=description)

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
            close_socket(sock)
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
            close_socket(sock)
