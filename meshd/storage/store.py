"""The storage core: recovery, the append log with group commit, snapshots.

No trio, no clock, no threads: it decides, and a :class:`~meshd.storage.files.FileSystem`
does the I/O. The driver (:mod:`meshd.storage.driver`) calls the blocking methods — those
that take a batch or a plan — off the event loop, one at a time, and everything else on it.

Layout of the store directory::

    snapshot-00000007.msnap   every document as of some moment after log 7 was started
    log-00000007.mlog         every change since log 7 was started
    log-00000008.mlog         ... and since log 8 (the one being appended to)

A snapshot *N* holds every document; logs *N*, *N*+1, … hold what changed since. Recovery
loads the newest snapshot and replays the logs from its generation on; a document's state
is the CRDT merge of all of it, so a change in both the snapshot and a log is harmless.

Crash safety:

* a record is checksummed; a torn or garbled tail of the **last** log (``kill -9``, power
  loss) is cut off at the last good record, which is exactly what was fsynced or less;
* every log's header records how long its predecessor is (``prev_end``), so a log the store
  abandoned after a write error may hold garbage past that point, and anything bad *before*
  it is corruption: recovery refuses with :class:`StoreCorrupt`, naming the file;
* a snapshot is written to a temporary file, fsynced, then renamed: it is whole or absent;
* after **any** failed write or fsync the log is not trusted again (after a failed fsync
  the kernel may have dropped the pages it could not write): the store stops logging, keeps
  serving from memory, and recovers by writing a fresh snapshot of everything it holds.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from meshd.storage import records
from meshd.storage.files import AppendFile, FileSystem, Lock

LOG_SUFFIX: Final = ".mlog"
SNAPSHOT_SUFFIX: Final = ".msnap"
TMP_SUFFIX: Final = ".tmp"
LOCK_NAME: Final = "LOCK"
SNAPSHOT_MIN_RECORDS: Final = 50_000
_NAME = re.compile(r"^(log|snapshot)-(\d{8})\.(mlog|msnap)$")


class StoreCorrupt(Exception):
    """The store cannot be read back as written. Names the file; the daemon refuses to start
    rather than serve (and spread) a partial history."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def log_name(generation: int) -> str:
    return f"log-{generation:08d}{LOG_SUFFIX}"


def snapshot_name(generation: int) -> str:
    return f"snapshot-{generation:08d}{SNAPSHOT_SUFFIX}"


def failure_kind(exc: BaseException) -> str:
    """A short, stable name for a storage failure (metrics, errors, meshctl)."""
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk_full"
        if exc.errno in (errno.EROFS,):
            return "read_only"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission"
        return "io_error"
    return "internal"


@dataclass(slots=True)
class DocHistory:
    """What recovery found of one document: its epoch and the changes to apply, in order."""

    epoch: int
    updates: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class Recovered:
    docs: dict[str, DocHistory]
    generation: int
    snapshot: str | None  # the snapshot file it started from
    logs: list[str]
    bytes_read: int
    torn: str | None = None  # what was cut off the last log, if anything
    removed: list[str] = field(default_factory=list)  # leftovers cleaned up


def replay(docs: dict[str, DocHistory], recs: Iterable[records.Record]) -> int:
    """Fold records into ``docs`` (the epoch rule of replication: higher replaces, lower is
    ignored); returns how many documents the records touched."""
    count = 0
    for rec in recs:
        if isinstance(rec, records.Update):
            count += 1
            held = docs.get(rec.doc)
            if held is None or rec.epoch > held.epoch:
                docs[rec.doc] = DocHistory(rec.epoch, [rec.update] if rec.update else [])
            elif rec.epoch == held.epoch and rec.update:
                held.updates.append(rec.update)
        elif isinstance(rec, records.Drop):
            count += 1
            docs.pop(rec.doc, None)
    return count


@dataclass(slots=True)
class Batch:
    """Records handed to the disk together (group commit)."""

    data: bytes
    end: int  # the append position (lsn) this batch makes durable
    log: AppendFile


@dataclass(slots=True)
class SnapshotPlan:
    generation: int
    old_log: AppendFile | None
    old_batch: bytes  # the old log's last records, written before the new log starts
    old_good_end: int  # the old log's length once old_batch is written (if it is)
    covers: int  # the snapshot makes everything appended before this position durable
    failed_before: bool
    new_log: AppendFile | None = None
    new_log_size: int = 0
    tmp_path: str = ""
    written: int = 0
    docs: int = 0


