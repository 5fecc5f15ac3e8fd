"""sd_notify against real AF_UNIX datagram sockets (filesystem and abstract namespace)."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from meshd.systemd import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2.0)
        yield sock, path


def drain(sock: socket.socket) -> list[str]:
    """Every datagram already queued on ``sock``."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2.0)


def test_ready_without_status(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready() is True
    assert sock.recv(4096) == b"READY=1"
    assert (n.sent, n.errors) == (1, 0)


def test_ready_with_status(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    Notifier.from_env({"NOTIFY_SOCKET": path}).ready("joined 3 peers")
    assert sock.recv(4096) == b"READY=1\nSTATUS=joined 3 peers"


def test_stopping_and_status(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.stopping()
    n.status("draining")
    assert drain(sock) == ["STOPPING=1", "STATUS=draining"]


def test_status_newlines_cannot_inject_assignments(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    Notifier.from_env({"NOTIFY_SOCKET": path}).status("line one\nREADY=1")
    assert sock.recv(4096) == b"STATUS=line one READY=1"


def test_reloading_sends_monotonic_usec(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier.from_env({"NOTIFY_SOCKET": path}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_custom_fields_in_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    Notifier.from_env({"NOTIFY_SOCKET": path}).notify("A=1", "B=2")
    assert drain(sock) == ["A=1\nB=2"]


def test_malformed_fields_are_refused_not_sent(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    with caplog.at_level(logging.WARNING, logger="meshd.systemd"):
        assert n.notify("READY=1", "no-equals") is False
        assert n.notify("A=1\nB=2") is False
    assert drain(sock) == []
    assert n.errors == 2
    assert "malformed" in caplog.text


def test_abstract_namespace_socket() -> None:
    name = f"meshd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_missing_notify_socket_is_a_noop() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "2000000"})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.stopping() is False
    assert n.status("x") is False
    assert n.reloading() is False
    assert n.notify("A=1") is False
    assert n.watchdog_interval is None
    assert (n.sent, n.errors) == (0, 0)


def test_empty_notify_socket_is_a_noop() -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled


def test_nonexistent_socket_path_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    with caplog.at_level(logging.WARNING, logger="meshd.systemd"):
        assert n.ready() is False
        assert n.stopping() is False
    assert n.errors == 2
    assert n.sent == 0
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_socket_path_that_is_not_a_socket_does_not_raise(tmp_path: Path) -> None:
    plain = tmp_path / "plain-file"
    plain.write_text("")
    n = Notifier.from_env({"NOTIFY_SOCKET": str(plain)})
    assert n.ready() is False
    assert n.errors == 1


def test_receiver_gone_does_not_raise(tmp_path: Path) -> None:
    path = str(tmp_path / "gone.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
    # The path still exists but nobody is bound to it any more: ECONNREFUSED.
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.ready() is False
    assert n.errors == 1


def test_watchdog_interval_is_half_the_timeout(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert n.watchdog_interval == 1.5


def test_watchdog_pid_of_this_process_enables_it(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval == 0.5


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "me"},
        {},
    ],
)
def test_watchdog_disabled(receiver: tuple[socket.socket, str], extra: dict[str, str]) -> None:
    _, path = receiver
    assert Notifier.from_env({"NOTIFY_SOCKET": path, **extra}).watchdog_interval is None


async def test_run_watchdog_returns_at_once_when_disabled(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with trio.fail_after(1):
        await Notifier.from_env(env).run_watchdog(lambda: True)
    assert drain(sock) == []


async def test_watchdog_pings_at_half_the_timeout(
    autojump_clock: trio.testing.MockClock, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    arrivals: list[float] = []
    tsock = trio.socket.from_stdlib_socket(sock)

    async def listen() -> None:
        while True:
            data = await tsock.recv(4096)
            assert data == b"WATCHDOG=1"
            arrivals.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        start = trio.current_time()
        nursery.start_soon(n.run_watchdog, lambda: True)
        await trio.sleep(10.5)
        nursery.cancel_scope.cancel()

    assert [round(t - start, 6) for t in arrivals] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert n.sent == 6


async def test_watchdog_withholds_pings_while_unhealthy(
    autojump_clock: trio.testing.MockClock, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    healthy = True

    def is_healthy() -> bool:
        return healthy

    async with trio.open_nursery() as nursery:
        nursery.start_soon(n.run_watchdog, is_healthy)
        await trio.sleep(2.5)  # pings at 0, 1, 2
        assert len(drain(sock)) == 3
        healthy = False
        await trio.sleep(3.0)  # ticks at 3, 4, 5 withheld
        assert drain(sock) == []
        healthy = True
        await trio.sleep(1.0)  # tick at 6 pings again
        assert drain(sock) == ["WATCHDOG=1"]
        nursery.cancel_scope.cancel()


async def test_watchdog_health_check_that_raises_counts_as_unhealthy(
    autojump_clock: trio.testing.MockClock, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})

    def broken() -> bool:
        raise RuntimeError("health check bug")

    with trio.move_on_after(3.5):
        await n.run_watchdog(broken)
    assert drain(sock) == []


async def test_watchdog_survives_a_missing_socket(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "absent.sock"), "WATCHDOG_USEC": "2000000"}
    n = Notifier.from_env(env)
    with trio.move_on_after(3.5):
        await n.run_watchdog(lambda: True)
    assert n.errors == 4
