"""Operations on real daemons: sd_notify, SIGHUP reload, metrics, socket permissions."""

from __future__ import annotations

import errno
import os
import pwd
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import anyio
import pytest

from meshd.testing.localcluster import LocalCluster, free_port
from meshd.testing.poll import eventually
from meshd_client.protocol import messages
from meshd_client.protocol.framing import FrameDecoder, encode_frame


async def _true_if(condition: bool) -> bool | None:
    return True if condition else None


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
        messages: list[str] = []

        async def pinged() -> bool | None:
            messages.extend(drain(sock))
            return True if sum(m == "WATCHDOG=1" for m in messages) >= 3 else None

        await eventually(pinged, "three watchdog pings", 10)
        assert any(m.startswith("READY=1") for m in messages), messages
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
        # It runs and answers, has tried its seed and failed: still not ready.
        await cluster.wait_answering(late)

        async def tried() -> bool | None:
            return True if (await late.call("info"))["stats"]["join_failures"] >= 1 else None

        await eventually(tried, "a first join attempt that found no seed", 10)
        assert (await late.call("info"))["joined"] is False
        assert not any(m.startswith("READY=1") for m in drain(sock))
        seed.spawn()
        await cluster.wait_ready([late])
        seen: list[str] = []

        async def ready() -> bool | None:
            seen.extend(drain(sock))
            return True if any(m.startswith("READY=1") for m in seen) else None

        await eventually(ready, "READY=1 after the join", 10)


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
    await eventually(
        lambda: _true_if("reload failed" in b.log_text()), "the failed reload logged", 10
    )
    assert b.running()


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


def _call_as_nobody(directory: Path, socket_name: str, op: str) -> str:
    """Speak the API protocol to ``directory/socket_name`` from a forked child that dropped to
    uid/gid "nobody", and return what happened as one line: ``ok <node>``, ``error <kind>
    <message>`` or ``oserror <errno name>``.

    Two things make this independent of where the checkout and the temporary directories
    live. The child enters ``directory`` while it is still root and connects by a relative
    name, so the permissions of the directories above it never matter. And it imports nothing
    after dropping privileges (everything it runs is loaded here, before the fork), so the
    virtual environment need not be readable by "nobody"."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        line = "child failed"
        try:
            os.chdir(directory)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            line = _exchange(socket_name, op)
        except BaseException as exc:
            line = f"child raised {exc!r}"
        finally:
            os.write(write_end, line.encode())
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


def _exchange(socket_name: str, op: str) -> str:
    """Hello, then one request, on a blocking socket (runs in the unprivileged child)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(socket_name)
    except OSError as exc:
        sock.close()
        return f"oserror {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    decoder = FrameDecoder()
    with sock:
        sock.sendall(encode_frame(messages.hello("nobody-test")))
        sock.sendall(encode_frame(messages.request(1, op, {})))
        while True:
            frame = decoder.next_frame()
            if frame is None:
                data = sock.recv(65536)
                if not data:
                    return "closed"
                decoder.feed(data)
                continue
            if frame.get("t") == "res" and frame.get("ok") is False:
                error = frame.get("error") or {}
                return f"error {error.get('kind')} {error.get('message')}"
            if frame.get("t") == "res" and frame.get("id") == 1:
                return f"ok {frame['value']['node']}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_socket_permissions_and_peer_credentials(cluster: LocalCluster) -> None:
    # Only the directory holding the sockets must let "nobody" in (it is this test's own);
    # the directories above it are neither needed nor touched (see _call_as_nobody).
    os.chmod(cluster.root, 0o711)
    closed = cluster.add("closed")  # default mode 0660: nobody cannot even connect
    open_mode = cluster.add("open", extra=["--set", "api.mode=0666"])
    await cluster.wait_ready()
    assert oct(os.stat(closed.socket_path).st_mode & 0o777) == "0o660"
    out = await anyio.to_thread.run_sync(_call_as_nobody, cluster.root, "closed.sock", "members")
    assert out == "oserror EACCES", out
    # The socket is world-writable, but the daemon checks SO_PEERCRED against its allow list.
    out = await anyio.to_thread.run_sync(_call_as_nobody, cluster.root, "open.sock", "members")
    assert out.startswith("error unauthorized ") and "uid" in out, out
    info = await open_mode.call("info")
    assert info["node"] == "open"
    allowed = cluster.add(
        "allowed",
        extra=["--set", "api.mode=0666", f"--set=api.allow_uids={pwd.getpwnam('nobody').pw_uid}"],
    )
    await cluster.wait_ready([allowed])
    out = await anyio.to_thread.run_sync(_call_as_nobody, cluster.root, "allowed.sock", "info")
    assert out == "ok allowed", out
    # What an operator sees from meshctl (as this user, who may use every socket).
    done = await anyio.run_process(
        [sys.executable, "-m", "meshd.cli.meshctl", "--socket", allowed.socket_path, "info"],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "allowed" in done.stdout.decode()


def _run_daemon(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Start a daemon that is expected to refuse to start; returns how it exited."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshd",
            "run",
            "--insecure",
            "--name",
            "x",
            "--profile",
            "local",
            "--data-dir",
            str(tmp_path / "x.data"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_start_up_errors_are_one_line_and_exit_2(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    metrics_port = free_port()
    running = cluster.add("running", extra=[f"--metrics-bind=127.0.0.1:{metrics_port}"])
    await cluster.wait_ready()
    regular = tmp_path / "file"
    regular.write_text("precious")
    cases = [
        # A socket under a regular file, and one under /proc.
        (["--bind", "127.0.0.1:0", "--socket", str(regular / "x.sock")], str(regular)),
        (["--bind", "127.0.0.1:0", "--socket", "/proc/meshd/x.sock"], "/proc/meshd"),
        # A second daemon on the same socket.
        (["--bind", "127.0.0.1:0", "--socket", running.socket_path], "another daemon"),
        # The gossip port in use, and the metrics port in use: named.
        (
            ["--bind", f"127.0.0.1:{running.port}", "--socket", str(tmp_path / "a.sock")],
            f"127.0.0.1:{running.port}",
        ),
        (
            [
                "--bind",
                "127.0.0.1:0",
                "--socket",
                str(tmp_path / "b.sock"),
                f"--metrics-bind=127.0.0.1:{metrics_port}",
            ],
            f"127.0.0.1:{metrics_port}",
        ),
        # A regular file where the socket goes: refused, and the file is kept.
        (["--bind", "127.0.0.1:0", "--socket", str(regular)], "not a socket"),
    ]
    for args, named in cases:
        done = await anyio.to_thread.run_sync(lambda a=args: _run_daemon(tmp_path, *a))
        lines = [line for line in done.stderr.splitlines() if line.startswith("meshd:")]
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (args, done.stderr[-2000:])
        assert len(lines) == 1 and named in lines[0], (args, done.stderr[-2000:])
    assert regular.read_text() == "precious"
    assert running.running()
