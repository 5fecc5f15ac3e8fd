"""The storage core on a simulated disk: recovery, torn tails, corruption, snapshots, disk
full and I/O errors. The documents are real pycrdt updates; nothing is mocked."""

from __future__ import annotations

import errno
import random

import pytest
from pycrdt import Doc, Map

from meshd.sim.disk import SimDisk
from meshd.storage import records
from meshd.storage.files import OsFiles, StoreLocked
from meshd.storage.store import DocHistory, Store, StoreCorrupt, log_name, replay, snapshot_name

DIR = "/data/store"


def change(doc: Doc[Map[int]], key: str, value: int) -> bytes:
    updates: list[bytes] = []
    sub = doc.observe(lambda e: updates.append(e.update))
    doc.get("root", type=Map)[key] = value
    doc.unobserve(sub)
    return updates[0]


def content(history: DocHistory) -> dict[str, int]:
    doc: Doc[Map[int]] = Doc()
    for update in history.updates:
        doc.apply_update(update)
    return {k: int(v) for k, v in doc.get("root", type=Map).items()}


def fresh(disk: SimDisk, **kwargs: int) -> Store:
    """A store for a new process (the previous one died)."""
    disk.process_died()
    return Store(disk, DIR, **kwargs)


def opened(disk: SimDisk) -> tuple[Store, dict[str, DocHistory]]:
    store = fresh(disk)
    return store, store.recover().docs


def test_empty_directory_starts_the_first_log() -> None:
    disk = SimDisk()
    store, docs = opened(disk)
    assert docs == {}
    assert disk.listdir(DIR) == [log_name(1)]
    assert store.generation == 1 and store.healthy


def test_committed_changes_come_back_and_unsynced_ones_are_lost_on_power_loss() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "x", 1))
    store.append_update("state/a", 0, change(doc, "y", 2))
    assert store.durable == 0
    assert store.commit_now()
    assert store.durable == store.appended
    store.append_update("state/a", 0, change(doc, "z", 3))  # appended, never committed
    disk.power_loss()
    _, docs = opened(disk)
    assert content(docs["state/a"]) == {"x": 1, "y": 2}


@pytest.mark.parametrize("seed", range(20))
def test_a_torn_tail_is_cut_at_the_last_good_record(seed: int) -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    for i in range(5):
        store.append_update("state/a", 0, change(doc, f"k{i}", i))
    store.commit_now()
    batch = store.take_batch()
    assert batch is None  # nothing waits
    for i in range(5, 10):
        store.append_update("state/a", 0, change(doc, f"k{i}", i))
    batch = store.take_batch()
    assert batch is not None
    batch.log.write(batch.data)  # written, never fsynced: the power goes
    disk.power_loss(random.Random(seed))
    store2 = fresh(disk)
    found = store2.recover()
    got = content(found.docs["state/a"])
    # Every fsynced change is there; of the rest, a prefix at most.
    assert {f"k{i}" for i in range(5)} <= set(got)
    assert set(got) == {f"k{i}" for i in range(len(got))}
    # Appending after the cut works, and the next recovery is clean.
    store2.append_update("state/a", 0, change(doc, "after", 1))
    assert store2.commit_now()
    found = fresh(disk).recover()
    assert found.torn is None
    assert "after" in content(found.docs["state/a"])


def test_garbage_far_beyond_one_batch_is_corruption_not_a_torn_tail() -> None:
    disk = SimDisk()
    store = fresh(disk, max_pending=1024)
    store.recover()
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "x", 1))
    store.commit_now()
    path = f"{DIR}/{log_name(1)}"
    size = disk.size(path)
    handle = disk.append(path)
    handle.write(b"\x00\x00\x00\x05junk!" + b"x" * 4096)
    handle.sync()
    with pytest.raises(StoreCorrupt) as info:
        fresh(disk, max_pending=1024).recover()
    assert info.value.path == path
    assert f"byte {size}" in str(info.value)