@dataclass(slots=True)
class StoreStats:
    appended_records: int = 0
    appended_bytes: int = 0
    dropped_records: int = 0  # appended while the log was not trusted (a snapshot covers them)
    commits: int = 0
    snapshots: int = 0
    failures: dict[str, int] = field(default_factory=dict)


class Store:
    def __init__(
        self,
        files: FileSystem,
        directory: str,
        *,
        max_pending: int = 64 << 20,
        snapshot_min_log: int = 16 << 20,
    ) -> None:
        self.files = files
        self.directory = directory
        self.max_pending = max_pending
        self.snapshot_min_log = snapshot_min_log
        self.generation = 0
        self.stats = StoreStats()
        self.appended = 0  # bytes appended since open: the log sequence number (lsn)
        self.durable = 0  # everything appended before this position survives a power loss
        self.failure: str | None = None  # why the log is not trusted (None: healthy)
        self.failure_detail = ""
        self.snapshot_bytes = 0  # size of the newest snapshot
        self.log_bytes = 0  # bytes logged since the newest snapshot
        self.log_records = 0  # changes logged since the newest snapshot
        self._log: AppendFile | None = None
        self._log_good_end = 0  # bytes of the current log known written and fsynced
        self._pending = bytearray()
        self._pending_end = 0
        self._in_flight: Batch | None = None
        self._rotating = False
        self._lock: Lock | None = None
        self._read_only = False

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    # ------------------------------------------------------------------ recovery

    def recover(self, *, read_only: bool = False) -> Recovered:
        """Read the store back, cut a torn tail off the last log, clean up leftovers, and
        open the last log for appending (creating the first one in an empty directory).
        Raises StoreCorrupt if anything before the tail is unreadable. ``read_only`` changes
        nothing (``removed`` and ``torn`` then say what recovery would do)."""
        self._read_only = read_only
        if not read_only:
            self.files.makedirs(self.directory)
            if self._lock is None:
                self._lock = self.files.lock(self.path(LOCK_NAME))
        names = sorted(self.files.listdir(self.directory))
        removed: list[str] = []
        logs: dict[int, str] = {}
        snapshots: dict[int, str] = {}
        for name in names:
            if name.endswith(TMP_SUFFIX):
                self._remove(name, removed)  # an unfinished snapshot
                continue
            m = _NAME.match(name)
            if m is None:
                continue
            gen = int(m.group(2))
            (logs if m.group(1) == "log" else snapshots)[gen] = name
        docs: dict[str, DocHistory] = {}
        read = 0
        base = 0
        snapshot_file: str | None = None
        if snapshots:
            base = max(snapshots)
            snapshot_file = snapshots[base]
            read += self._load_snapshot(snapshot_file, base, docs)
            for gen in [g for g in snapshots if g < base]:
                self._remove(snapshots[gen], removed)
            for gen in [g for g in logs if g < base]:
                self._remove(logs.pop(gen), removed)
        gens = sorted(logs)
        if gens and gens != list(range(gens[0], gens[0] + len(gens))):
            raise StoreCorrupt(self.directory, f"log generations are not contiguous: {gens}")
        if snapshot_file is None and gens and gens[0] != 1:
            raise StoreCorrupt(
                self.path(logs[gens[0]]),
                "the logs start after generation 1 but no snapshot covers what came before",
            )
        scans = [(gen, records.scan(self.files.read(self.path(logs[gen])))) for gen in gens]
        # A last log whose header is incomplete was being created when the process died: it
        # never held a record. (Every log is created and fsynced before anything builds on
        # it, so this can only be the last one.)
        while scans and self._prev_end(scans[-1][1]) is None:
            gen = scans.pop()[0]
            if snapshot_file is not None and gen == base:
                raise StoreCorrupt(
                    self.path(logs[gen]), f"the log {snapshot_file} builds on is unreadable"
                )
            self._remove(logs.pop(gen), removed)
        if snapshot_file is not None and (not scans or scans[0][0] != base):
            raise StoreCorrupt(self.path(snapshot_file), f"log generation {base} is missing")
        torn: str | None = None
        log_bytes = 0
        log_records = 0
        for i, (gen, scanned) in enumerate(scans):
            path = self.path(logs[gen])
            if self._header(scanned, gen, "log") is None:
                raise StoreCorrupt(path, "not a meshd log of this generation")
            if i + 1 < len(scans):
                # Its successor's header says how long it is: anything bad before that
                # point is corruption, anything after it was abandoned after a write error.
                end = self._prev_end(scans[i + 1][1])
                assert end is not None
                if scanned.end < end:
                    raise StoreCorrupt(
                        path, f"{scanned.problem} (the next log says it is {end} bytes long)"
                    )
                kept = scanned.upto(end)
            else:
                end = scanned.end
                kept = scanned.records
                if scanned.problem is not None:
                    size = self.files.size(path)
                    if size - end > self.max_pending:
                        # More than one unsynced batch can hold: not a torn write.
                        raise StoreCorrupt(
                            path, f"{scanned.problem}, with {size - end} bytes after it"
                        )
                    torn = f"{logs[gen]}: {scanned.problem}; cut at byte {end}"
            log_records += replay(docs, kept[2:])
            read += end
            log_bytes += end
        self.log_bytes = log_bytes
        self.log_records = log_records
        self.snapshot_bytes = (
            self.files.size(self.path(snapshot_file)) if snapshot_file is not None else 0
        )
        # Append to the last log (cut to its last good record), or start the first one.
        if read_only:
            self.generation = scans[-1][0] if scans else base or 1
        elif scans:
            gen, scanned = scans[-1]
            path = self.path(logs[gen])
            if scanned.problem is not None:
                self.files.truncate(path, scanned.end)
            self.generation = gen
            self._log = self.files.append(path)
            self._log_good_end = scanned.end
        else:
            self._start_log(base or 1, prev_end=0)
        if not read_only:
            self.files.sync_dir(self.directory)
        return Recovered(
            docs=docs,
            generation=self.generation,
            snapshot=snapshot_file,
            logs=[logs[gen] for gen, _ in scans] or [log_name(self.generation)],
            bytes_read=read,
            torn=torn,
            removed=removed,
        )

    def _remove(self, name: str, removed: list[str]) -> None:
        if not self._read_only:
            self.files.remove(self.path(name))
        removed.append(name)

    @staticmethod
    def _header(scanned: records.Scan, gen: int, kind: str) -> records.FileHeader | None:
        if not scanned.records:
            return None
        head = scanned.records[0]
        if (
            not isinstance(head, records.FileHeader)
            or head.kind != kind
            or head.version != records.VERSION
            or head.generation != gen
        ):
            return None
        return head

    @staticmethod
    def _prev_end(scanned: records.Scan) -> int | None:
        """A log's complete header: the file header, then its predecessor's length."""
        if (
            len(scanned.records) < 2
            or not isinstance(scanned.records[0], records.FileHeader)
            or not isinstance(scanned.records[1], records.End)
        ):
            return None
        return scanned.records[1].count

    def _load_snapshot(self, name: str, gen: int, docs: dict[str, DocHistory]) -> int:
        path = self.path(name)
        data = self.files.read(path)
        scanned = records.scan(data)
        if scanned.problem is not None:
            raise StoreCorrupt(path, scanned.problem)
        if self._header(scanned, gen, "snapshot") is None:
            raise StoreCorrupt(path, "not a meshd snapshot of this generation")
        body = scanned.records[1:]
        if not body or not isinstance(body[-1], records.End):
            raise StoreCorrupt(path, "snapshot has no end record")
        if body[-1].count != len(body) - 1:
            raise StoreCorrupt(
                path, f"snapshot end record says {body[-1].count} documents, found {len(body) - 1}"
            )
        replay(docs, body[:-1])
        return len(data)

    def _start_log(self, gen: int, prev_end: int) -> None:
        """Create log ``gen`` (its header names its predecessor's length) and fsync it."""
        path = self.path(log_name(gen))
        handle = self.files.append(path)
        try:
            header = records.encode(records.FileHeader("log", records.VERSION, gen))
            header += records.encode(records.End(prev_end))
            handle.write(header)
            handle.sync()
        except BaseException:
            handle.close()
            raise
        self.files.sync_dir(self.directory)
        self.generation = gen
        self._log = handle
        self._log_good_end = len(header)

    # ------------------------------------------------------------------ appending

    def append_update(self, doc: str, epoch: int, update: bytes) -> int:
        return self._append(records.encode_update(doc, epoch, update))

    def append_drop(self, doc: str) -> int:
        return self._append(records.encode(records.Drop(doc)))

    def _append(self, data: bytes) -> int:
        self.appended += len(data)
        self.log_records += 1
        self.stats.appended_records += 1
        self.stats.appended_bytes += len(data)
        if self.failure is not None:
            self.stats.dropped_records += 1  # the recovery snapshot will cover it
            return self.appended
        self._pending += data
        self._pending_end = self.appended
        if len(self._pending) > self.max_pending:
            self._fail("backlog", f"more than {self.max_pending} bytes wait for the disk")
        return self.appended

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def _fail(self, kind: str, detail: str) -> None:
        self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1
        if self.failure is None:
            self.failure = kind
            self.failure_detail = detail
        self._pending = bytearray()

    # ------------------------------------------------------------------ group commit

    def take_batch(self) -> Batch | None:
        """The records waiting for the disk, as one batch (None if nothing waits, the log is
        not trusted, or a rotation or another batch is in flight)."""
        if (
            not self._pending
            or self.failure is not None
            or self._rotating
            or self._in_flight is not None
            or self._log is None
        ):
            return None
        batch = Batch(bytes(self._pending), self._pending_end, self._log)
        self._pending = bytearray()
        self._in_flight = batch
        return batch

    @staticmethod
    def write_batch(batch: Batch) -> None:
        """Blocking: write and fsync (off the event loop)."""
        batch.log.write(batch.data)
        batch.log.sync()

    def batch_done(self, batch: Batch) -> None:
        self._in_flight = None
        self.stats.commits += 1
        self._log_good_end += len(batch.data)
        self.log_bytes += len(batch.data)
        if self.failure is None:
            self.durable = max(self.durable, batch.end)

    def batch_failed(self, batch: Batch, exc: BaseException) -> None:
        self._in_flight = None
        self._fail(failure_kind(exc), f"log write failed: {exc}")

    # ------------------------------------------------------------------ snapshots

    def snapshot_due(self, documents: int = 0) -> bool:
        """After a failure; once the logs outgrow the last snapshot; or once they hold many
        more changes than there are documents (replaying many small changes costs more at
        start than reading each document once)."""
        return (
            self.failure is not None
            or self.log_bytes >= max(self.snapshot_min_log, self.snapshot_bytes)
            or self.log_records >= max(SNAPSHOT_MIN_RECORDS, 4 * documents)
        )

    def start_snapshot(self) -> SnapshotPlan | None:
        """Switch appends to a new log generation; None while a batch is in flight."""
        if self._in_flight is not None or self._rotating:
            return None
        self._rotating = True
        failed = self.failure is not None
        plan = SnapshotPlan(
            generation=self.generation + 1,
            old_log=self._log,
            old_batch=b"" if failed else bytes(self._pending),
            old_good_end=self._log_good_end + (0 if failed else len(self._pending)),
            covers=self.appended,
            failed_before=failed,
        )
        self._pending = bytearray()
        self._log = None
        return plan

    def rotate(self, plan: SnapshotPlan) -> None:
        """Blocking: finish the old log, start the new one (its header records where the old
        one ends), open the snapshot's temporary file."""
        if plan.old_log is not None:
            if plan.old_batch:
                plan.old_log.write(plan.old_batch)
                plan.old_log.sync()
            plan.old_log.close()
            plan.old_log = None
        new_path = self.path(log_name(plan.generation))
        if log_name(plan.generation) in self.files.listdir(self.directory):
            self.files.remove(new_path)  # left by an earlier attempt that failed
        prev_end = plan.old_good_end
        handle = self.files.append(new_path)
        try:
            header = records.encode(records.FileHeader("log", records.VERSION, plan.generation))
            header += records.encode(records.End(prev_end))
            handle.write(header)
            handle.sync()
            self.files.sync_dir(self.directory)
        except BaseException:
            handle.close()
            raise
        plan.new_log = handle
        plan.new_log_size = len(header)
        plan.tmp_path = self.path(snapshot_name(plan.generation) + TMP_SUFFIX)
        if os.path.basename(plan.tmp_path) in self.files.listdir(self.directory):
            self.files.remove(plan.tmp_path)
        snapshot = self.files.append(plan.tmp_path)
        try:
            snapshot.write(
                records.encode(records.FileHeader("snapshot", records.VERSION, plan.generation))
            )
        finally:
            snapshot.close()

    def rotated(self, plan: SnapshotPlan) -> None:
        """On the loop, after :meth:`rotate`: appends go to the new log from now on."""
        assert plan.new_log is not None
        if not plan.failed_before:
            # The old log's last batch was written and fsynced before the new log started.
            self.stats.commits += 1
            self.durable = max(self.durable, plan.covers)
        self.generation = plan.generation
        self._log = plan.new_log
        self._log_good_end = plan.new_log_size
        self.log_bytes = 0
        self.log_records = 0
        self._rotating = False

    @staticmethod
    def encode_documents(plan: SnapshotPlan, docs: Iterable[tuple[str, int, bytes]]) -> bytes:
        """On the loop: snapshot records for ``docs`` (name, epoch, whole encoding)."""
        out = bytearray()
        for name, epoch, update in docs:
            out += records.encode_update(name, epoch, update)
            plan.docs += 1
        return bytes(out)

    def write_snapshot_chunk(self, plan: SnapshotPlan, chunk: bytes) -> None:
        """Blocking: append encoded document records to the snapshot being written."""
        handle = self.files.append(plan.tmp_path)
        try:
            handle.write(chunk)
        finally:
            handle.close()
        plan.written += len(chunk)

    def finish_snapshot(self, plan: SnapshotPlan) -> int:
        """Blocking: seal the snapshot (end record, fsync, rename, fsync the directory) and
        delete what it supersedes; returns its size."""
        handle = self.files.append(plan.tmp_path)
        try:
            handle.write(records.encode(records.End(plan.docs)))
            handle.sync()
        finally:
            handle.close()
        final = self.path(snapshot_name(plan.generation))
        self.files.rename(plan.tmp_path, final)
        self.files.sync_dir(self.directory)
        for name in self.files.listdir(self.directory):
            m = _NAME.match(name)
            if m is not None and int(m.group(2)) < plan.generation:
                self.files.remove(self.path(name))
        self.files.sync_dir(self.directory)
        return self.files.size(final)

    def snapshot_done(self, plan: SnapshotPlan, size: int) -> None:
        self.stats.snapshots += 1
        self.snapshot_bytes = size
        # Everything appended before the rotation is in the snapshot (documents were encoded
        # after it), and everything since went to the new log: a failure is over.
        self.durable = max(self.durable, plan.covers)
        if plan.failed_before and self.failure is not None:
            self.failure = None
            self.failure_detail = ""

    def abandon_snapshot(self, plan: SnapshotPlan) -> None:
        """A snapshot given up after the rotation (the daemon stops): the logs hold
        everything, so only the temporary file goes (best effort; recovery removes it too)."""
        try:
            if plan.tmp_path and os.path.basename(plan.tmp_path) in self.files.listdir(
                self.directory
            ):
                self.files.remove(plan.tmp_path)
        except OSError:
            pass

    def snapshot_failed(self, plan: SnapshotPlan, exc: BaseException) -> None:
        """On the loop, after a failed step: the store stays (or becomes) untrusted until a
        later snapshot succeeds. Best effort: the temporary file is removed."""
        if self._rotating:  # the rotation itself failed: no log to append to
            self._rotating = False
            self._log = None
        self._fail(failure_kind(exc), f"snapshot failed: {exc}")
        self.abandon_snapshot(plan)

    # ------------------------------------------------------------------ all at once

    def commit_now(self) -> bool:
        """Write and fsync what waits, in the calling thread (the simulation, tools, tests).
        True if the log holds everything appended so far."""
        batch = self.take_batch()
        if batch is not None:
            try:
                self.write_batch(batch)
            except OSError as exc:
                self.batch_failed(batch, exc)
                return False
            self.batch_done(batch)
        return self.failure is None and self.durable == self.appended

    def snapshot_now(self, docs: Callable[[], Iterable[tuple[str, int, bytes]]]) -> bool:
        """Take a whole snapshot in the calling thread; ``docs`` is called after the rotation
        (so the snapshot holds at least everything appended before it). True on success."""
        plan = self.start_snapshot()
        if plan is None:
            return False
        try:
            self.rotate(plan)
            self.rotated(plan)
            self.write_snapshot_chunk(plan, self.encode_documents(plan, docs()))
            size = self.finish_snapshot(plan)
        except OSError as exc:
            self.snapshot_failed(plan, exc)
            return False
        self.snapshot_done(plan, size)
        return True

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
