"""The sd_notify protocol, without libsystemd.

systemd hands a ``Type=notify`` service the address of a Unix datagram socket in
``NOTIFY_SOCKET``; the service sends newline-separated ``KEY=VALUE`` assignments to it. The
protocol is small and stable (see sd_notify(3)), so implementing it here keeps the daemon free of
a native dependency and lets tests exercise it against a real socket.

Notification is best effort by design: a daemon must never fail, or stall its event loop, because
its supervisor is not listening. Every send is therefore non-blocking and every error is logged,
counted in :attr:`Notifier.errors` and swallowed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

import trio

_log: Final = logging.getLogger(__name__)


class Notifier:
    """Sends service state notifications to systemd.

    Build it with :meth:`from_env` from the process environment. When ``NOTIFY_SOCKET`` is absent
    (not started by systemd, or a unit that is not ``Type=notify``) every method is a cheap no-op,
    so call sites never need to check whether they run under systemd.
    """

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        """``address`` is ``NOTIFY_SOCKET`` verbatim: a path, or ``@name`` for the abstract
        namespace. ``watchdog_usec`` is the watchdog timeout, or None when no watchdog applies
        to this process."""
        self.address: Final = address or None
        self.watchdog_usec: Final = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self.errors = 0
        """Notifications that could not be delivered (kept as a plain counter for metrics)."""
        self.sent = 0
        """Notifications delivered to the socket."""
        self._log = logger or _log

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, logger: logging.Logger | None = None) -> Notifier:
        """Reads ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``env``.

        The watchdog is only enabled for this process: systemd sets ``WATCHDOG_PID`` to the main
        PID, and a child that inherited the environment must not keep the parent's watchdog alive.
        Malformed values disable the watchdog with a warning rather than failing start-up.
        """
        log = logger or _log
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC")
        raw_pid = env.get("WATCHDOG_PID")
        if raw_usec is not None:
            try:
                usec = int(raw_usec)
                for_us = raw_pid is None or int(raw_pid) == os.getpid()
            except ValueError:
                log.warning(
                    "ignoring malformed watchdog environment WATCHDOG_USEC=%r WATCHDOG_PID=%r",
                    raw_usec,
                    raw_pid,
                )
            else:
                if usec > 0 and for_us:
                    watchdog_usec = usec
        return cls(address, watchdog_usec, logger=log)

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere (``NOTIFY_SOCKET`` was set)."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half the timeout, as sd_watchdog_enabled(3) advises,
        so one late ping does not get the service killed. None when no watchdog applies."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Sends ``fields`` (each ``KEY=VALUE``) as one datagram; True if it was delivered.

        Never raises. A field without ``=`` or containing a newline would corrupt the message,
        so such a call is rejected (logged and counted) instead of being sent.
        """
        if self.address is None or not fields:
            return False
        bad = [f for f in fields if "=" not in f or "\n" in f]
        if bad:
            self.errors += 1
            self._log.warning("sd_notify: refusing malformed fields %r", bad)
            return False
        payload = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Non-blocking: a supervisor with a full queue must not stall the event loop.
                sock.setblocking(False)
                sock.sendto(payload, _sockaddr(self.address))
        except (OSError, ValueError) as exc:
            self.errors += 1
            self._log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tells systemd start-up finished; dependent units start only after this."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status_field(status))

    def stopping(self) -> bool:
        """Tells systemd a shutdown has begun, so it does not read the exit as a crash."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Sets the one-line status shown by ``systemctl status``."""
        return self.notify(_status_field(text))

    def reloading(self) -> bool:
        """Tells systemd a configuration reload has begun; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` so systemd can tell this reload
        apart from an earlier one.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    async def run_watchdog(self, is_healthy: Callable[[], bool]) -> None:
        """Pings the systemd watchdog every :attr:`watchdog_interval` while healthy.

        Runs until cancelled; returns at once when no watchdog is configured. A tick on which
        ``is_healthy()`` is false (or raises) sends nothing: if the daemon stays unhealthy for
        the whole timeout systemd restarts it, and if it recovers in time the pings resume.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            try:
                healthy = is_healthy()
            except Exception:
                self._log.exception("watchdog health check raised; treating as unhealthy")
                healthy = False
            if healthy:
                self.notify("WATCHDOG=1")
            else:
                self._log.warning("unhealthy: withholding the systemd watchdog ping")
            await trio.sleep(interval)


def _sockaddr(address: str) -> str:
    """Maps ``NOTIFY_SOCKET`` to a socket address: ``@name`` is Linux's abstract namespace."""
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def _status_field(text: str) -> str:
    """STATUS is one line; a newline would start a new (bogus) assignment."""
    return "STATUS=" + " ".join(text.splitlines())
