"""Convergence, as properties: whatever replicas write, and however the updates travel.

1. Replicas make random map, list, counter and text changes; their deltas (and now and then a
   full update) are delivered between them in ANY order, duplicated, interleaved with more
   writes. Once every update reached every replica, all hold identical documents.
2. With every push lost, anti-entropy rounds alone (some of them losing messages too) bring
   every replica to the same documents.

Client ids are fixed so every example is reproducible.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from pycrdt import Doc
from replication_helpers import Net, change, content, edit, marked, vector

from meshd.replication.messages import Message, Nodes, Page, Push, Sync, Updates
from meshd.replication.replica import Replica
from meshd.state import values
from meshd_client.protocol import errors

DOC = "state/doc"
KEYS = ("a", "b", "c")
SCALARS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from(["x", "yé", "😀", ""]),
    st.none(),
    st.booleans(),
    st.sampled_from([0.5, -1.25]),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["p", "q"]), children, max_size=2)
    ),
    max_leaves=5,
)
TEXT = st.text(alphabet="abé😀 ", max_size=4)
KINDS = (
    "set",
    "set_nested",
    "delete",
    "incr",
    "counter",
    "list",
    "append",
    "insert",
    "list_delete",
    "list_set",
    "text",
    "text_insert",
    "text_delete",
)

SETTINGS = settings(
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def draw_op(data: st.DataObject, current: dict[str, Any]) -> dict[str, Any] | None:
    """One operation, drawn so that it is usually valid on ``current``."""
    kind = data.draw(st.sampled_from(KINDS))
    items = current.get("l")
    size = len(items) if isinstance(items, list) else 0
    text = current.get("t")
    length = len(text) if isinstance(text, values.TextStr) else 0
    if kind == "set":
        return {"op": "set", "path": [data.draw(st.sampled_from(KEYS))], "value": data.draw(VALUES)}
    if kind == "set_nested":
        path = [data.draw(st.sampled_from(KEYS)), data.draw(st.sampled_from(["p", "q"]))]
        return {"op": "set", "path": path, "value": data.draw(SCALARS)}
    if kind == "delete":
        present = sorted(current)  # mostly keys that exist, so that deletes take effect
        choices = present if present and data.draw(st.integers(0, 3)) else [*KEYS, "l", "t", "n"]
        return {"op": "delete", "path": [data.draw(st.sampled_from(choices))]}
    if kind == "incr":
        return {"op": "incr", "path": ["n"], "by": data.draw(st.integers(-5, 5))}
    if kind == "counter":
        return {"op": "set", "path": ["n"], "value": {"$counter": data.draw(st.integers(0, 5))}}
    if kind == "list":
        return {"op": "set", "path": ["l"], "value": data.draw(st.lists(SCALARS, max_size=3))}
    if kind == "append":
        return {
            "op": "append",
            "path": ["l"],
            "values": data.draw(st.lists(VALUES, min_size=1, max_size=2)),
        }
    if kind == "insert":
        index = data.draw(st.integers(0, size))
        return {"op": "insert", "path": ["l"], "index": index, "values": [data.draw(SCALARS)]}
    if kind in ("list_delete", "list_set"):
        if size == 0:
            return None
        index = data.draw(st.integers(0, size - 1))
        if kind == "list_delete":
            return {"op": "delete", "path": ["l", index]}
        return {"op": "set", "path": ["l", index], "value": data.draw(SCALARS)}
    if kind == "text":
        return {"op": "set", "path": ["t"], "value": {"$text": data.draw(TEXT)}}
    if kind == "text_insert":
        index = data.draw(st.integers(0, length))
        return {"op": "text_insert", "path": ["t"], "index": index, "text": data.draw(TEXT)}
    index = data.draw(st.integers(0, length))
    span = data.draw(st.integers(0, length - index))
    return {"op": "text_delete", "path": ["t"], "index": index, "length": span}


def draw_batch(data: st.DataObject, current: dict[str, Any]) -> list[dict[str, Any]]:
    ops = [draw_op(data, current) for _ in range(data.draw(st.integers(1, 3)))]
    return [op for op in ops if op is not None]


def write_random(data: st.DataObject, replica: Replica) -> bytes | None:
    batch = draw_batch(data, marked(replica.doc))
    if not batch:
        return None
    try:
        return edit(replica, batch)
    except errors.MeshError:
        return None  # refused by validation or the dry run: nothing was written


def assert_converged(replicas: list[Replica]) -> None:
    first = replicas[0]
    for other in replicas[1:]:
        assert content(other) == content(first)
        assert vector(other) == vector(first)
        assert other.sv == first.sv
        assert other.hash == first.hash


# ---------------------------------------------------------------------- any delivery order


@given(st.data())
@settings(SETTINGS, max_examples=examples(400))
def test_any_interleaving_duplication_and_reordering_converges(data: st.DataObject) -> None:
    count = data.draw(st.integers(2, 4), label="replicas")
    replicas = [Replica(DOC, 0, Doc(client_id=1000 + i)) for i in range(count)]
    pool: list[bytes] = []  # every update ever produced; delivered any number of times
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        action = data.draw(
            st.sampled_from(["write", "write", "write", "deliver", "deliver", "full"])
        )
        if action == "write":
            delta = write_random(data, replicas[data.draw(st.integers(0, count - 1))])
            if delta is not None:
                pool.append(delta)
        elif action == "deliver" and pool:
            update = data.draw(st.sampled_from(pool))
            replicas[data.draw(st.integers(0, count - 1))].apply(update)
        elif action == "full":
            pool.append(replicas[data.draw(st.integers(0, count - 1))].full_update())
    # Everything reaches everyone, each replica in its own order, some of it twice.
    for replica in replicas:
        order = data.draw(st.permutations(pool))
        again = data.draw(st.lists(st.sampled_from(pool), max_size=3)) if pool else []
        for update in [*order, *again]:
            replica.apply(update)
    assert_converged(replicas)


@given(st.data())
@settings(SETTINGS, max_examples=examples(100))
def test_full_updates_alone_converge(data: st.DataObject) -> None:
    """Exchanging whole documents (the repair of a fresh peer) converges the same way."""
    count = data.draw(st.integers(2, 4), label="replicas")
    replicas = [Replica(DOC, 0, Doc(client_id=2000 + i)) for i in range(count)]
    for _ in range(data.draw(st.integers(1, 20), label="steps")):
        if data.draw(st.booleans()):
            write_random(data, replicas[data.draw(st.integers(0, count - 1))])
        else:
            src, dst = data.draw(st.integers(0, count - 1)), data.draw(st.integers(0, count - 1))
            replicas[dst].apply(replicas[src].full_update())
    for _ in range(2):
        for src in replicas:
            for dst in replicas:
                dst.apply(src.full_update())
    assert_converged(replicas)


# ---------------------------------------------------------------------- anti-entropy alone


def docs_of(count: int) -> list[str]:
    return [DOC, *(f"state/own-{i}" for i in range(count))]


@given(st.data())
@settings(SETTINGS, max_examples=examples(150))
def test_anti_entropy_alone_converges(data: st.DataObject) -> None:
    count = data.draw(st.integers(2, 4), label="nodes")
    names = [f"n{i}" for i in range(count)]
    net = Net()
    for i, name in enumerate(names):
        core = net.add(name)
        # Fixed client ids: a shared document on every node, and one only node i has.
        core.replace(DOC, 0, Doc(client_id=3000 + i))
        core.replace(f"state/own-{i}", 0, Doc(client_id=4000 + i))
    net.connect()
    lost: list[type[Message]] = []
    net.drop = lambda _s, _d, m: isinstance(m, Push) or any(isinstance(m, k) for k in lost)
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        action = data.draw(st.sampled_from(["write", "write", "round", "lossy round"]))
        if action == "write":
            i = data.draw(st.integers(0, count - 1))
            name = data.draw(st.sampled_from([DOC, f"state/own-{i}"]))
            replica = net[names[i]].store.get(name)
            assert replica is not None
            batch = draw_batch(data, marked(replica.doc))
            if batch:
                try:
                    change(net[names[i]], net.now, name, batch)
                except errors.MeshError:
                    pass
        else:
            a = data.draw(st.sampled_from(names))
            b = data.draw(st.sampled_from([n for n in names if n != a]))
            if action == "lossy round":
                lost[:] = [data.draw(st.sampled_from([Nodes, Page, Sync, Updates]))]
            net.sync(a, b)
            lost.clear()
        net.run(0.01)
    # Rounds between every pair, twice over, with nothing lost but the pushes.
    for _ in range(2):
        for a in names:
            for b in names:
                if a != b:
                    net.sync(a, b)
    assert len({net[n].store.digest() for n in names}) == 1
    for doc in docs_of(count):
        replicas = [net[n].store.get(doc) for n in names]
        assert all(r is not None for r in replicas), doc
        assert_converged([r for r in replicas if r is not None])
    assert all(net[n].stats.rejected == {} for n in names)
