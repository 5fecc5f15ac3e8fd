"""Operations on real daemons: sd_notify, SIGHUP reload, metrics, socket permissions."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import anyio
import pytest

from meshd.testing.localcluster import LocalCluster, free_port


def notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out


async def test_sd_notify_ready_watchdog_and_stopping(cluster: LocalCluster, tmp_path: Path) -> None:
    sock = notify_socket(tmp_path / "notify")
    with sock:
        daemon = cluster.add("svc", start=False)
        daemon.env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
        daemon.env["WATCHDOG_USEC"] = "400000"  # 0.4 s: pings every 0.2 s
        daemon.spawn()
        await cluster.wait_ready([daemon])
        await anyio.sleep(1.0)
        messages = drain(sock)
        assert any(m.startswith("READY=1") for m in messages), messages
        assert sum(m == "WATCHDOG=1" for m in messages) >= 3, messages
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
        assert "STOPPING=1" in drain(sock)


async def test_ready_waits_for_the_join(cluster: LocalCluster, tmp_path: Path) -> None:
    sock = notify_socket(tmp_path / "notify")
    with sock:
        seed = cluster.add("seed", start=False)
        late = cluster.add("late", seeds=[seed.addr], start=False)
        late.env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
        late.spawn()
        await anyio.sleep(1.5)
        assert not any(m.startswith("READY=1") for m in drain(sock))
        seed.spawn()
        await cluster.wait_ready([late])
        await anyio.sleep(0.3)
        assert any(m.startswith("READY=1") for m in drain(sock))


async def test_sighup_reloads_tags_and_others_see_the_update(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    a = cluster.add("a")
    conf = tmp_path / "b.toml"
    conf.write_text('[node]\ntags = { role = "web" }\n')
    b = cluster.add("b", seeds=[a.addr], extra=[f"--config={conf}"])
    await cluster.wait_ready()
    await cluster.wait_converged({"a", "b"})
    conf.write_text('[node]\ntags = { role = "db", zone = "z1" }\n')
    b.signal(signal.SIGHUP)
    with anyio.fail_after(15):
        while True:
            members = {m["name"]: m for m in await a.call("members")}
            if members["b"]["tags"] == {"role": "db", "zone": "z1"}:
                break
            await anyio.sleep(0.1)
    assert members["b"]["incarnation"] >= 1
    assert "configuration reloaded" in b.log_text()
    # A broken file on reload keeps the running configuration.
    conf.write_text("[node]\nnonsense = 1\n")
    b.signal(signal.SIGHUP)
    await anyio.sleep(0.5)
    assert b.running()
    assert "reload failed" in b.log_text()


async def test_metrics_endpoint_serves_prometheus_text(cluster: LocalCluster) -> None:
    port = free_port()
    a = cluster.add("a", extra=[f"--metrics-bind=127.0.0.1:{port}"])
    cluster.add("b", seeds=[a.addr])
    await cluster.wait_ready()
    await cluster.wait_converged({"a", "b"})

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = await anyio.to_thread.run_sync(fetch)
    assert 'meshd_members{status="alive"} 2' in text
    assert "# TYPE meshd_membership_probes_total counter" in text
    assert "meshd_transport_udp_packets_in_total" in text
    assert "meshd_api_requests_total" in text
    for family in (
        'meshd_links_frames_queued_total{channel="replication"}',
        'meshd_links_frames_queued_total{channel="routing"}',
        "meshd_routing_forwarded_total",
        "meshd_placement_majority",
        "meshd_reminders_fired_total",
        "meshd_compaction_compactions_total",
    ):
        assert family in text, family


def _meshctl_as_nobody(args: list[str]) -> tuple[int, str]:
    """Run meshctl's main() in a forked child that dropped to uid/gid "nobody".

    Forking (no exec) because "nobody" may not be able to execute this interpreter."""
    nobody = pwd.getpwnam("nobody")
    # The child cannot read this interpreter's files after dropping privileges: import
    # everything meshctl needs first.
    import pickle  # noqa: F401 - only to preload; nothing is unpickled

    import anyio._backends._asyncio  # noqa: F401

    from meshd.cli import meshctl  # noqa: F401

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            # pytest replaced sys.stdout/err with capture objects; write to the pipe instead.
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            from meshd.cli.meshctl import main

            code = main(args)
        except BaseException as exc:
            os.write(2, repr(exc).encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_socket_permissions_and_peer_credentials(cluster: LocalCluster) -> None:
    # Let "nobody" reach the socket directories (pytest's tmp dirs are 0700).
    path = cluster.root
    while path != path.parent:
        os.chmod(path, os.stat(path).st_mode | 0o011)
        path = path.parent
    closed = cluster.add("closed")  # default mode 0660: nobody cannot even connect
    open_mode = cluster.add("open", extra=["--set", "api.mode=0666"])
    await cluster.wait_ready()
    assert oct(os.stat(closed.socket_path).st_mode & 0o777) == "0o660"
    code, out = await anyio.to_thread.run_sync(
        _meshctl_as_nobody, ["--socket", closed.socket_path, "members"]
    )
    assert code == 1, out
    assert "unauthorized" in out and "permission denied" in out
    # The socket is world-writable, but the daemon checks SO_PEERCRED against its allow list.
    code, out = await anyio.to_thread.run_sync(
        _meshctl_as_nobody, ["--socket", open_mode.socket_path, "members"]
    )
    assert code == 1, out
    assert "unauthorized" in out and "uid" in out
    info = await open_mode.call("info")
    assert info["node"] == "open"
    allowed = cluster.add(
        "allowed",
        extra=["--set", "api.mode=0666", f"--set=api.allow_uids={pwd.getpwnam('nobody').pw_uid}"],
    )
    await cluster.wait_ready([allowed])
    code, out = await anyio.to_thread.run_sync(
        _meshctl_as_nobody, ["--socket", allowed.socket_path, "info"]
    )
    assert code == 0, out
    assert "allowed" in out
