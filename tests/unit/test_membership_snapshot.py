"""The peers snapshot: what is kept, the file format, bad files, and the debounced writer.

The writer tests run on real files in ``tmp_path`` under trio's autojump clock.
"""

from __future__ import annotations

import json
import logging
import os
import random
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from meshd.membership.events import EventKind, MemberEvent, MemberView
from meshd.membership.snapshot import (
    MAX_BYTES,
    Peer,
    PeersSnapshot,
    SnapshotError,
    decode_peers,
    encode_peers,
    read_peers,
    rejoin_seeds,
    snapshot_peers,
    write_atomic,
)
from meshd.node.node import remembered_peers
from meshd.wire.membership import Status

LOG = logging.getLogger("meshd.test")


def view(name: str, status: Status = Status.ALIVE, since: float = 0.0) -> MemberView:
    """A member whose address is derived from its name."""
    return MemberView(name, ("10.0.0.1", 7000 + ord(name[-1])), 0, status, {}, since)


def peer(m: MemberView) -> Peer:
    return Peer(m.name, m.addr)


# ---------------------------------------------------------------------------- what is kept


def test_every_member_but_this_node_and_those_that_left_is_kept_sorted_by_name() -> None:
    members = [
        view("me"),
        view("d", Status.DEAD),
        view("b", Status.SUSPECT),
        view("a"),
        view("gone", Status.LEFT, since=10.0),
    ]
    peers, expiring = snapshot_peers(members, "me", now=100.0, keep_left=5.0)
    assert peers == [peer(members[3]), peer(members[2]), peer(members[1])]
    assert expiring is False


def test_a_member_that_just_left_is_kept_for_keep_left_seconds() -> None:
    members = [view("a"), view("b", Status.LEFT, since=100.0)]
    peers, expiring = snapshot_peers(members, "me", now=104.9, keep_left=5.0)
    assert [p.name for p in peers] == ["a", "b"] and expiring is True
    peers, expiring = snapshot_peers(members, "me", now=105.0, keep_left=5.0)
    assert [p.name for p in peers] == ["a"] and expiring is False


def test_remembered_peers_are_kept_unless_the_table_knows_them() -> None:
    members = [view("a"), view("b", Status.LEFT, since=0.0)]
    remembered = [
        Peer("a", ("10.9.9.9", 1)),  # the table's address wins
        Peer("b", ("10.9.9.9", 2)),  # left: the table decides, it is dropped
        Peer("c", ("10.9.9.9", 3)),  # not seen in this run yet: kept
        Peer("me", ("10.9.9.9", 4)),
    ]
    peers, _ = snapshot_peers(members, "me", now=100.0, keep_left=5.0, remembered=remembered)
    assert peers == [peer(members[0]), Peer("c", ("10.9.9.9", 3))]


# ---------------------------------------------------------------------------- the file format


def test_encode_and_decode_round_trip() -> None:
    peers = [
        Peer("n1", ("127.0.0.1", 7001)),
        Peer("n2", ("::1", 7002)),
        Peer("é-3", ("10.0.0.3", 1)),
    ]
    data = encode_peers(reversed(peers))
    assert decode_peers(data) == peers
    doc = json.loads(data)
    assert doc["version"] == 1
    assert doc["peers"][0] == {"name": "n1", "host": "127.0.0.1", "port": 7001}
    assert decode_peers(encode_peers([])) == []


def test_decode_ignores_unknown_keys_and_takes_a_name_once() -> None:
    data = json.dumps(
        {
            "version": 1,
            "written_by": "a newer daemon",
            "peers": [
                {"name": "n1", "host": "127.0.0.1", "port": 1, "zone": "x"},
                {"name": "n1", "host": "127.0.0.2", "port": 2},
            ],
        }
    ).encode()
    assert decode_peers(data) == [Peer("n1", ("127.0.0.1", 1))]


