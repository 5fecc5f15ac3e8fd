"""All-or-nothing ``majority`` writes (docs/replication.md#withdrawn-writes), sans IO on real
documents: a once-keyed write that misses its majority is withdrawn, its undo spreads
behind it, and a retry of the same key elsewhere (a failover across a partition) takes
effect exactly once after the heal."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
import trio
import trio.testing
from pycrdt import Doc, Map
from replication_helpers import Net, content, marked, ops_for, tuning

from meshd.replication.core import Persist, Replicator, WriteDone
from meshd.replication.driver import ReplicationDriver
from meshd.replication.replica import Replica
from meshd.state import compaction, values
from meshd.state.service import StateService
from meshd_client.protocol import errors

DOC = "state/agent:counter/c1"
SEED = [
    {"op": "set", "path": ["handled"], "value": []},
    {"op": "set", "path": ["count"], "value": {"$counter": 0}},
]


def handle(key: str) -> list[dict[str, Any]]:
    """What the chaos counter agent does for one message (append its id, count it)."""
    return [
        {"op": "append", "path": ["handled"], "values": [key]},
        {"op": "incr", "path": ["count"], "by": 1},
    ]


def once_write(core: Replicator, now: float, raw: list[dict[str, Any]], key: str) -> int:
    """A once-keyed ``majority`` write, exactly as the state service makes one."""
    replica = core.store.get(DOC)
    current = marked(replica.doc) if replica is not None else {}
    ops = ops_for(raw, current)
    roots, names = values.undo_plan(replica.doc if replica is not None else Doc(), ops)

    def apply(doc: Doc[Any]) -> None:
        values.apply_ops(doc, ops, names)
        values.record_once(doc, key, 1, per_writer=True)

    epoch = replica.epoch if replica is not None else 0
    token = core.write(now, DOC, apply, epoch=epoch, durability="majority", undo_roots=roots)
    assert token is not None
    return token


def seeded(*names: str, **tune: Any) -> Net:
    net = Net()
    for name in names:
        net.add(name, tuning(majority_timeout=5.0, **tune))
    net.connect()
    replica_ops = ops_for(SEED, {})
    net[names[0]].write(0.0, DOC, lambda d: values.apply_ops(d, replica_ops))
    net.run(0.1)
    return net


def state(net: Net, node: str) -> dict[str, Any]:
    replica = net[node].store.get(DOC)
    value: dict[str, Any] = content(replica)
    assert replica is not None
    once = list(replica.doc.get(values.ONCE, type=Map).keys())
    value["once"] = sorted(
        values.once_key(k) for k in once if values.applied_once(replica.doc, values.once_key(k))
    )
    assert len(value["once"]) == len(once)
    return value


def heal(net: Net) -> None:
    net.drop = None
    net.connect()
    names = sorted(net.nodes)
    for a in names:
        for b in names:
            if a != b:
                net.sync(a, b)


def test_a_failed_once_write_is_withdrawn_everywhere_it_went() -> None:
    net = seeded("a", "b", "c", "d", "e")
    net.drop = lambda _s, dst, _m: dst in ("c", "d", "e")
    token = once_write(net["a"], net.now, handle("r1"), "r1")
    net.deliver()
    assert state(net, "b")["handled"] == ["r1"]  # b holds it: two of five
    net.run(5.1)
    assert net.done("a") == [WriteDone(token, False, ("a", "b"), 3, 5)]
    assert net["a"].settle(net.now, token, keep=False) == DOC
    net.run(0.1)
    for node in ("a", "b"):
        assert state(net, node) == {"handled": [], "count": 0, "once": []}
    assert net["a"].stats.withdrawn == 1
    heal(net)
    for node in "abcde":
        assert state(net, node) == {"handled": [], "count": 0, "once": []}


def test_a_withdrawal_is_logged_like_any_write_so_a_restart_keeps_it_withdrawn() -> None:
    net = seeded("a", "b", "c", "d", "e")
    net.drop = lambda _s, dst, _m: dst in ("c", "d", "e")
    token = once_write(net["a"], net.now, handle("r1"), "r1")
    net.run(5.1)
    assert net["a"].settle(net.now, token, keep=False) == DOC
    net.run(0.1)
    for node in ("a", "b"):
        # What the store's log holds for the document, replayed as a restart reads it back.
        records = [o for o in net.outputs[node] if isinstance(o, Persist) and o.doc == DOC]
        replayed = Replica(DOC, 0)
        for record in records:
            if record.update:
                replayed.apply(record.update)
        assert values.read(replayed.doc) == {"handled": [], "count": 0}
        assert not values.applied_once(replayed.doc, "r1")


def run_partition(*, withdraw: bool) -> Net:
    """{a, b} | {c, d, e}: a handles r1 as the cut falls (its majority fails), the majority
    side takes the agent over and handles the retry of r1; then the cut heals."""
    net = seeded("a", "b", "c", "d", "e")
    minority, majority = {"a", "b"}, {"c", "d", "e"}
    net.drop = lambda src, dst, _m: (src in minority) != (dst in minority)
    first = once_write(net["a"], net.now, handle("r1"), "r1")
    net.run(5.1)
    assert [d.ok for d in net.done("a")] == [False]
    net["a"].settle(net.now, first, keep=not withdraw)
    retry = once_write(net["c"], net.now, handle("r1"), "r1")
    net.deliver()
    assert [d.ok for d in net.done("c")] == [True]
    net["c"].settle(net.now, retry, keep=True)
    assert all(state(net, n)["handled"] == ["r1"] for n in majority)
    heal(net)
    return net


def test_a_retry_on_the_majority_side_takes_effect_once_after_the_heal() -> None:
    net = run_partition(withdraw=True)
    for node in "abcde":
        assert state(net, node) == {"handled": ["r1"], "count": 1, "once": ["r1"]}


def test_without_the_withdrawal_the_same_run_applies_the_message_twice() -> None:
    # What this guards against: both copies of the append survive the merge.
    net = run_partition(withdraw=False)
    for node in "abcde":
        assert state(net, node)["handled"] == ["r1", "r1"]
        assert state(net, node)["count"] == 2


def test_a_write_that_reached_its_majority_is_kept() -> None:
    net = seeded("a", "b", "c")
    token = once_write(net["a"], net.now, handle("r1"), "r1")
    net.deliver()
    assert [d.ok for d in net.done("a")] == [True]
    assert net["a"].settle(net.now, token, keep=True) is None
    replica = net["a"].store.get(DOC)
    assert replica is not None and replica.undos == 0
    assert net["a"].settle(net.now, token, keep=False) is None  # settled once only
    for node in "abc":
        assert state(net, node) == {"handled": ["r1"], "count": 1, "once": ["r1"]}


def test_withdrawal_restores_what_it_overwrote_and_keeps_everyone_elses_changes() -> None:
    net = seeded("a", "b", "c")
    base = ops_for([{"op": "set", "path": ["x"], "value": {"v": 1, "n": {"$counter": 4}}}], {})
    net["a"].write(net.now, DOC, lambda d: values.apply_ops(d, base))
    net.run(0.1)
    before = state(net, "a")
    net.drop = lambda _s, dst, _m: dst == "c"
    net["a"].set_peers(["b"])
    raw = [
        {"op": "set", "path": ["x", "v"], "value": 2},
        {"op": "incr", "path": ["x", "n"], "by": 10},
        {"op": "incr", "path": ["hits"], "by": 3},  # a new path-named counter
        {"op": "set", "path": ["list"], "value": [{"$counter": 7}, "s"]},  # a fresh one
        handle("r9")[0],
    ]
    token = once_write(net["a"], net.now, raw, "r9")
    net.deliver()
    # b changes the document meanwhile (its own key), and a integrates that.
    b_replica = net["b"].store.get(DOC)
    assert b_replica is not None
    other = ops_for([{"op": "set", "path": ["y"], "value": 7}], marked(b_replica.doc))
    net["b"].write(net.now, DOC, lambda d: values.apply_ops(d, other))
    net.run(0.1)
    after_write = state(net, "a")
    assert after_write["x"] == {"v": 2, "n": 14} and after_write["hits"] == 3
    assert after_write["list"] == [7, "s"] and after_write["y"] == 7
    net.run(5.1)
    assert net["a"].settle(net.now, token, keep=False) == DOC
    net.run(0.1)
    for node in ("a", "b"):
        assert state(net, node) == {**before, "y": 7}
    replica = net["a"].store.get(DOC)
    assert replica is not None
    # The counters the write created hold nothing (a later counter at the path starts at 0).
    slots = [k for k in replica.doc if k.startswith(values.SLOTS_PREFIX)]
    sums = {k: sum(v for v in replica.doc.get(k, type=Map).values()) for k in slots}
    assert sum(sums.values()) == 4
    heal(net)
    assert state(net, "c") == {**before, "y": 7}


def test_a_batch_that_retires_a_counter_and_recreates_it_is_withdrawn_whole() -> None:
    net = seeded("a", "b", "c")
    hits = [{"op": "incr", "path": ["hits"], "by": 2}]
    net["a"].write(net.now, DOC, lambda d: values.apply_ops(d, ops_for(hits, marked(d))))
    net.run(0.1)
    net.drop = lambda _s, dst, _m: dst != "a"
    raw = [{"op": "delete", "path": ["hits"]}, {"op": "incr", "path": ["hits"], "by": 5}]
    token = once_write(net["a"], net.now, raw, "r2")
    assert state(net, "a")["hits"] == 5
    net.run(5.1)
    assert net["a"].settle(net.now, token, keep=False) == DOC
    assert state(net, "a") == {"handled": [], "count": 0, "hits": 2, "once": []}


def test_once_keys_recorded_per_writer_are_found_and_compaction_makes_them_plain() -> None:
    net = seeded("a", "b")
    once_write(net["a"], net.now, handle("r1"), "r1")
    net.run(0.1)
    replica = net["b"].store.get(DOC)
    assert replica is not None
    entries = list(replica.doc.get(values.ONCE, type=Map).keys())
    assert entries == [f"r1{values.WRITER_SEP}{net['a'].store.get(DOC).doc.client_id}"]  # type: ignore[union-attr]
    assert values.applied_once(replica.doc, "r1") and not values.applied_once(replica.doc, "r")
    fresh = compaction.fresh_copy(replica)
    assert list(fresh.get(values.ONCE, type=Map).keys()) == ["r1"]
    assert values.applied_once(fresh, "r1")


def test_a_replica_that_may_be_withdrawn_stays_hot_until_settled() -> None:
    replica = Replica(DOC, 0, Doc())
    seed = ops_for(SEED, {})
    replica.write(lambda d: values.apply_ops(d, seed))
    roots, names = values.undo_plan(replica.doc, ops_for(handle("r1"), marked(replica.doc)))
    ops = ops_for(handle("r1"), marked(replica.doc))
    _delta, undo = replica.write_undoable(lambda d: values.apply_ops(d, ops, names), roots)
    assert replica.evict() is False
    replica.settle(undo)
    assert replica.evict() is True
    assert values.read(replica.doc) == {"handled": ["r1"], "count": 1}


def test_a_write_whose_document_was_replaced_meanwhile_stays() -> None:
    net = seeded("a", "b", "c")
    net.drop = lambda _s, dst, _m: dst != "a"
    token = once_write(net["a"], net.now, handle("r1"), "r1")
    replica = net["a"].store.get(DOC)
    assert replica is not None
    compacted: Doc[Any] = Doc()
    compacted.apply_update(replica.full_update())
    net["a"].replace(DOC, replica.epoch + 1, compacted)
    net.run(5.1)
    assert net["a"].settle(net.now, token, keep=False) is None
    assert net["a"].stats.withdraw_failed == 1
    assert state(net, "a")["handled"] == ["r1"]


# ---------------------------------------------------------------------- through the service


async def test_the_service_withdraws_a_once_keyed_majority_write_that_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    core = Replicator(node="a", tuning=tuning(majority_timeout=2.0), rng=random.Random(1), now=0.0)
    driver = ReplicationDriver(core, logging.getLogger("test.withdraw"))
    service = StateService(driver)
    name = DOC.removeprefix("state/")
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        driver.set_members(["b"], ["a", "b", "c"])  # b and c never answer
        await service.update(name, SEED)
        with pytest.raises(errors.Timeout) as caught:
            await service.update(name, handle("r1"), "majority", once="r1")
        assert caught.value.detail["withdrawn"] is True
        assert "withdrawn" in caught.value.message
        assert service.get(name) == {"handled": [], "count": 0}
        assert core.stats.withdrawn == 1
        # Without a once key a failed majority write stays applied (and spreads).
        with pytest.raises(errors.Timeout) as caught:
            await service.update(name, handle("r2"), "majority")
        assert "withdrawn" not in caught.value.detail
        assert "applied here and will spread" in caught.value.message
        assert service.get(name) == {"handled": ["r2"], "count": 1}

        # A repeat of a key whose first write is undecided waits for it (rather than
        # answering "duplicate" for a write that is then withdrawn).
        outcomes: list[Any] = []

        async def attempt() -> None:
            try:
                outcomes.append(await service.update(name, handle("r3"), "majority", once="r3"))
            except errors.Timeout as exc:
                outcomes.append(exc.detail.get("withdrawn"))

        async with trio.open_nursery() as both:
            both.start_soon(attempt)
            both.start_soon(attempt)
        assert outcomes == [True, True]
        assert service.get(name) == {"handled": ["r2"], "count": 1}

        # A wait that is cancelled withdraws the write as well.
        with trio.move_on_after(0.5):
            await service.update(name, handle("r4"), "majority", once="r4")
        assert service.get(name) == {"handled": ["r2"], "count": 1}
        replica = core.store.get(DOC)
        assert replica is not None and replica.undos == 0
        nursery.cancel_scope.cancel()
