"""meshctl for scripts, on real daemons: JSON output from every command, Serf-style member
filters, ``info``, and the documented exit statuses (0 ok, 1 error, 2 usage, 3 unreachable)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import anyio

from meshd.cli.meshctl import EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE
from meshd.testing.localcluster import Daemon, LocalCluster

ROOT = Path(__file__).resolve().parents[2]


async def meshctl(daemon: Daemon | str, *args: str) -> tuple[int, str, str]:
    socket = daemon if isinstance(daemon, str) else daemon.socket_path
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [sys.executable, "-m", "meshd.cli.meshctl", "--socket", socket, *args],
            check=False,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def start(cluster: LocalCluster) -> tuple[Daemon, Daemon, Daemon]:
    n1 = cluster.add("n1", tags={"role": "web", "zone": "a"})
    n2 = cluster.add("n2", seeds=[n1.addr], tags={"role": "db", "zone": "a"})
    n3 = cluster.add("w3", seeds=[n1.addr], tags={"role": "web"})
    await cluster.wait_ready(timeout=60)
    await cluster.wait_converged(timeout=60)
    return n1, n2, n3


def names(out: str) -> list[str]:
    return [m["name"] for m in json.loads(out)]


async def test_meshctl_for_scripts(cluster: LocalCluster) -> None:
    """One cluster of three (tagged) daemons for JSON output, filters and info."""
    n1, _, _ = await start(cluster)
    await every_command_prints_json(n1)
    await members_filters_follow_serf(n1)
    await info_shows_versions_uptime_and_store(n1, cluster.root)


async def every_command_prints_json(n1: Daemon) -> None:
    # One-shot commands that leave the cluster as it is. Each must print one JSON document
    # and exit 0 (health of a missing agent: 1, with JSON all the same).
    cases: list[tuple[list[str], int]] = [
        (["members"], EXIT_OK),
        (["info"], EXIT_OK),
        (["agents"], EXIT_OK),
        (["storage"], EXIT_OK),
        (["state", "list"], EXIT_OK),
        (["kinds"], EXIT_OK),
        (["keys", "list"], EXIT_OK),
        (["health", "nobody"], EXIT_ERROR),
        (["publish", "t.x", "1"], EXIT_OK),
    ]
    results: dict[int, tuple[int, str, str]] = {}

    async def one(i: int, args: list[str], flags: list[str]) -> None:
        results[i] = await meshctl(n1, *flags, *args)

    async with anyio.create_task_group() as tg:
        for i, (args, _) in enumerate(cases):
            # --format json before the command, --json after it: both are accepted anywhere.
            flags = ["--format", "json"] if i % 2 else []
            tail = [] if i % 2 else ["--json"]
            tg.start_soon(one, i, [*args, *tail], flags)
    for i, (args, code) in enumerate(cases):
        got, out, err = results[i]
        assert got == code, (args, got, err)
        json.loads(out)  # one JSON document, nothing else on stdout


async def members_filters_follow_serf(n1: Daemon) -> None:
    # The filter rules are unit-tested (tests/unit/test_meshctl.py); here, on a real table.
    code, out, err = await meshctl(n1, "members", "--json", "--tag", "role=web", "--name", "n.*")
    assert code == EXIT_OK, err
    assert names(out) == ["n1"]
    code, out, err = await meshctl(n1, "members", "--status", "alive", "--tag", "role=db")
    assert code == EXIT_OK, err
    assert "│ n2 " in out and "│ w3 " not in out and "│ n1 " not in out


async def info_shows_versions_uptime_and_store(n1: Daemon, root: Path) -> None:
    code, out, err = await meshctl(n1, "info", "--format", "json")
    assert code == EXIT_OK, err
    info = json.loads(out)
    assert info["node"] == "n1"
    assert info["version"] == "0.1.0"
    assert info["protocols"] == {
        "gossip": 1,
        "streams": 1,
        "replication": 2,
        "api": [1],
        "api_session": 1,
    }
    assert 0 < info["uptime_s"] < 600
    store = info["store"]
    assert store["enabled"] is True and store["healthy"] is True
    assert store["directory"] == str(root / "n1.data" / "store")
    assert store["documents"] >= 0
    code, out, err = await meshctl(n1, "info")
    assert code == EXIT_OK, err
    for row in ("version", "protocols", "gossip 1", "uptime_s", "store", "ok,"):
        assert row in out, row


async def test_exit_statuses(cluster: LocalCluster, tmp_path: Path) -> None:
    (n1,) = cluster.start_many(1)
    await cluster.wait_ready()
    # 1: the daemon answered with an error.
    code, _, err = await meshctl(n1, "request", "nobody")
    assert code == EXIT_ERROR and err.startswith("meshctl: not_found:"), err
    # 2 (usage) is unit-tested: it never reaches a daemon.
    # 3: nothing at the socket path; a socket nobody listens on (the daemon was killed).
    code, out, err = await meshctl(str(tmp_path / "none.sock"), "info")
    assert (code, out) == (EXIT_UNREACHABLE, ""), err
    assert err.startswith("meshctl: unreachable:")
    n1.signal(signal.SIGKILL)
    assert n1.wait(10) is not None
    assert Path(n1.socket_path).exists()  # left behind by the kill
    code, _, err = await meshctl(n1, "members", "--json")
    assert code == EXIT_UNREACHABLE, err