def test_a_corrupt_snapshot_names_the_file() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "x", 1))
    store.commit_now()
    assert store.snapshot_now(lambda: [("state/a", 0, doc.get_update())])
    path = f"{DIR}/{snapshot_name(2)}"
    disk.corrupt(path, 30, b"\xff\xff\xff")
    with pytest.raises(StoreCorrupt) as info:
        fresh(disk).recover()
    assert info.value.path == path
    assert "checksum" in info.value.problem or "length" in info.value.problem


def test_a_corrupt_header_names_the_file() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    store.append_update("state/a", 0, change(Doc(), "x", 1))
    store.commit_now()
    assert store.snapshot_now(list)
    path = f"{DIR}/{snapshot_name(2)}"
    data = disk.read(path)
    disk.remove(path)
    handle = disk.append(path)
    handle.write(records.encode(records.FileHeader("snapshot", 99, 2)) + data[30:])
    handle.sync()
    disk.sync_dir(DIR)
    with pytest.raises(StoreCorrupt, match="snapshot"):
        fresh(disk).recover()


def test_snapshot_plus_log_recovery_and_cleanup() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    a: Doc[Map[int]] = Doc()
    b: Doc[Map[int]] = Doc()
    for i in range(50):
        store.append_update("state/a", 0, change(a, f"k{i}", i))
    store.append_update("state/b", 3, change(b, "only", 1))
    store.commit_now()
    assert store.snapshot_now(
        lambda: [("state/a", 0, a.get_update()), ("state/b", 3, b.get_update())]
    )
    assert disk.listdir(DIR) == [log_name(2), snapshot_name(2)]
    store.append_update("state/a", 0, change(a, "late", 7))
    store.append_drop("state/b")
    store.commit_now()
    found = fresh(disk).recover()
    assert found.snapshot == snapshot_name(2)
    assert set(found.docs) == {"state/a"}
    assert content(found.docs["state/a"])["late"] == 7
    assert len(content(found.docs["state/a"])) == 51
    # The snapshot holds one record per document, not the history.
    assert len(found.docs["state/a"].updates) == 2


def test_power_loss_during_a_snapshot_keeps_the_previous_state() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "x", 1))
    store.commit_now()
    plan = store.start_snapshot()
    assert plan is not None
    store.rotate(plan)
    store.rotated(plan)
    store.write_snapshot_chunk(plan, store.encode_documents(plan, [("state/a", 0, b"")]))
    store.append_update("state/a", 0, change(doc, "y", 2))
    store.commit_now()
    disk.power_loss()  # before the snapshot was sealed
    found = fresh(disk).recover()
    assert found.snapshot is None
    assert found.removed == [snapshot_name(2) + ".tmp"] or snapshot_name(2) + ".tmp" not in (
        disk.listdir(DIR)
    )
    assert content(found.docs["state/a"]) == {"x": 1, "y": 2}
    assert found.logs == [log_name(1), log_name(2)]


def test_files_a_snapshot_superseded_are_removed_on_recovery() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "x", 1))
    store.commit_now()
    disk.fail_next["remove"] = 1  # the clean-up after the rename fails
    assert not store.snapshot_now(lambda: [("state/a", 0, doc.get_update())])
    found = fresh(disk).recover()
    assert found.snapshot == snapshot_name(2)
    assert log_name(1) in found.removed
    assert disk.listdir(DIR) == [log_name(2), snapshot_name(2)]
    assert content(found.docs["state/a"]) == {"x": 1}


def test_disk_full_stops_the_log_and_a_snapshot_recovers_it() -> None:
    disk = SimDisk(capacity=4096)
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "first", 1))
    assert store.commit_now()
    durable = store.durable
    store.append_update("state/a", 0, change(doc, "big", 1))
    store.append_update("state/a", 0, b"\x00" * 8000)  # does not fit
    assert not store.commit_now()
    assert store.failure == "disk_full"
    assert store.durable == durable
    # While the log is not trusted, appends are dropped (the snapshot will cover them).
    store.append_update("state/a", 0, change(doc, "meanwhile", 1))
    assert store.pending_bytes == 0
    assert store.stats.dropped_records == 1
    assert not store.snapshot_now(lambda: [("state/a", 0, doc.get_update())])  # still full
    assert store.failure == "disk_full"
    disk.capacity = None  # space returns
    assert store.snapshot_now(lambda: [("state/a", 0, doc.get_update())])
    assert store.healthy and store.durable == store.appended
    store.append_update("state/a", 0, change(doc, "later", 1))
    assert store.commit_now()
    disk.power_loss()
    _, docs = opened(disk)
    assert set(content(docs["state/a"])) == {"first", "big", "meanwhile", "later"}


