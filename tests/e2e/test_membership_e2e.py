"""Membership on real daemons: join, failure detection, leave, restart, signals, operator
removal, reaping, and rejoining through the peers snapshot."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys

import anyio
import pytest

from meshd.cli.meshctl import EXIT_UNREACHABLE
from meshd.testing.localcluster import LocalCluster


def meshctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshd.cli.meshctl", "--socket", sock, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_three_daemons_join_and_detect_a_killed_one(cluster: LocalCluster) -> None:
    a, b, c = cluster.start_many(3)
    await cluster.wait_ready()
    await cluster.wait_converged({"n1", "n2", "n3"})
    c.kill()
    await cluster.wait_status(["n1", "n2"], "n3", "dead", timeout=30)
    info = await a.call("info")
    assert info["members"]["dead"] == 1
    assert info["members"]["alive"] == 2
    # The survivors keep agreeing on each other.
    assert (await b.statuses())["n1"] == "alive"


async def test_sigterm_leaves_gracefully_and_exits_zero(cluster: LocalCluster) -> None:
    cluster.start_many(3)
    await cluster.wait_ready()
    await cluster.wait_converged()
    cluster["n2"].signal(signal.SIGTERM)
    assert cluster["n2"].wait(15) == 0
    await cluster.wait_status(["n1", "n3"], "n2", "left", timeout=15)
    assert "left" in cluster["n2"].log_text()


async def test_meshctl_tables_json_and_leave(cluster: LocalCluster) -> None:
    cluster.start_many(2)
    await cluster.wait_ready()
    await cluster.wait_converged()
    sock = cluster["n1"].socket_path
    table = await anyio.to_thread.run_sync(meshctl, sock, "members")
    assert table.returncode == 0, table.stderr
    assert "n1" in table.stdout and "n2" in table.stdout and "alive" in table.stdout
    as_json = await anyio.to_thread.run_sync(meshctl, sock, "--json", "members")
    rows = json.loads(as_json.stdout)
    assert {r["name"] for r in rows} == {"n1", "n2"}
    assert all(r["status"] == "alive" and ":" in r["addr"] for r in rows)
    info = json.loads((await anyio.to_thread.run_sync(meshctl, sock, "--json", "info")).stdout)
    assert info["node"] == "n1" and info["encrypted"] is True
    leave = await anyio.to_thread.run_sync(meshctl, cluster["n2"].socket_path, "leave")
    assert leave.returncode == 0
    assert cluster["n2"].wait(15) == 0
    await cluster.wait_status(["n1"], "n2", "left", timeout=15)


async def test_meshctl_reports_a_daemon_that_is_not_running(tmp_path: object) -> None:
    result = await anyio.to_thread.run_sync(meshctl, "/nonexistent/meshd.sock", "members")
    assert result.returncode == EXIT_UNREACHABLE  # 3: distinct from an error the daemon gave
    assert "unreachable" in result.stderr and "not running" in result.stderr


async def test_killed_daemon_restarts_and_rejoins_with_higher_incarnation(
    cluster: LocalCluster,
) -> None:
    cluster.start_many(3)
    await cluster.wait_ready()
    await cluster.wait_converged()
    victim = cluster["n3"]
    victim.kill()
    await cluster.wait_status(["n1", "n2"], "n3", "dead", timeout=30)
    victim.spawn()
    await cluster.wait_ready([victim])
    await cluster.wait_converged({"n1", "n2", "n3"}, timeout=30)
    members = {m["name"]: m for m in await cluster["n1"].call("members")}
    assert members["n3"]["incarnation"] >= 1  # the new process outbid its old death verdict


async def test_seed_retry_joins_when_the_seed_comes_up_later(cluster: LocalCluster) -> None:
    seed = cluster.add("seed", start=False)
    late = cluster.add("late", seeds=[seed.addr])
    info = await cluster.wait_answering(late)
    assert info["joined"] is False  # not ready: its only seed is down, it keeps retrying
    seed.spawn()
    await cluster.wait_ready()
    await cluster.wait_converged({"seed", "late"}, timeout=30)


@pytest.mark.parametrize("bad", [["--bind", "nonsense"], ["--set", "membership.nope=1"]])
def test_config_errors_name_the_key(tmp_path: object, bad: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshd", "run", "--name", "x", "--insecure", *bad],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    key = "node.bind" if "--bind" in bad else "membership.nope"
    assert key in result.stderr


def test_running_without_a_key_needs_insecure() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshd", "run", "--name", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "security.keys" in result.stderr and "insecure" in result.stderr


async def test_meshctl_remove_takes_a_dead_member_out_of_the_cluster(
    cluster: LocalCluster,
) -> None:
    cluster.start_many(3)
    await cluster.wait_ready()
    await cluster.wait_converged({"n1", "n2", "n3"})
    sock = cluster["n1"].socket_path
    refused = await anyio.to_thread.run_sync(meshctl, sock, "remove", "n2")
    assert refused.returncode == 1
    assert "conflict" in refused.stderr
    assert "only a dead member can be removed" in refused.stderr
    itself = await anyio.to_thread.run_sync(meshctl, sock, "remove", "n1")
    assert itself.returncode == 1 and "invalid" in itself.stderr
    unknown = await anyio.to_thread.run_sync(meshctl, sock, "remove", "nobody")
    assert unknown.returncode == 1 and "not_found" in unknown.stderr
    assert (await cluster["n2"].statuses())["n2"] == "alive"

    cluster["n3"].kill()
    await cluster.wait_status(["n1", "n2"], "n3", "dead", timeout=30)
    removed = await anyio.to_thread.run_sync(meshctl, sock, "--json", "remove", "n3")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout) == {"node": "n3", "status": "left", "removed": True}
    await cluster.wait_status(["n1", "n2"], "n3", "left", timeout=15)
    again = await anyio.to_thread.run_sync(meshctl, sock, "remove", "n3")
    assert again.returncode == 0 and "already left" in again.stdout
    info = await cluster["n1"].call("info")
    assert info["stats"]["removed"] == 1
    assert "member removed by an operator" in cluster["n1"].log_text()


async def test_a_dead_member_is_reaped_after_the_reconnect_timeout(cluster: LocalCluster) -> None:
    short = ["--set", "membership.reconnect_timeout=1s"]
    first = cluster.add("n1", extra=short)
    cluster.add("n2", seeds=[first.addr], extra=short)
    await cluster.wait_ready()
    await cluster.wait_converged({"n1", "n2"})
    cluster["n2"].kill()
    await cluster.wait_status(["n1"], "n2", "dead", timeout=30)
    with anyio.fail_after(30):
        while "n2" in await first.statuses():
            await anyio.sleep(0.2)
    assert "member reaped" in first.log_text()
    assert (await first.call("info"))["stats"]["reaped"] == 1


async def test_restarted_daemons_rejoin_through_the_peers_snapshot_without_seeds(
    cluster: LocalCluster,
) -> None:
    n1, n2, n3 = cluster.start_many(3)
    await cluster.wait_ready()
    await cluster.wait_converged({"n1", "n2", "n3"})
    data = {name: cluster.root / f"{name}.data" for name in ("n1", "n2", "n3")}
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in data.values())
    # The whole cluster stops at once: each daemon hears the others leave as it leaves.
    assert cluster.stop_all() == {"n1": 0, "n2": 0, "n3": 0}
    for name in ("n2", "n3"):
        peers = json.loads((data[name] / "peers.json").read_text())["peers"]
        assert {p["name"] for p in peers} == {"n1", "n2", "n3"} - {name}
    # n2 and n3 come back on their ports with no seed at all: the snapshot is all they have.
    n2 = cluster.add("n2", port=n2.port)
    n3 = cluster.add("n3", port=n3.port)
    assert not any(arg.startswith("--seed") for arg in n2.argv + n3.argv)
    await cluster.wait_ready([n2, n3])
    await cluster.wait_converged({"n2", "n3"})
    assert "rejoining through the peers snapshot" in n2.log_text()
    n1.spawn()  # never had seeds: finds the others through its own snapshot
    await cluster.wait_ready([n1])
    await cluster.wait_converged({"n1", "n2", "n3"})


async def test_a_bad_peers_snapshot_is_ignored_and_rejoin_can_be_turned_off(
    cluster: LocalCluster,
) -> None:
    solo = cluster.add("solo", start=False)
    (cluster.root / "solo.data").mkdir(mode=0o700)
    (cluster.root / "solo.data" / "peers.json").write_text("{not json")
    solo.spawn()
    await cluster.wait_ready([solo])
    log = solo.log_text()
    assert "ignoring the peers snapshot" in log and "solo.data/peers.json" in log
    # A valid snapshot naming a live member, ignored on request: the daemon starts alone.
    other = cluster.add("other", extra=["--no-rejoin"], start=False)
    (cluster.root / "other.data").mkdir(mode=0o700)
    (cluster.root / "other.data" / "peers.json").write_text(
        json.dumps(
            {"version": 1, "peers": [{"name": "solo", "host": "127.0.0.1", "port": solo.port}]}
        )
    )
    other.spawn()
    await cluster.wait_ready([other])
    assert await other.statuses() == {"other": "alive"}
    assert "rejoining" not in other.log_text()
