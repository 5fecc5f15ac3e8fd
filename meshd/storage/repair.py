"""``meshd storage check`` and ``meshd storage repair``: the way out of a damaged store.

``check`` reads the store as recovery would, changing nothing, and says what it found.
``repair`` is for a store recovery refuses (a corrupt snapshot or log, missing files): it
reads every record that still checks out from every file, moves the originals aside to a
quarantine directory next to the store (nothing is deleted), and writes a fresh store from
what it salvaged. The node then starts from that and anti-entropy brings back from its peers
whatever was lost — which, for every ``majority`` write, a majority of the cluster holds.
Run either with the daemon stopped (the store's lock says if it is running).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from pycrdt import merge_updates

from meshd.storage import records
from meshd.storage.files import FileSystem, StoreLocked
from meshd.storage.store import _NAME, DocHistory, Store, StoreCorrupt, replay


@dataclass(slots=True)
class CheckReport:
    ok: bool
    directory: str
    problem: str = ""
    documents: int = 0
    snapshot: str | None = None
    logs: list[str] = field(default_factory=list)
    bytes: int = 0
    torn: str | None = None
    leftovers: list[str] = field(default_factory=list)
    in_use: bool = False


def check(files: FileSystem, directory: str) -> CheckReport:
    try:
        lock = files.lock(os.path.join(directory, "LOCK"))
    except StoreLocked:
        in_use = True
    except FileNotFoundError:
        return CheckReport(False, directory, problem="no store here")
    else:
        in_use = False
        lock.close()
    store = Store(files, directory)
    try:
        found = store.recover(read_only=True)
    except StoreCorrupt as exc:
        return CheckReport(False, directory, problem=str(exc), in_use=in_use)
    except OSError as exc:
        return CheckReport(False, directory, problem=f"cannot read: {exc}", in_use=in_use)
    return CheckReport(
        True,
        directory,
        documents=len(found.docs),
        snapshot=found.snapshot,
        logs=found.logs,
        bytes=found.bytes_read,
        torn=found.torn,
        leftovers=found.removed,
        in_use=in_use,
    )


@dataclass(slots=True)
class RepairReport:
    quarantine: str
    documents: int
    files: dict[str, str]  # file -> what was read from it
    unmergeable: list[str] = field(default_factory=list)


def salvage(files: FileSystem, directory: str) -> tuple[dict[str, DocHistory], dict[str, str]]:
    """Every record that checks out, from every file, in generation order (a snapshot
    before the log of its generation); per file, what was read."""
    ordered: list[tuple[int, int, str]] = []
    for name in files.listdir(directory):
        m = _NAME.match(name)
        if m is not None:
            ordered.append((int(m.group(2)), 0 if m.group(1) == "snapshot" else 1, name))
    docs: dict[str, DocHistory] = {}
    notes: dict[str, str] = {}
    for _, _, name in sorted(ordered):
        scanned = records.scan(files.read(os.path.join(directory, name)))
        body = [r for r in scanned.records if isinstance(r, records.Update | records.Drop)]
        replay(docs, body)
        notes[name] = f"{len(body)} records" + (
            f", then stopped: {scanned.problem}" if scanned.problem else ""
        )
    return docs, notes


def repair(files: FileSystem, directory: str) -> RepairReport:
    lock = files.lock(os.path.join(directory, "LOCK"))  # refuses while a daemon runs
    try:
        docs, notes = salvage(files, directory)
        quarantine = f"{directory.rstrip('/')}.quarantine-{time.strftime('%Y%m%dT%H%M%S')}"
        files.makedirs(quarantine)
        for name in files.listdir(directory):
            if name != "LOCK":
                files.rename(os.path.join(directory, name), os.path.join(quarantine, name))
        files.sync_dir(quarantine)
        files.sync_dir(directory)
    finally:
        lock.close()
    merged: list[tuple[str, int, bytes]] = []
    unmergeable: list[str] = []
    for name, history in sorted(docs.items()):
        try:
            update = bytes(merge_updates(*history.updates)) if history.updates else b""
        except (ValueError, RuntimeError):
            unmergeable.append(name)
            continue
        merged.append((name, history.epoch, update))
    store = Store(files, directory)
    try:
        store.recover()
        if not store.snapshot_now(lambda: merged):
            raise OSError(store.failure_detail or "the repaired snapshot could not be written")
    finally:
        store.close()
    return RepairReport(quarantine, len(merged), notes, unmergeable)