def row(**changes: object) -> bytes:
    entry: dict[str, object] = {"name": "n1", "host": "127.0.0.1", "port": 7946}
    entry.update(changes)
    return json.dumps({"version": 1, "peers": [entry]}).encode()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "not JSON"),
        (b'{"version": 1, "peers": [', "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"peers": []}', "unknown version None"),
        (b'{"version": 2, "peers": []}', "unknown version 2"),
        (b'{"version": "1", "peers": []}', "unknown version '1'"),
        (b'{"version": true, "peers": []}', "unknown version True"),
        (b'{"version": 1}', "peers: expected a list"),
        (b'{"version": 1, "peers": {}}', "peers: expected a list"),
        (b'{"version": 1, "peers": [7]}', "peers[1]: expected an object"),
        (row(name=None), "peers[1].name"),
        (row(name=""), "peers[1].name"),
        (row(name="x" * 129), "peers[1].name"),
        (row(name="a\nb"), "peers[1].name: not printable"),
        (row(host="localhost"), "'localhost' is not an IP address"),
        (row(host=["127.0.0.1"]), "peers[1].host"),
        (row(port=0), "peers[1].port"),
        (row(port=65536), "peers[1].port"),
        (row(port="7946"), "peers[1].port"),
        (row(port=True), "peers[1].port"),
    ],
)
def test_malformed_snapshots_are_refused_with_a_reason(data: bytes, problem: str) -> None:
    with pytest.raises(SnapshotError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        decode_peers(data)


def test_read_peers(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    assert read_peers(str(path)) is None  # no file: nothing remembered, not an error
    path.write_bytes(encode_peers([Peer("n1", ("127.0.0.1", 1))]))
    assert read_peers(str(path)) == [Peer("n1", ("127.0.0.1", 1))]
    path.write_bytes(b" " * (MAX_BYTES + 1))
    with pytest.raises(SnapshotError, match="larger than"):
        read_peers(str(path))
    with pytest.raises(OSError):
        read_peers(str(tmp_path))  # a directory


def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    path.write_bytes(b"old")
    write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["peers.json"]
    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "missing" / "peers.json"), b"x")
    assert os.listdir(tmp_path) == ["peers.json"]


def test_rejoin_seeds_tries_every_address_up_to_a_limit() -> None:
    peers = [Peer(f"n{i}", ("10.0.0.1", 1000 + i)) for i in range(10)]
    assert rejoin_seeds(peers[:3], random.Random(1), limit=4) == [p.addr for p in peers[:3]]
    chosen = rejoin_seeds(peers, random.Random(1), limit=4)
    assert len(set(chosen)) == 4 and set(chosen) <= {p.addr for p in peers}


# ---------------------------------------------------------------------------- at start