def test_an_abandoned_log_keeps_what_was_synced_and_ignores_the_rest() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "synced", 1))
    assert store.commit_now()
    store.append_update("state/a", 0, change(doc, "lost", 1))
    disk.fail_next["sync"] = 1  # written, but fsync fails: the log is not trusted again
    assert not store.commit_now()
    assert store.failure == "io_error"
    # Power loss before the recovery snapshot: the new log never started; the old one is
    # the last and its unsynced tail is cut (or kept, if it happened to reach the disk).
    disk.power_loss()
    _, docs = opened(disk)
    assert "synced" in content(docs["state/a"])


def test_an_abandoned_log_followed_by_a_new_one_is_read_up_to_its_recorded_end() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "synced", 1))
    assert store.commit_now()
    good_end = disk.size(f"{DIR}/{log_name(1)}")
    store.append_update("state/a", 0, change(doc, "unsure", 1))
    disk.fail_next["sync"] = 1
    assert not store.commit_now()
    # A recovery snapshot that starts log 2 but fails before it is sealed.
    disk.fail_next["rename"] = 1
    assert not store.snapshot_now(lambda: [("state/a", 0, doc.get_update())])
    # Garbage after the recorded end of log 1 is not corruption.
    handle = disk.append(f"{DIR}/{log_name(1)}")
    handle.write(b"\x01\x02\x03")
    handle.sync()
    found = fresh(disk).recover()
    assert found.logs == [log_name(1), log_name(2)]
    assert content(found.docs["state/a"]) == {"synced": 1}
    assert disk.size(f"{DIR}/{log_name(1)}") > good_end
    # But damage before that end is.
    disk.corrupt(f"{DIR}/{log_name(1)}", good_end - 3, b"\xee")
    with pytest.raises(StoreCorrupt) as info:
        fresh(disk).recover()
    assert info.value.path == f"{DIR}/{log_name(1)}"


def test_a_log_whose_creation_was_torn_never_existed() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    store.append_update("state/a", 0, change(Doc(), "x", 1))
    store.commit_now()
    handle = disk.append(f"{DIR}/{log_name(2)}")
    handle.write(records.encode(records.FileHeader("log", records.VERSION, 2))[:7])
    handle.sync()
    disk.sync_dir(DIR)
    found = fresh(disk).recover()
    assert log_name(2) in found.removed
    assert found.generation == 1


def test_missing_logs_are_corruption() -> None:
    disk = SimDisk()
    store, _ = opened(disk)
    store.append_update("state/a", 0, change(Doc(), "x", 1))
    store.commit_now()
    assert store.snapshot_now(list)
    assert store.snapshot_now(list)
    disk.remove(f"{DIR}/{log_name(3)}")
    with pytest.raises(StoreCorrupt, match="missing"):
        fresh(disk).recover()


def test_replay_follows_the_epoch_rule() -> None:
    docs: dict[str, DocHistory] = {}
    replay(
        docs,
        [
            records.Update("d", 1, b"a"),
            records.Update("d", 1, b"b"),
            records.Update("d", 0, b"stale"),
            records.Update("d", 2, b""),  # a new epoch, nothing in it yet
            records.Update("d", 2, b"c"),
            records.Update("gone", 0, b"x"),
            records.Drop("gone"),
        ],
    )
    assert docs == {"d": DocHistory(2, [b"c"])}


def test_records_refuse_what_they_do_not_know() -> None:
    assert records.scan(records.frame(b"\x80")).problem is not None  # an empty array
    assert "unknown record" in str(records.scan(records.frame(b"\x81\x61x")).problem)
    good = records.encode(records.Drop("d"))
    flipped = good[:-1] + bytes([good[-1] ^ 1])
    assert "checksum" in str(records.scan(flipped).problem)
    assert records.scan(good).records == [records.Drop("d")]


