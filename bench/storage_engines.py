"""Storage engines for meshd's durable store, measured side by side in one process.

    python -m bench.storage_engines [--json] [--engines meshd-log,sqlite-full,...]
                                    [--batches 1,10,100] [--seconds 3] [--readback 100000]

The same workload on every candidate: real pycrdt deltas of about 200 bytes (a 5-key map per
document, 100 documents, one key set per change), committed in batches of 1, 10 and 100
changes per commit, each commit durable when it returns (fsync or the engine's equivalent),
for ``--seconds`` per configuration (in ``--rounds`` slices, the engines taking turns); then
``--readback`` records written in batches of 1,000 and read back in full by a fresh handle
(the page cache is warm: this is the parsing and lookup cost of a restart, not the disk's
read speed).

Candidates (each in its own directory under the run directory, removed afterwards):

* ``meshd-log`` — meshd's own store (:class:`meshd.storage.store.Store` on
  :class:`~meshd.storage.files.OsFiles`): ``append_update`` per change, ``commit_now`` per
  batch (write + ``fdatasync``); read back with ``recover``;
* ``sqlite-full`` / ``sqlite-normal`` — stdlib ``sqlite3``, WAL mode, one table
  ``(id INTEGER PRIMARY KEY, doc, epoch, update)``, one transaction per batch, with
  ``synchronous=FULL`` (the WAL is fsynced at every commit) or ``NORMAL`` (fsynced only at
  checkpoints: **a commit can be lost on power loss**, reported for reference only);
* ``lmdb`` — the ``lmdb`` package (what Akka Distributed Data uses), ``sync`` and
  ``metasync`` on, one write transaction per batch, keys are a sequence number;
* ``pycrdt-store`` — ``pycrdt.store.SQLiteYStore`` (anyio, run here on trio), one store per
  document as its API wants, one ``write`` per change: every write is its own SQLite
  transaction (its API has no batch), so the batch size changes nothing. Its read-back
  records are inserted into its own schema directly (writing 100,000 through its API takes
  minutes) and read back through its API (``read`` per document).

Engines that cannot be imported are reported as skipped, with the reason: ``lmdb`` and
``pycrdt-store`` are not meshd dependencies (install them in a throwaway virtualenv to
measure them, see docs/storage.md).

``--full-check`` (on by default) also runs each engine against a full disk once and reports
whether the failed commit reaches the caller: meshd's store on the simulated disk of
:mod:`meshd.sim.disk` (ENOSPC), SQLite with ``PRAGMA max_page_count`` (SQLITE_FULL, the code
SQLite returns for ENOSPC), LMDB with a map that is too small (MDB_MAP_FULL).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import platform
import shutil
import sqlite3
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import anyio
from rich.console import Console
from rich.table import Table

from bench import harness
from bench.api import _dist
from meshd import __version__ as meshd_version
from meshd.sim.disk import SimDisk
from meshd.storage.files import OsFiles
from meshd.storage.store import Store

err = Console(stderr=True, soft_wrap=True)

ENGINES: Final = ("meshd-log", "sqlite-full", "sqlite-normal", "lmdb", "pycrdt-store")
DOCS: Final = 100
Record = tuple[str, bytes]  # (document, update)


# ---------------------------------------------------------------------------- workload


def make_records(count: int, value_bytes: int = 170) -> list[Record]:
    """``count`` real pycrdt deltas: document ``i % 100`` sets key ``k{i % 5}`` to a string of
    ``value_bytes`` characters (about 200 bytes per delta)."""
    from pycrdt import Doc, Map

    docs: list[tuple[Any, Any]] = []
    for _ in range(DOCS):
        doc: Any = Doc()
        docs.append((doc, doc.get("root", type=Map)))
    filler = "v" * value_bytes
    out: list[Record] = []
    for i in range(count):
        doc, root = docs[i % DOCS]
        before = doc.get_state()
        root[f"k{i % 5}"] = f"{i:010d}{filler}"[:value_bytes]
        out.append((f"state/d{i % DOCS}", doc.get_update(before)))
    return out


class Engine(Protocol):
    name: str
    group_commit: bool  # False: every change is its own commit whatever the batch

    def open(self, directory: Path) -> None: ...

    def commit(self, batch: Sequence[Record]) -> None:
        """Durable when it returns; raises if it is not."""

    def close(self) -> None: ...

    def read_all(self, directory: Path) -> int:
        """Open ``directory`` afresh and read every record; returns how many."""


# ---------------------------------------------------------------------------- engines


class MeshdLog:
    name = "meshd-log"
    group_commit = True

    def __init__(self) -> None:
        self.store: Store | None = None

    def open(self, directory: Path) -> None:
        self.store = Store(OsFiles(), str(directory))
        self.store.recover()

    def commit(self, batch: Sequence[Record]) -> None:
        assert self.store is not None
        for doc, update in batch:
            self.store.append_update(doc, 0, update)
        if not self.store.commit_now():
            raise OSError(f"commit failed: {self.store.failure_detail}")

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def read_all(self, directory: Path) -> int:
        store = Store(OsFiles(), str(directory))
        try:
            recovered = store.recover()
        finally:
            store.close()
        return sum(len(h.updates) for h in recovered.docs.values())


class Sqlite:
    group_commit = True

    def __init__(self, synchronous: str) -> None:
        self.synchronous = synchronous
        self.name = f"sqlite-{synchronous.lower()}"
        self.db: sqlite3.Connection | None = None

    def _connect(self, directory: Path) -> sqlite3.Connection:
        db = sqlite3.connect(directory / "store.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        return db

    def open(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.db = self._connect(directory)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS log "
            "(id INTEGER PRIMARY KEY, doc TEXT NOT NULL, epoch INTEGER NOT NULL, upd BLOB)"
        )

    def commit(self, batch: Sequence[Record]) -> None:
        assert self.db is not None
        self.db.execute("BEGIN")
        try:
            self.db.executemany(
                "INSERT INTO log (doc, epoch, upd) VALUES (?, 0, ?)", [(d, u) for d, u in batch]
            )
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def read_all(self, directory: Path) -> int:
        db = self._connect(directory)
        try:
            rows = db.execute("SELECT doc, epoch, upd FROM log ORDER BY id").fetchall()
        finally:
            db.close()
        return len(rows)


class Lmdb:
    name = "lmdb"
    group_commit = True
    _KEY: Final = struct.Struct(">Q")

    def __init__(self, map_size: int = 4 << 30) -> None:
        self.lmdb: Any = importlib.import_module("lmdb")
        self.map_size = map_size
        self.env: Any = None
        self.seq = 0

    def open(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.env = self.lmdb.open(
            str(directory), map_size=self.map_size, sync=True, metasync=True, lock=True
        )
        with self.env.begin() as txn:
            self.seq = txn.stat()["entries"]

    def commit(self, batch: Sequence[Record]) -> None:
        pack = self._KEY.pack
        with self.env.begin(write=True) as txn:
            for doc, update in batch:
                self.seq += 1
                name = doc.encode()
                txn.put(pack(self.seq), bytes([len(name)]) + name + update, append=True)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def read_all(self, directory: Path) -> int:
        env = self.lmdb.open(str(directory), map_size=self.map_size, readonly=True, lock=False)
        count = 0
        try:
            with env.begin() as txn:
                for _key, value in txn.cursor():
                    n = value[0]
                    _doc, _update = bytes(value[1 : 1 + n]).decode(), bytes(value[1 + n :])
                    count += 1
        finally:
            env.close()
        return count


class PycrdtStore:
    """``pycrdt.store.SQLiteYStore``: anyio, run on trio here; one store per document."""

    name = "pycrdt-store"
    group_commit = False

    def __init__(self) -> None:
        module = importlib.import_module("pycrdt.store")
        self.cls: Any = module.SQLiteYStore
        self.directory: Path | None = None

    def _store_class(self, directory: Path) -> Any:
        return type("BenchYStore", (self.cls,), {"db_path": str(directory / "ystore.db")})

    @staticmethod
    async def _open(stack: contextlib.AsyncExitStack, cls: Any, doc: str) -> Any:
        """One document's store, its database set up before the next one is opened: the
        set-up runs in the background, and two racing on one new database file end with
        one of them moving the file aside as a "version mismatch" (seen here)."""
        store = await stack.enter_async_context(cls(doc))
        await store.db_initialized.wait()
        return store

    def open(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory

    def commit(self, batch: Sequence[Record]) -> None:
        raise NotImplementedError("pycrdt-store is driven by timed(): it needs an event loop")

    def timed(
        self, directory: Path, records: Sequence[Record], batch: int, seconds: float
    ) -> list[float]:
        """The throughput loop inside one event loop, every document's store open throughout
        (opening one costs a connection and a schema check)."""
        directory.mkdir(parents=True, exist_ok=True)
        out: list[float] = anyio.run(
            self._timed, directory, records, batch, seconds, backend="trio"
        )
        return out

    async def _timed(
        self, directory: Path, records: Sequence[Record], batch: int, seconds: float
    ) -> list[float]:
        cls = self._store_class(directory)
        latencies: list[float] = []
        async with contextlib.AsyncExitStack() as stack:
            stores = {}
            for k in range(DOCS):
                stores[f"state/d{k}"] = await self._open(stack, cls, f"state/d{k}")
            deadline = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                for k in range(batch):  # its API has no batch: one transaction per write
                    doc, update = records[(i + k) % len(records)]
                    await stores[doc].write(update)
                i += batch
                latencies.append(time.perf_counter() - started)
        return latencies

    def close(self) -> None:
        self.directory = None

    def read_all(self, directory: Path) -> int:
        return int(anyio.run(self._read, directory, backend="trio"))

    async def _read(self, directory: Path) -> int:
        cls = self._store_class(directory)
        count = 0
        for k in range(DOCS):
            async with contextlib.AsyncExitStack() as stack:
                store = await self._open(stack, cls, f"state/d{k}")
                with contextlib.suppress(Exception):  # YDocNotFound for a missing document
                    async for _update, _metadata, _ts in store.read():
                        count += 1
        return count

    async def _create(self, directory: Path) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await self._open(stack, self._store_class(directory), "state/d0")

    def load_directly(self, directory: Path, records: Sequence[Record]) -> None:
        """Fill its schema in one transaction (its API would need one commit per record)."""
        directory.mkdir(parents=True, exist_ok=True)
        anyio.run(self._create, directory, backend="trio")
        db = sqlite3.connect(directory / "ystore.db")
        try:
            base = time.time()
            with db:
                db.executemany(
                    "INSERT INTO yupdates VALUES (?, ?, ?, ?)",
                    [(d, u, b"", base + i * 1e-6) for i, (d, u) in enumerate(records)],
                )
        finally:
            db.close()


# ---------------------------------------------------------------------------- measurements


def available(names: Sequence[str]) -> tuple[dict[str, Callable[[], Engine]], dict[str, str]]:
    """The engines that can run here, and why the others cannot."""
    factories: dict[str, Callable[[], Engine]] = {
        "meshd-log": MeshdLog,
        "sqlite-full": lambda: Sqlite("FULL"),
        "sqlite-normal": lambda: Sqlite("NORMAL"),
        "lmdb": Lmdb,
        "pycrdt-store": PycrdtStore,
    }
    ok: dict[str, Callable[[], Engine]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            factories[name]()
        except ImportError as exc:
            skipped[name] = f"not importable: {exc}"
            continue
        ok[name] = factories[name]
    return ok, skipped


def versions() -> dict[str, str]:
    out = {"sqlite": sqlite3.sqlite_version, "pycrdt": _version("pycrdt")}
    for package in ("lmdb", "pycrdt-store", "sqlite-anyio"):
        out[package] = _version(package)
    return out


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def commit_for(
    factory: Callable[[], Engine],
    directory: Path,
    records: Sequence[Record],
    batch: int,
    seconds: float,
) -> list[float]:
    """Commits of ``batch`` records for ``seconds`` (appending to what ``directory`` holds),
    each durable when it returns; the latency of each commit."""
    engine = factory()
    if isinstance(engine, PycrdtStore):
        return engine.timed(directory, records, batch, seconds)
    latencies: list[float] = []
    engine.open(directory)
    try:
        deadline = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < deadline:
            chunk = [records[(i + k) % len(records)] for k in range(batch)]
            i += batch
            started = time.perf_counter()
            engine.commit(chunk)
            latencies.append(time.perf_counter() - started)
    finally:
        engine.close()
    return latencies


def summarize(rounds: Sequence[list[float]], batch: int, directory: Path) -> dict[str, Any]:
    """Records/s over the time spent committing (not opening, not building batches)."""
    latencies = [x for r in rounds for x in r]
    done = len(latencies) * batch
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return {
        "batch": batch,
        "commits": len(latencies),
        "records": done,
        "records_per_s": round(done / sum(latencies), 1),
        "records_per_s_rounds": [round(len(r) * batch / sum(r), 1) for r in rounds if r],
        "commit_ms": _dist(latencies, 1e3),
        "disk_bytes_per_record": round(size / max(1, done), 1),
    }


def readback(
    factory: Callable[[], Engine], directory: Path, records: Sequence[Record]
) -> dict[str, Any]:
    engine = factory()
    t0 = time.perf_counter()
    if isinstance(engine, PycrdtStore):
        engine.load_directly(directory, records)
    else:
        engine.open(directory)
        try:
            for k in range(0, len(records), 1000):
                engine.commit(records[k : k + 1000])
        finally:
            engine.close()
    load_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    times: list[float] = []
    count = 0
    for _ in range(3):
        t0 = time.perf_counter()
        count = engine.read_all(directory)
        times.append(time.perf_counter() - t0)
    return {
        "records": len(records),
        "read": count,
        "read_s": round(statistics.median(times), 3),
        "read_s_runs": [round(t, 3) for t in times],
        "load_s": round(load_s, 2),
        "disk_bytes": size,
        "disk_bytes_per_record": round(size / max(1, len(records)), 1),
    }


# ---------------------------------------------------------------------------- full disk


def full_check(name: str, directory: Path, records: Sequence[Record]) -> dict[str, Any]:
    """One commit against a full disk: does the failure reach the caller, and what is left?"""
    directory.mkdir(parents=True, exist_ok=True)
    batch = list(records[:100])
    if name == "meshd-log":
        disk = SimDisk(capacity=8 << 10)
        store = Store(disk, "/store")
        store.recover()
        for doc, update in batch:
            store.append_update(doc, 0, update)
        ok = store.commit_now()
        return {
            "how": "simulated disk of 8 KiB (meshd.sim.disk), ENOSPC mid-write",
            "caller_told": not ok,
            "detail": f"commit_now() -> {ok}; store.failure = {store.failure!r} (the daemon "
            "then serves from memory, refuses state writes and retries a snapshot)",
        }
    if name.startswith("sqlite"):
        engine = Sqlite(name.split("-")[1].upper())
        engine.open(directory)
        assert engine.db is not None
        # No page beyond those it has: the next insert needs one.
        pages = engine.db.execute("PRAGMA page_count").fetchone()[0]
        engine.db.execute(f"PRAGMA max_page_count={pages}")
        try:
            engine.commit(batch)
            told, detail = False, "commit returned normally"
        except sqlite3.Error as exc:
            told, detail = True, f"{type(exc).__name__}: {exc}; transaction rolled back"
        rows = engine.db.execute("SELECT count(*) FROM log").fetchone()[0]
        engine.close()
        return {
            "how": "PRAGMA max_page_count = its page_count (SQLITE_FULL, what SQLite returns "
            "on ENOSPC)",
            "caller_told": told,
            "detail": f"{detail}; rows after: {rows}",
        }
    if name == "lmdb":
        engine_l = Lmdb(map_size=64 << 10)
        engine_l.open(directory)
        try:
            engine_l.commit(batch * 10)
            told, detail = False, "commit returned normally"
        except Exception as exc:
            told, detail = True, f"{type(exc).__name__}: {exc}; transaction aborted"
        engine_l.close()
        return {"how": "map_size=64 KiB (MDB_MAP_FULL)", "caller_told": told, "detail": detail}
    if name == "pycrdt-store":
        return anyio.run(_pycrdt_full, directory, batch, backend="trio")
    return {"how": "n/a", "caller_told": None, "detail": "no check for this engine"}


async def _pycrdt_full(directory: Path, batch: list[Record]) -> dict[str, Any]:
    module = importlib.import_module("pycrdt.store")
    cls = type("FullYStore", (module.SQLiteYStore,), {"db_path": str(directory / "full.db")})
    logging.getLogger("pycrdt.store.sqlite").setLevel(logging.CRITICAL)
    doc = batch[0][0]
    async with cls(doc) as store:
        await store.db_initialized.wait()
        store._db._real_connection.execute("PRAGMA max_page_count=6")
        raised = None
        returned = 0
        for _, update in [r for r in batch if r[0] == doc] * 20:
            try:
                await store.write(update)
                returned += 1
            except Exception as exc:
                raised = exc
                break
    db = sqlite3.connect(directory / "full.db")
    rows = db.execute("SELECT count(*) FROM yupdates").fetchone()[0]
    db.close()
    return {
        "how": "PRAGMA max_page_count=6 on its connection (SQLITE_FULL)",
        "caller_told": raised is not None,
        "detail": f"{returned} write() calls returned normally, {rows} rows stored; "
        + (
            f"raised {type(raised).__name__}"
            if raised
            else "errors are logged and swallowed "
            "(sqlite_anyio's exception_logger handler returns True)"
        ),
    }


# ---------------------------------------------------------------------------- main


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    names = args.engines.split(",")
    factories, skipped = available(names)
    batches = [int(b) for b in args.batches.split(",")]
    err.print(f"[dim]generating {args.readback} pycrdt deltas ...[/dim]")
    records = make_records(max(args.readback, 1000))
    sizes = [len(u) for _, u in records]
    result: dict[str, Any] = {
        "engines": {},
        "skipped": skipped,
        "record_bytes_mean": round(statistics.mean(sizes), 1),
    }
    # Engines take turns, ``--rounds`` slices each per batch size: the disk of a shared
    # machine drifts, and every engine then sees the same drift.
    for batch in batches:
        slices: dict[str, list[list[float]]] = {name: [] for name in factories}
        for _ in range(args.rounds):
            for name, factory in factories.items():
                directory = root / f"{name}-b{batch}"
                slices[name].append(
                    commit_for(factory, directory, records, batch, args.seconds / args.rounds)
                )
        for name in factories:
            directory = root / f"{name}-b{batch}"
            tp = summarize(slices[name], batch, directory)
            shutil.rmtree(directory, ignore_errors=True)
            result["engines"].setdefault(name, {"throughput": {}})["throughput"][str(batch)] = tp
            err.print(
                f"[dim]{name} batch {batch}: {tp['records_per_s']} records/s "
                f"{tp['records_per_s_rounds']}, commit p50 {tp['commit_ms']['p50']} ms "
                f"p99 {tp['commit_ms']['p99']} ms[/dim]"
            )
    for name, factory in factories.items():
        out = result["engines"].setdefault(name, {"throughput": {}})
        directory = root / f"{name}-readback"
        out["readback"] = readback(factory, directory, records[: args.readback])
        shutil.rmtree(directory, ignore_errors=True)
        err.print(f"[dim]{name} read-back: {out['readback']}[/dim]")
        if args.full_check:
            directory = root / f"{name}-full"
            out["full_disk"] = full_check(name, directory, records)
            shutil.rmtree(directory, ignore_errors=True)
        if not factory().group_commit:
            out["note"] = "no batch in its API: every change is its own transaction"
        result["engines"][name] = out
    result["method"] = {
        "meshd_version": meshd_version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "directory": "the run directory (same file system for every engine)",
        "workload": f"real pycrdt deltas (mean {result['record_bytes_mean']} B), {DOCS} "
        f"documents; batches {batches} per commit for {args.seconds} s per engine and batch "
        f"size, in {args.rounds} slices taking turns with the other engines; every commit "
        "durable when it returns, in the calling thread",
        "readback": f"{args.readback} records written in batches of 1000, then read in full by "
        "a fresh handle, median of 3 (page cache warm)",
    }
    return result


def print_summary(result: dict[str, Any]) -> None:
    console = Console()
    table = Table(title="storage engines: records/s with a durable commit", title_justify="left")
    table.add_column("engine")
    batches = sorted({b for e in result["engines"].values() for b in e["throughput"]}, key=int)
    for b in batches:
        table.add_column(f"batch {b}", justify="right")
    table.add_column("read-back (s)", justify="right")
    table.add_column("B/record", justify="right")
    table.add_column("full disk reported", justify="right")
    for name, e in result["engines"].items():
        row = [name]
        row += [str(e["throughput"].get(b, {}).get("records_per_s", "")) for b in batches]
        row.append(str(e["readback"]["read_s"]))
        row.append(str(e["readback"]["disk_bytes_per_record"]))
        row.append(str(e.get("full_disk", {}).get("caller_told", "")))
        table.add_row(*row)
    console.print(table)
    for name, why in result["skipped"].items():
        console.print(f"skipped {name}: {why}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.storage_engines",
        description="candidate storage engines: durable appends/s and read-back time",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    p.add_argument("--batches", default="1,10,100", help="changes per commit")
    p.add_argument("--seconds", type=float, default=3.0, help="per engine and batch size")
    p.add_argument("--rounds", type=int, default=3, help="slices per engine, taking turns")
    p.add_argument("--readback", type=int, default=100_000, help="records read back")
    p.add_argument("--no-full-check", dest="full_check", action="store_false")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    return p


def check_args(args: argparse.Namespace) -> None:
    args.engines = ",".join(harness.subset("--engines", args.engines, ENGINES))
    if any(int(b) < 1 for b in args.batches.split(",")) or min(args.readback, args.rounds) < 1:
        raise SystemExit("--batches, --readback and --rounds must be positive")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_args(args)
    return harness.run(
        "meshd-bench-engines-",
        lambda root: bench(args, root),
        keep=args.keep,
        as_json=args.json,
        table=print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
