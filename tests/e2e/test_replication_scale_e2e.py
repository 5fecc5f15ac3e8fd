"""Replication past the per-message limit on real daemons: a fresh daemon joins a cluster
holding more documents than one message may carry, and is filled page by page.

The limit is lowered (``replication.max_docs_per_message``, ``replication.page_docs``) so the
same situation as 100,000+ documents under the default limit runs in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshd.testing.localcluster import Daemon, LocalCluster
from meshd.testing.poll import eventually

DOCS = 150
LIMITS = (
    "--set",
    "replication.page_docs=20",
    "--set",
    "replication.max_docs_per_message=25",
)


async def digest(daemon: Daemon) -> dict[str, Any]:
    found: dict[str, Any] = await daemon.call("docs.digest")
    return found


async def test_a_fresh_daemon_joins_a_cluster_holding_more_documents_than_one_message(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path / "cluster", profile="local", extra_args=LIMITS)
    try:
        first = cluster.add("n1")
        second = cluster.add("n2", seeds=[first.addr])
        await cluster.wait_ready()
        await cluster.wait_converged()
        for i in range(DOCS):
            ops = [{"op": "set", "path": ["v"], "value": f"value {i} " + "x" * 200}]
            await (first if i % 2 else second).call(
                "state.update", {"doc": f"d{i:04d}", "ops": ops}
            )

        async def agreed(daemons: list[Daemon]) -> dict[str, Any] | None:
            found = [await digest(d) for d in daemons]
            if found[0]["count"] < DOCS or any(f["docs"] != found[0]["docs"] for f in found):
                return None
            return found[0]

        held = await eventually(lambda: agreed([first, second]), "n1 and n2 to agree", 30.0)
        assert held["count"] >= DOCS > 25

        fresh = cluster.add("n3", seeds=[first.addr])
        await cluster.wait_ready([fresh])
        await eventually(lambda: agreed([first, second, fresh]), "n3 to hold everything", 30.0)
        value = await fresh.call("state.get", {"doc": "d0149"})
        assert value["v"].startswith("value 149 ")
        for daemon in (first, second, fresh):
            # Every message stayed within the lowered bound: none was refused.
            assert "dropped malformed replication message" not in daemon.log_text()
    finally:
        cluster.stop_all()
