"""Helpers for driving sans-IO replication cores by hand: no sockets, no tasks, no mocks.

A :class:`Net` holds several :class:`Replicator` cores. Every ``Send`` output is encoded with
``messages.encode`` and queued as bytes; delivery decodes it with ``messages.decode`` and hands
it to the receiving core, so every message also crosses the real wire format. Time only moves
when a test says so (:meth:`Net.run_until`), always through the cores' own deadlines.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable
from typing import Any

from pycrdt import Doc

from meshd.replication import messages, vectors
from meshd.replication.core import (
    AcceptPolicy,
    DocEvent,
    Output,
    ReplicationTuning,
    Replicator,
    Send,
    VectorReport,
    WriteDone,
)
from meshd.replication.messages import Message
from meshd.replication.replica import Replica
from meshd.state import values

# Anti-entropy that (practically) never fires by itself: tests start rounds explicitly.
QUIET = ReplicationTuning(anti_entropy_interval=1e9)

Drop = Callable[[str, str, Message], bool]


def tuning(**changes: Any) -> ReplicationTuning:
    return dataclasses.replace(QUIET, **changes)


@dataclasses.dataclass(frozen=True, slots=True)
class Delivered:
    src: str
    dst: str
    message: Message


class Net:
    """A few replication cores and an in-memory, instantaneous, lossless-by-default network."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.nodes: dict[str, Replicator] = {}
        self.in_flight: list[tuple[str, str, bytes]] = []
        self.delivered: list[Delivered] = []
        self.dropped: list[Delivered] = []
        self.outputs: dict[str, list[Output]] = {}
        self.listeners: dict[str, list[Callable[[Output], None]]] = {}
        self.drop: Drop | None = None

    # ------------------------------------------------------------------ setup

    def add(
        self,
        name: str,
        tune: ReplicationTuning = QUIET,
        *,
        accept: AcceptPolicy | None = None,
        seed: int | None = None,
    ) -> Replicator:
        rng = random.Random(f"{name}/{seed if seed is not None else 0}")
        core = Replicator(node=name, tuning=tune, rng=rng, now=self.now, accept=accept)
        self.nodes[name] = core
        self.outputs[name] = []
        self.listeners[name] = []
        return core

    def connect(self, names: Iterable[str] | None = None) -> None:
        """Every listed node (default: all) sees every other listed node as a live peer."""
        group = sorted(self.nodes if names is None else names)
        for name in group:
            self.nodes[name].set_peers(p for p in group if p != name)
        self.collect()

    def __getitem__(self, name: str) -> Replicator:
        return self.nodes[name]

    # ------------------------------------------------------------------ message flow

    def collect(self) -> None:
        """Take every core's outputs; listeners may cause more, which are taken too."""
        busy = True
        while busy:
            busy = False
            for name, core in list(self.nodes.items()):
                outputs = core.take_outputs()
                busy = busy or bool(outputs)
                self._route(name, outputs)

    def _route(self, name: str, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Send):
                if self.drop is not None and self.drop(name, out.peer, out.message):
                    self.dropped.append(Delivered(name, out.peer, out.message))
                else:
                    self.in_flight.append((name, out.peer, messages.encode(out.message)))
            else:
                self.outputs[name].append(out)
                for listener in list(self.listeners[name]):
                    listener(out)

    def deliver(self, limit: int = 100_000) -> int:
        """Deliver queued messages (and whatever they cause) in FIFO order until none is left."""
        self.collect()
        count = 0
        while self.in_flight:
            src, dst, frame = self.in_flight.pop(0)
            count += 1
            assert count <= limit, "message storm"
            core = self.nodes.get(dst)
            if core is None:
                continue
            message = messages.decode(frame)
            self.delivered.append(Delivered(src, dst, message))
            core.handle(self.now, src, message)
            while core.pending_work():
                core.work(self.now)
            self.collect()
        return count

    def hold(self) -> list[tuple[str, str, bytes]]:
        """Take every queued message out of the network (a test delivers them by hand)."""
        self.collect()
        held, self.in_flight = self.in_flight, []
        return held

    def inject(self, src: str, dst: str, message: Message) -> None:
        """Hand ``message`` (as ``src`` sent it) to ``dst`` through the wire format."""
        core = self.nodes[dst]
        core.handle(self.now, src, messages.decode(messages.encode(message)))
        while core.pending_work():
            core.work(self.now)
        self.collect()

    def run_until(self, until: float) -> None:
        """Advance time to ``until``, firing every core's timers in order."""
        self.deliver()
        while True:
            nxt = min((c.next_deadline() for c in self.nodes.values()), default=until)
            if nxt > until:
                break
            self.now = max(self.now, nxt)
            for core in self.nodes.values():
                core.tick(self.now)
            self.deliver()
        self.now = until

    def run(self, duration: float) -> None:
        self.run_until(self.now + duration)

    def sync(self, initiator: str, responder: str) -> None:
        """One anti-entropy round, carried to completion."""
        self.nodes[initiator].sync_with(self.now, responder)
        self.deliver()

    # ------------------------------------------------------------------ outputs

    def events(self, name: str) -> list[DocEvent]:
        return [o for o in self.outputs[name] if isinstance(o, DocEvent)]

    def done(self, name: str) -> list[WriteDone]:
        return [o for o in self.outputs[name] if isinstance(o, WriteDone)]

    def reports(self, name: str) -> list[VectorReport]:
        return [o for o in self.outputs[name] if isinstance(o, VectorReport)]

    def sent(self, kind: type[Any], src: str | None = None) -> list[Delivered]:
        return [
            d
            for d in self.delivered
            if isinstance(d.message, kind) and (src is None or d.src == src)
        ]


# ---------------------------------------------------------------------- state documents


def ops_for(raw: list[dict[str, Any]], current: dict[str, Any]) -> list[dict[str, Any]]:
    """Parse and dry-run ``raw`` against a marked plain value, as the state service does."""
    ops = values.parse_ops(raw)
    values.dry_run(current, ops)
    return ops


def marked(doc: Doc[Any]) -> dict[str, Any]:
    from pycrdt import Map

    plain: dict[str, Any] = values.to_plain(doc.get(values.ROOT, type=Map), marked=True)
    return plain


def change(
    core: Replicator,
    now: float,
    name: str,
    raw: list[dict[str, Any]],
    **kwargs: Any,
) -> int | None:
    """Apply state operations to ``name`` on ``core`` exactly as the state service would."""
    replica = core.store.get(name)
    current = marked(replica.doc) if replica is not None else {}
    ops = ops_for(raw, current)
    epoch = replica.epoch if replica is not None else 0
    return core.write(now, name, lambda d: values.apply_ops(d, ops), epoch=epoch, **kwargs)


def edit(replica: Replica, raw: list[dict[str, Any]]) -> bytes | None:
    """Apply state operations to a bare replica; returns the delta."""
    ops = ops_for(raw, marked(replica.doc))
    return replica.write(lambda d: values.apply_ops(d, ops))


def content(replica: Replica | None) -> Any:
    assert replica is not None
    return values.read(replica.doc)


def vector(replica: Replica | None) -> dict[int, int]:
    assert replica is not None
    return vectors.decode(replica.doc.get_state())


def encode_vector(vector: dict[int, int]) -> bytes:
    """lib0 v1 state-vector encoding (for hand-made vectors)."""
    out = bytearray(varuint(len(vector)))
    for client, clock in vector.items():
        out += varuint(client)
        out += varuint(clock)
    return bytes(out)


def varuint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
