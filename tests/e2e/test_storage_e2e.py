"""The store on real daemons: a full disk, a corrupt store and the way out, one daemon per
data directory, and what meshctl shows."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from meshd.storage.store import log_name
from meshd.testing.localcluster import Daemon, LocalCluster
from meshd.testing.poll import eventually
from meshd_client import Mesh, Overloaded


def meshd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshd", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def meshctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshd.cli.meshctl", "--socket", daemon.socket_path, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def data_dir(cluster: LocalCluster, name: str) -> Path:
    return cluster.root / f"{name}.data"


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of ``size`` mounted at ``path`` (this test's own directory), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> int:
    """Write zeros into ``path`` until the file system is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            try:
                written += f.write(chunk) or 0
            except OSError:
                break
            if written > 1 << 30:  # bounded: a tmpfs this test sized never gets here
                break
        with contextlib.suppress(OSError):
            f.write(b"\0" * 512)
    return written


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs as a full disk")
async def test_a_full_disk_refuses_writes_keeps_serving_and_recovers_by_itself(
    cluster: LocalCluster,
) -> None:
    full = data_dir(cluster, "n2")
    with small_disk(full, "4m"):
        daemons = cluster.start_many(3)
        await cluster.wait_ready()
        await cluster.wait_converged()
        n2 = daemons[1]
        async with Mesh.connect(n2.socket_path) as mesh:
            doc = mesh.state("ledger")
            await doc.set("before", 1, durability="majority")
            filler = full / "filler"
            await anyio.to_thread.run_sync(fill, filler)

            async def refused() -> Overloaded | None:
                try:
                    await doc.set("during", 1, durability="majority")
                except Overloaded as exc:
                    return exc
                return None

            error = await eventually(refused, "a write refused for lack of disk", 15)
            assert error.detail["storage"] in ("disk_full", "failing")
            status = await n2.call("storage")
            assert not status["healthy"] and status["failure"] == "disk_full"
            assert meshctl(n2, "storage").returncode == 1
            # Reads, membership and the other members go on.
            assert await doc.get("before") == 1
            assert (await n2.statuses()) == {"n1": "alive", "n2": "alive", "n3": "alive"}
            async with Mesh.connect(daemons[0].socket_path) as other:
                await other.state("ledger").set("elsewhere", 1, durability="majority")
            # Space comes back: the store recovers by itself through a snapshot.
            filler.unlink()

            async def healthy() -> bool | None:
                return True if (await n2.call("storage"))["healthy"] else None

            await eventually(healthy, "the store to recover once space came back", 60)
            await doc.set("after", 1, durability="majority")
        n2.kill()
        n2.wait(10)
        n2.spawn()
        await cluster.wait_answering(n2)
        got = await n2.call("state.get", {"doc": "ledger"})
        assert {"before", "after"} <= set(got)
        cluster.stop_all()


async def test_a_corrupt_store_stops_the_daemon_with_the_way_out(cluster: LocalCluster) -> None:
    (n1,) = cluster.start_many(1)
    await cluster.wait_ready()
    async with Mesh.connect(n1.socket_path) as mesh:
        for i in range(20):
            await mesh.state(f"doc{i}").set("k", i)
        await mesh.state("marker").set("m", 1, durability="majority")
    snapshot = await n1.call("storage.snapshot")
    assert snapshot["snapshots"] >= 1
    n1.kill()
    n1.wait(10)
    store = data_dir(cluster, "n1") / "store"
    victim = next(p for p in sorted(store.iterdir()) if p.suffix == ".msnap")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    n1.spawn()
    assert n1.wait(30) == 1
    log = n1.log_text()
    assert victim.name in log and "meshd storage repair" in log
    # check names the damage, changing nothing; repair quarantines and rebuilds.
    checked = meshd("storage", "check", "--data-dir", str(data_dir(cluster, "n1")))
    assert checked.returncode == 1 and victim.name in json.loads(checked.stdout)["problem"]
    repaired = meshd("storage", "repair", "--data-dir", str(data_dir(cluster, "n1")))
    assert repaired.returncode == 0, repaired.stderr
    report = json.loads(repaired.stdout)
    assert (Path(report["quarantine"]) / victim.name).exists()
    assert meshd("storage", "check", "--data-dir", str(data_dir(cluster, "n1"))).returncode == 0
    n1.spawn()
    await cluster.wait_answering(n1)
    # What checked out came back (the corrupted half of the snapshot may not have).
    assert len(await n1.call("state.list")) >= 1


async def test_one_daemon_per_data_directory(cluster: LocalCluster) -> None:
    (n1,) = cluster.start_many(1)
    await cluster.wait_ready()
    twin = cluster.add("twin", extra=["--data-dir", str(data_dir(cluster, "n1"))])
    assert twin.wait(30) == 2
    assert "another process uses this store" in twin.log_text()
    assert n1.running()


async def test_meshctl_storage_shows_the_store(cluster: LocalCluster) -> None:
    (n1,) = cluster.start_many(1)
    await cluster.wait_ready()
    async with Mesh.connect(n1.socket_path) as mesh:
        await mesh.state("doc").set("k", 1, durability="majority")
    shown = meshctl(n1, "storage")
    assert shown.returncode == 0, shown.stderr
    assert "health" in shown.stdout and "ok" in shown.stdout and "last fsync" in shown.stdout
    status = json.loads(meshctl(n1, "--json", "storage").stdout)
    assert status["healthy"] and status["documents"] >= 2 and status["disk_bytes"] > 0
    assert status["directory"].endswith("n1.data/store")
    snap = json.loads(meshctl(n1, "--json", "storage", "snapshot").stdout)
    assert snap["snapshots"] == status["snapshots"] + 1
    assert log_name(snap["generation"]) in os.listdir(status["directory"])
