"""API ops for this node's store: its status, and a snapshot on demand."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from meshd.api.session import Session
from meshd_client.protocol import errors, messages

if TYPE_CHECKING:
    from meshd.node.node import Node


def _disk_bytes(directory: str) -> int:
    total = 0
    try:
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


def status(node: Node) -> dict[str, Any]:
    """What ``meshctl storage`` shows."""
    docs = len(node.replication_core.store)
    storage = node.storage
    if storage is None:
        return {"enabled": False, "documents": docs}
    store = storage.store
    fsync = storage.fsync
    return {
        "enabled": True,
        "directory": store.directory,
        "healthy": store.healthy,
        "failure": store.failure,
        "failure_detail": store.failure_detail,
        "last_error": storage.last_error,
        "documents": docs,
        "generation": store.generation,
        "disk_bytes": _disk_bytes(store.directory),
        "snapshot_bytes": store.snapshot_bytes,
        "log_bytes": store.log_bytes,
        "pending_bytes": store.pending_bytes,
        "appended": store.appended,
        "durable": store.durable,
        "last_sync": round(storage.last_sync_wall, 3),
        "last_snapshot": round(storage.last_snapshot_wall, 3),
        "commits": store.stats.commits,
        "snapshots": store.stats.snapshots,
        "fsync_mean_ms": round(1000 * fsync.total / fsync.n, 3) if fsync.n else None,
        "failures": dict(store.stats.failures),
        "dropped_records": store.stats.dropped_records,
        "acks_held": node.replication_driver.acks_held,
        "sync_interval": node.config.storage.sync_interval,
    }


def register(node: Node) -> None:
    api = node.api

    async def storage_status(_session: Session, _req: messages.Request) -> Any:
        return status(node)

    async def snapshot(_session: Session, _req: messages.Request) -> Any:
        if node.storage is None:
            raise errors.Invalid("storage is disabled on this node (storage.enabled = false)")
        if not await node.storage.snapshot():
            raise errors.Overloaded(
                f"snapshot failed: {node.storage.last_error}",
                detail={"storage": node.storage.store.failure or "io_error"},
            )
        return status(node)

    api.add_op(
        "storage", storage_status, "this node's store: size, health, last fsync", inline=True
    )
    api.add_op("storage.snapshot", snapshot, "write a snapshot of every document now")
