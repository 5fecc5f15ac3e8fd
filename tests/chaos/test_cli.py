"""The hand-driven flow of docs/chaos.md, through the real ``chaos`` command.

``chaos up`` returns and leaves the daemons running; each later command is a separate
process that attaches to the run directory's state. This is what an operator does:
up, partition, heal, check, down — plus the failures the checker must notice (a daemon that
died behind our back) and the clean-up after a harness that never wrote its cluster file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from chaos.disks import mount_fstype
from chaos.netns import existing_links, existing_namespaces
from meshd_client import Mesh, Overloaded
from meshd_client.connection import Connection
from meshd_client.protocol.errors import MeshError


class Chaos:
    def __init__(self, prefix: str, subnet: str, run_dir: Path) -> None:
        self.prefix, self.subnet, self.run_dir = prefix, subnet, run_dir

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> str:
        argv = [
            sys.executable,
            "-m",
            "chaos",
            "--prefix",
            self.prefix,
            "--run-dir",
            str(self.run_dir),
            *args,
        ]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise AssertionError(
                f"chaos {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
            )
        return res.stdout

    def leftovers(self) -> set[str]:
        names = {n for n in existing_namespaces() | existing_links() if n.startswith(self.prefix)}
        return names


@pytest.fixture
def chaos(host_layer: None, tmp_path: Path, unique_net: tuple[str, str]) -> Iterator[Chaos]:
    prefix, subnet = unique_net
    c = Chaos(prefix, subnet, tmp_path / "run")
    try:
        yield c
    finally:
        c("down", check=False)
        assert c.leftovers() == set()


def status(chaos: Chaos) -> dict:
    return json.loads(chaos("status", "--json"))


@pytest.mark.root
def test_up_partition_heal_check_down(chaos: Chaos) -> None:
    chaos("up", "4", "--subnet", chaos.subnet)
    st = status(chaos)
    assert sorted(st["hosts"]) == ["h1", "h2", "h3", "h4"]
    assert all(h["pid"] for h in st["hosts"].values())  # running after `up` returned
    chaos("partition", "h1,h2", "|", "h3,h4")
    assert status(chaos)["faults"]["groups"] == [["h1", "h2"], ["h3", "h4"]]
    chaos("partition", "--one-way", "h1", "->", "h3")
    assert status(chaos)["faults"]["blocks"] == [["h1", "h3"]]
    chaos("bridge", "--via", "h2", "h1", "|", "h3,h4")
    assert status(chaos)["faults"]["bridges"] == ["h2"]
    chaos("loss", "all", "10%")
    assert status(chaos)["faults"]["loss"] == {f"h{i}": 10 for i in range(1, 5)}
    time.sleep(3)
    chaos("heal")
    assert status(chaos)["faults"] == {
        "loss": {},
        "link_loss": [],
        "blocks": [],
        "groups": None,
        "bridges": [],
    }
    verdict = json.loads(chaos("check", "--json"))
    assert verdict["passed"], verdict
    names = {c["name"] for c in verdict["checks"]}
    assert {"membership", "documents", "no_crash", "rejections"} <= names
    chaos("down")
    assert chaos.leftovers() == set()
    assert not chaos.run_dir.exists()


@pytest.mark.root
def test_workload_then_kill_and_restart_then_check(chaos: Chaos) -> None:
    chaos("up", "3", "--subnet", chaos.subnet)
    workload = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chaos",
            "--prefix",
            chaos.prefix,
            "--run-dir",
            str(chaos.run_dir),
            "workload",
            "--duration",
            "12",
            "--seed",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4)
        chaos("kill", "h3")
        assert status(chaos)["hosts"]["h3"]["pid"] is None
        time.sleep(2)
        chaos("start", "h3")
        _, err = workload.communicate(timeout=120)
        assert workload.returncode == 0, err
    finally:
        if workload.poll() is None:
            workload.kill()
            workload.wait()
    verdict = json.loads(chaos("check", "--json"))
    failed = {c["name"]: c["summary"] for c in verdict["checks"] if not c["ok"]}
    assert verdict["passed"], failed
    assert {"majority_writes", "exactly_once"} <= {c["name"] for c in verdict["checks"]}


@pytest.mark.root
def test_a_daemon_that_dies_behind_our_back_fails_the_check(chaos: Chaos) -> None:
    chaos("up", "3", "--subnet", chaos.subnet)
    pid = status(chaos)["hosts"]["h2"]["pid"]
    os.kill(pid, signal.SIGKILL)  # not through `chaos kill`: nobody asked for this exit
    out = chaos("check", "--json", check=False)
    verdict = json.loads(out)
    failed = {c["name"] for c in verdict["checks"] if not c["ok"]}
    assert "no_crash" in failed


@pytest.mark.root
def test_down_cleans_up_after_a_harness_that_crashed(chaos: Chaos) -> None:
    chaos("up", "3", "--subnet", chaos.subnet)
    pids = [h["pid"] for h in status(chaos)["hosts"].values()]
    (chaos.run_dir / "cluster.json").unlink()  # as if `up` died before writing it
    chaos("down")
    assert chaos.leftovers() == set()
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


@pytest.mark.root
def test_refuses_a_subnet_the_machine_uses(chaos: Chaos) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "chaos",
            "--prefix",
            chaos.prefix,
            "--run-dir",
            str(chaos.run_dir),
            "up",
            "3",
            "--subnet",
            "127.0.0.0/24",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert "overlaps" in out.stderr
    assert chaos.leftovers() == set()


async def _write_until_refused(socket: str, tries: int = 200) -> MeshError:
    """Local writes through one daemon until its store refuses one (it notices a full disk
    at its next commit); the refusal."""
    async with Mesh.connect(socket, client="test") as mesh:
        doc = mesh.state("by-hand")
        for i in range(tries):
            try:
                await doc.update([{"op": "set", "path": [f"k{i}"], "value": i}], "local")
            except Overloaded as exc:
                return exc
            await anyio.sleep(0.05)
    raise AssertionError(f"{tries} writes accepted on a full disk")


async def _storage(socket: str) -> dict[str, Any]:
    async with Connection.open(socket, client="test", timeout=5) as conn:
        result: dict[str, Any] = await conn.call("storage", timeout=5)
        return result


@pytest.mark.root
def test_small_disk_fill_free_and_kill_all_by_hand(chaos: Chaos) -> None:
    chaos("up", "3", "--subnet", chaos.subnet, "--small-disk", "h2=8m")
    data = chaos.run_dir / "h2" / "data"
    assert mount_fstype(data) == "tmpfs"
    assert status(chaos)["disks"] == {"h2": {"size": 8 << 20, "full": False}}
    chaos("fill-disk", "h2")
    assert status(chaos)["disks"]["h2"]["full"]
    socket = str(chaos.run_dir / "h2" / "meshd.sock")
    refused = anyio.run(_write_until_refused, socket, backend="trio")
    assert refused.detail == {"storage": "disk_full"}
    assert anyio.run(_storage, socket, backend="trio")["failure"] == "disk_full"
    chaos("free-disk", "h2")
    assert not status(chaos)["disks"]["h2"]["full"]
    deadline = time.monotonic() + 60  # the daemon retries with back-off up to 30 s
    while not anyio.run(_storage, socket, backend="trio")["healthy"]:
        assert time.monotonic() < deadline, "the store did not recover by itself"
        time.sleep(0.5)
    chaos("kill-all")
    assert all(h["pid"] is None for h in status(chaos)["hosts"].values())
    chaos("heal", "--all")
    assert all(h["pid"] for h in status(chaos)["hosts"].values())
    verdict = json.loads(chaos("check", "--json"))
    failed = {c["name"]: c["summary"] for c in verdict["checks"] if not c["ok"]}
    assert verdict["passed"], failed
    storage = next(c for c in verdict["checks"] if c["name"] == "storage")
    assert "filled by hand" in storage["summary"]
    chaos("down")
    assert mount_fstype(data) is None
