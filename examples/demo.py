"""`make demo`: a 5-node meshd mesh on loopback; kill one daemon and watch the others notice.

Everything is real: five daemon processes, encrypted gossip on 127.0.0.1, and the tables are
printed by the real `meshctl` talking to each daemon's Unix socket.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from rich.console import Console
from rich.rule import Rule

from meshd.testing.localcluster import LocalCluster

console = Console()


def meshctl(socket_path: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "meshd.cli.meshctl", "--socket", socket_path, *args], check=False
    )


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="meshd-demo-"))
    with LocalCluster(root, profile="local") as cluster:
        console.print(Rule("[bold]meshd demo: a 5-node mesh on loopback"))
        console.print(f"run directory: {root} (logs: n1.log … n5.log)")
        daemons = cluster.start_many(5)
        await cluster.wait_ready()
        await cluster.wait_converged()
        console.print("all five daemons joined; every one sees all five alive:\n")
        meshctl(daemons[0].socket_path, "members")

        victim = daemons[2]
        console.print(Rule(f"[bold red]kill -9 {victim.name} (pid {victim.pid})"))
        killed_at = time.monotonic()
        victim.kill()
        survivors = [d.name for d in daemons if d is not victim]
        seen = await cluster.wait_status(survivors, victim.name, "dead", timeout=60)
        for name, at in sorted(seen.items(), key=lambda kv: kv[1]):
            console.print(f"  {name} marked {victim.name} dead after {at - killed_at:.2f} s")
        console.print()
        meshctl(daemons[0].socket_path, "members")
        console.print(Rule("[bold]graceful leave of n5 (meshctl leave)"))
        meshctl(daemons[4].socket_path, "leave")
        await cluster.wait_status(["n1", "n2", "n4"], "n5", "left", timeout=30)
        meshctl(daemons[1].socket_path, "members")
        codes = cluster.stop_all()
        console.print(f"stopped; exit codes: {codes}")


if __name__ == "__main__":
    anyio.run(main)