def test_remembered_peers_leave_out_this_node(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    assert remembered_peers(str(path), "me") == []
    path.write_bytes(encode_peers([Peer("me", ("127.0.0.1", 1)), Peer("n2", ("127.0.0.1", 2))]))
    assert remembered_peers(str(path), "me") == [Peer("n2", ("127.0.0.1", 2))]


@pytest.mark.parametrize("content", [b"{garbage", b'{"version": 9, "peers": []}'])
def test_a_bad_snapshot_is_logged_with_its_name_and_ignored(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "peers.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="meshd"):
        assert remembered_peers(str(path), "me") == []
    [record] = [r for r in caplog.records if r.getMessage() == "ignoring the peers snapshot"]
    assert record.fields["file"] == str(path)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- the writer


class Table:
    """A membership table the test edits; the writer reads it through ``members``."""

    def __init__(self, *members: MemberView) -> None:
        self.rows = {m.name: m for m in members}

    def members(self) -> list[MemberView]:
        return list(self.rows.values())

    def set(self, m: MemberView) -> MemberEvent:
        self.rows[m.name] = m
        kind = EventKind.LEAVE if m.status is Status.LEFT else EventKind.JOIN
        return MemberEvent(kind, m, trio.current_time())


def names(path: Path) -> list[str]:
    return [p.name for p in read_peers(str(path)) or []]


@asynccontextmanager
async def writing(
    path: Path, *members: MemberView, **options: Any
) -> AsyncIterator[tuple[Table, PeersSnapshot]]:
    """A running writer of ``path`` (every 5 s) over a table holding ``members``; "me" is
    this node."""
    table = Table(*members)
    snapshot = PeersSnapshot(str(path), table.members, "me", LOG, **{"interval": 5.0, **options})
    async with trio.open_nursery() as nursery:
        await nursery.start(snapshot.run)
        yield table, snapshot
        nursery.cancel_scope.cancel()


async def test_the_writer_is_debounced_and_writes_only_changes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "peers.json"
    async with writing(path, view("me")) as (table, snapshot):
        for name in "abc":
            snapshot.on_member_event(table.set(view(name)))
            await trio.sleep(1.0)
        assert not path.exists()  # a burst of changes: one write, once the interval is over
        await snapshot.wait_writes(1)
        assert names(path) == ["a", "b", "c"]
        for kind in (EventKind.SUSPECT, EventKind.DEAD, EventKind.UPDATE):
            snapshot.on_member_event(MemberEvent(kind, view("a"), trio.current_time()))
        await trio.sleep(20.0)
        snapshot.on_member_event(table.set(view("d")))
        await snapshot.wait_writes(2)
        assert names(path) == ["a", "b", "c", "d"]
        assert snapshot.writes == 2  # nothing that matters changed in between


async def test_who_left_is_dropped_once_keep_left_has_passed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "peers.json"
    async with writing(path, view("a"), view("b")) as (table, snapshot):
        snapshot.on_member_event(table.set(view("c")))
        await trio.sleep(4.0)
        snapshot.on_member_event(table.set(view("b", Status.LEFT, since=trio.current_time())))
        await snapshot.wait_writes(1)
        assert names(path) == ["a", "b", "c"]  # written 1 s after b left: still there
        await snapshot.wait_writes(2)
        assert names(path) == ["a", "c"]  # and written again without it, unasked


async def test_close_writes_once_more_keeping_who_just_left_and_then_stops(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "peers.json"
    async with writing(path, view("a"), view("b")) as (table, snapshot):
        # The whole cluster stops: the others' leaves arrive as this daemon stops too.
        snapshot.on_member_event(table.set(view("a", Status.LEFT, since=trio.current_time())))
        snapshot.on_member_event(table.set(view("b", Status.LEFT, since=trio.current_time())))
        await snapshot.close()
        assert names(path) == ["a", "b"]
        snapshot.on_member_event(table.set(view("c")))
        await trio.sleep(30.0)
        assert snapshot.writes == 1  # nothing is written after close


async def test_remembered_peers_stay_until_seen_or_forgotten(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "peers.json"
    remembered = [Peer("a", ("10.0.0.9", 1)), Peer("b", ("10.0.0.9", 2))]
    async with writing(path, remembered=remembered, forget_after=100.0) as (table, snapshot):
        snapshot.on_member_event(table.set(view("a")))
        await snapshot.wait_writes(1)
        assert read_peers(str(path)) == [peer(view("a")), remembered[1]]
        snapshot.on_member_event(table.set(view("a", Status.LEFT, since=trio.current_time())))
        await snapshot.wait_writes(2)
        assert names(path) == ["b"]  # a was seen, then left: gone for good
        await trio.sleep(100.0)
        snapshot.on_member_event(table.set(view("c")))
        await snapshot.wait_writes(3)
        assert names(path) == ["c"]  # b, not seen for reconnect_timeout: forgotten


async def test_a_failed_write_is_logged_and_the_writer_goes_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone" / "peers.json"
    async with writing(path) as (table, snapshot):
        with caplog.at_level(logging.WARNING, logger="meshd"):
            snapshot.on_member_event(table.set(view("a")))
            await snapshot.wait_writes(1)
        assert (snapshot.writes, snapshot.write_errors) == (0, 1)
        assert [r.getMessage() for r in caplog.records] == ["cannot write the peers snapshot"]
        path.parent.mkdir()
        snapshot.on_member_event(table.set(view("b")))
        await snapshot.wait_writes(2)
        assert names(path) == ["a", "b"]