def test_the_real_file_system(tmp_path: pytest.TempPathFactory) -> None:
    directory = str(tmp_path) + "/store"
    store = Store(OsFiles(), directory)
    store.recover()
    store.append_update("state/a", 0, change(Doc(), "x", 1))
    assert store.commit_now()
    assert store.snapshot_now(list)
    store.close()
    again = Store(OsFiles(), directory)
    found = again.recover()
    assert found.snapshot == snapshot_name(2)
    # Two processes never share a store.
    with pytest.raises(StoreLocked):
        Store(OsFiles(), directory).recover()
    again.close()
    # A truncated last log on a real disk is cut back too.
    with open(f"{directory}/{log_name(2)}", "ab") as f:
        f.write(b"\x00\x00\x01")
    found = Store(OsFiles(), directory).recover()
    assert found.torn is not None


def test_disk_full_on_a_real_error_number() -> None:
    from meshd.storage.store import failure_kind

    assert failure_kind(OSError(errno.ENOSPC, "full")) == "disk_full"
    assert failure_kind(OSError(errno.EIO, "io")) == "io_error"


# ---------------------------------------------------------------------- check and repair


def test_check_reports_without_changing_anything() -> None:
    from meshd.storage import repair

    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(doc, "x", 1))
    store.commit_now()
    store.close()
    handle = disk.append(f"{DIR}/{log_name(1)}")
    handle.write(b"\x00\x00")  # a torn tail
    handle.sync()
    before = disk.read(f"{DIR}/{log_name(1)}")
    report = repair.check(disk, DIR)
    assert report.ok and report.documents == 1 and report.torn is not None
    assert disk.read(f"{DIR}/{log_name(1)}") == before  # nothing cut


def test_repair_salvages_what_checks_out_and_quarantines_the_rest() -> None:
    from meshd.storage import repair

    disk = SimDisk()
    store, _ = opened(disk)
    a: Doc[Map[int]] = Doc()
    b: Doc[Map[int]] = Doc()
    store.append_update("state/a", 0, change(a, "x", 1))
    store.append_update("state/b", 0, change(b, "y", 2))
    store.commit_now()
    assert store.snapshot_now(
        lambda: [("state/a", 0, a.get_update()), ("state/b", 0, b.get_update())]
    )
    store.append_update("state/a", 0, change(a, "z", 3))
    store.commit_now()
    store.close()
    snap = f"{DIR}/{snapshot_name(2)}"
    size = disk.size(snap)
    disk.corrupt(snap, size - 20, b"\xff\xff\xff\xff")  # the end record and b's tail
    report = repair.check(disk, DIR)
    assert not report.ok and snapshot_name(2) in report.problem
    done = repair.repair(disk, DIR)
    assert snapshot_name(2) in disk.listdir(done.quarantine)
    assert "stopped" in done.files[snapshot_name(2)]
    _, docs = opened(disk)
    assert content(docs["state/a"]) == {"x": 1, "z": 3}  # from the snapshot and the log
    assert repair.check(disk, DIR).ok


def test_many_small_changes_make_a_snapshot_due_before_the_bytes_do() -> None:
    from meshd.storage.store import SNAPSHOT_MIN_RECORDS

    disk = SimDisk()
    store, _ = opened(disk)
    doc: Doc[Map[int]] = Doc()
    update = change(doc, "k", 1)
    for _ in range(SNAPSHOT_MIN_RECORDS - 1):
        store.append_update("state/a", 0, update)
    assert not store.snapshot_due(documents=1)
    store.append_update("state/a", 0, update)
    assert store.snapshot_due(documents=1)
    assert not store.snapshot_due(documents=SNAPSHOT_MIN_RECORDS)  # one change per document
    store.commit_now()
    assert store.snapshot_now(lambda: [("state/a", 0, doc.get_update())])
    assert not store.snapshot_due(documents=1)
    # Recovery counts what the logs hold.
    store.append_update("state/a", 0, update)
    store.commit_now()
    again = fresh(disk)
    again.recover()
    assert again.log_records == 1
