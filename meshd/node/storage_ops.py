"""API ops for this node's store: its status, and a snapshot on demand.

:class:`StorageOps` is given what it reads (the storage driver, if storage is enabled, the
replicas' store for the document count, the ACKs held for the disk, ``sync_interval``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from meshd.api.server import ApiServer
from meshd.api.session import Session
from meshd.replication.replica import DocStore
from meshd.storage import records
from meshd.storage.driver import StorageDriver
from meshd_client.protocol import errors, messages


def store_summary(storage: StorageDriver | None, documents: int) -> dict[str, Any]:
    """The store in a few fields (``meshctl storage`` has the rest); reads no files."""
    if storage is None:
        return {"enabled": False, "documents": documents}
    store = storage.store
    return {
        "enabled": True,
        "directory": store.directory,
        "healthy": store.healthy,
        "failure": store.failure,
        "documents": documents,
        "format": records.VERSION,
    }


def _disk_bytes(directory: str) -> int:
    total = 0
    try:
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


class StorageOps:
    """``storage`` (what ``meshctl storage`` shows) and ``storage.snapshot``."""

    def __init__(
        self,
        storage: StorageDriver | None,
        docs: DocStore,
        acks_held: Callable[[], int],
        sync_interval: float,
    ) -> None:
        self.storage = storage
        self.docs = docs
        self.acks_held = acks_held
        self.sync_interval = sync_interval

    def register(self, api: ApiServer) -> None:
        api.add_op(
            "storage", self.status_op, "this node's store: size, health, last fsync", inline=True
        )
        api.add_op("storage.snapshot", self.snapshot, "write a snapshot of every document now")

    def status(self) -> dict[str, Any]:
        summary = store_summary(self.storage, len(self.docs))
        storage = self.storage
        if storage is None:
            return summary
        store = storage.store
        fsync = storage.fsync
        return {
            **summary,
            "failure_detail": store.failure_detail,
            "last_error": storage.last_error,
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
            "acks_held": self.acks_held(),
            "sync_interval": self.sync_interval,
        }

    async def status_op(self, _session: Session, _req: messages.Request) -> Any:
        return self.status()

    async def snapshot(self, _session: Session, _req: messages.Request) -> Any:
        storage = self.storage
        if storage is None:
            raise errors.Invalid("storage is disabled on this node (storage.enabled = false)")
        if not await storage.snapshot():
            raise errors.Overloaded(
                f"snapshot failed: {storage.last_error}",
                detail={"storage": storage.store.failure or "io_error"},
            )
        return self.status()
