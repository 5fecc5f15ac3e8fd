"""The daemon's write path under trio: the replication driver persists every change through
the storage driver, holds ACKs until they are fsynced, and reports a majority write only once
it is on this node's disk. Real pycrdt documents, the real store on a simulated disk."""

from __future__ import annotations

import logging
import random

import trio
from pycrdt import Map

from meshd.config.model import StorageTuning
from meshd.replication.core import ReplicationTuning, Replicator
from meshd.replication.driver import ReplicationDriver
from meshd.replication.messages import Ack, Push
from meshd.replication.replica import Replica
from meshd.sim.disk import SimDisk
from meshd.storage.driver import StorageDriver
from meshd.storage.store import Store

DOC = "state/doc"
log = logging.getLogger("test")


class Links:
    """Stands in for the peer links: records what the driver hands over."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def send(self, peer: str, frame: bytes) -> bool:
        self.sent.append((peer, frame))
        return True


def build(disk: SimDisk, sync_interval: float = 0.05) -> tuple[ReplicationDriver, Links]:
    core = Replicator(node="a", tuning=ReplicationTuning(), rng=random.Random(1), now=0.0)
    store = Store(disk, "/data/store")
    store.recover()

    def encode(name: str) -> tuple[int, bytes] | None:
        replica = core.store.get(name)
        return None if replica is None else (replica.epoch, replica.full_update())

    storage = StorageDriver(
        store,
        StorageTuning(sync_interval=sync_interval),
        log,
        names=lambda: [r.name for r in core.store],
        encode=encode,
    )
    driver = ReplicationDriver(core, log, storage)
    links = Links()
    driver.attach(links)  # type: ignore[arg-type]
    return driver, links


def setter(key: str, value: int):  # type: ignore[no-untyped-def]
    return lambda doc: doc.get("root", type=Map).__setitem__(key, value)


async def test_a_majority_write_returns_only_once_it_is_on_disk_here() -> None:
    disk = SimDisk()
    driver, _ = build(disk, sync_interval=5.0)  # local writes would wait five seconds
    assert driver.storage is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.storage.run)
        await nursery.start(driver.run)
        driver.write(trio.current_time(), DOC, setter("local", 1))
        assert driver.storage.durable < driver.storage.appended  # group commit: not yet
        with trio.fail_after(2):
            result = await driver.update(DOC, setter("majority", 1), durability="majority")
        assert result.ok and result.acked == ("a",)
        # Everything appended before it is on disk too, the local write included.
        assert driver.storage.durable == driver.storage.appended
        disk.power_loss()
        nursery.cancel_scope.cancel()
    store = Store(disk, "/data/store")
    found = store.recover()
    replica = Replica(DOC, 0)
    for update in found.docs[DOC].updates:
        replica.apply(update)
    assert dict(replica.doc.get("root", type=Map)) == {"local": 1.0, "majority": 1.0}


async def test_an_ack_leaves_only_after_the_fsync() -> None:
    disk = SimDisk()
    driver, links = build(disk, sync_interval=5.0)
    assert driver.storage is not None
    source = Replica(DOC, 0)
    update = source.write(setter("k", 1))
    assert update is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.storage.run)
        await nursery.start(driver.run)
        driver.core.handle(trio.current_time(), "b", Push(DOC, 0, update, 9, 0))
        driver.flush()
        # Held: not sent before the store says the change is durable.
        assert links.sent == [] and driver.acks_held == 1
        with trio.fail_after(2):
            while not links.sent:
                await trio.sleep(0.001)
        assert driver.storage.durable == driver.storage.appended
        assert driver.acks_held == 0
        nursery.cancel_scope.cancel()
    from meshd.replication import messages

    peer, frame = links.sent[0]
    ack = messages.decode(frame)
    assert peer == "b" and isinstance(ack, Ack) and ack.ack == 9 and ack.ok


async def test_a_listener_that_writes_is_handled_after_what_came_before() -> None:
    disk = SimDisk()
    driver, _ = build(disk)
    order: list[str] = []
    wrote: list[bool] = []

    def listener(event: object) -> None:
        name = getattr(event, "name", "")
        order.append(f"{name}:{getattr(event, 'kind', '')}")
        if name == DOC and not wrote:
            wrote.append(True)
            driver.write(0.0, "state/echo", setter("e", 1))

    driver.doc_listeners.append(listener)
    driver.write(0.0, DOC, setter("k", 1))
    # The echo's events come after every event of the first write, never in between.
    assert order == [f"{DOC}:opened", f"{DOC}:updated", "state/echo:opened", "state/echo:updated"]


async def test_a_large_batch_is_committed_off_the_event_loop() -> None:
    disk = SimDisk()
    driver, _ = build(disk, sync_interval=5.0)
    assert driver.storage is not None
    big = "x" * (400 << 10)  # above what is written inline
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.storage.run)
        await nursery.start(driver.run)
        with trio.fail_after(5):
            result = await driver.update(
                DOC,
                lambda doc: doc.get("root", type=Map).__setitem__("big", big),
                durability="majority",
            )
        assert result.ok and driver.storage.durable == driver.storage.appended
        assert driver.storage.fsync.n >= 1
        nursery.cancel_scope.cancel()
    disk.process_died()
    found = Store(disk, "/data/store").recover()
    assert sum(len(u) for u in found.docs[DOC].updates) > 400 << 10


async def test_a_snapshot_cancelled_midway_leaves_a_working_store() -> None:
    disk = SimDisk()
    driver, _ = build(disk, sync_interval=0.001)
    storage = driver.storage
    assert storage is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        await nursery.start(driver.run)
        for i in range(50):
            driver.write(trio.current_time(), f"state/d{i}", setter("k", i))
        with trio.move_on_after(0):  # cancelled at its first checkpoint
            await storage.snapshot()
        # The store took the new log: writes go on, and reach the disk.
        with trio.fail_after(5):
            result = await driver.update("state/after", setter("k", 1), durability="majority")
        assert result.ok and storage.durable == storage.appended
        assert not any(n.endswith(".tmp") for n in disk.listdir("/data/store"))
        nursery.cancel_scope.cancel()
    disk.power_loss()
    found = Store(disk, "/data/store").recover()
    assert {f"state/d{i}" for i in range(50)} | {"state/after"} <= set(found.docs)
