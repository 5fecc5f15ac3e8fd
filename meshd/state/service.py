"""The state service: read, change and watch named state documents.

Documents are replicated as ``state/<name>``; an agent's own document is named
``agent:<agent name>``. Changes are lists of operations validated and dry-run first, then
applied in one transaction, so a batch is all or nothing.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any, Final

import trio
from pycrdt import Doc, Map

from meshd.replication.core import DocEvent, Durability
from meshd.replication.driver import ReplicationDriver, WriteResult
from meshd.state import values
from meshd_client.protocol import errors

DOC_PREFIX: Final = "state/"
AGENT_PREFIX: Final = "agent:"
MAX_NAME: Final = 200

Watcher = Callable[[str, Any], None]


def doc_name(name: str) -> str:
    return DOC_PREFIX + name


def agent_state(agent: str) -> str:
    """The name of an agent's own state document."""
    return AGENT_PREFIX + agent


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise errors.Invalid(f"state document names are 1..{MAX_NAME} printable characters")
    return name


def outcome(result: WriteResult) -> dict[str, Any]:
    """A write's summary for the client, or the typed error of a write that did not reach
    the durability asked for (it is applied here all the same and spreads as usual, unless
    it was withdrawn: see :meth:`StateService.update`)."""
    summary = {"acked": list(result.acked), "needed": result.needed, "total": result.total}
    if result.ok:
        return summary
    fate = "applied here and will spread"
    if result.withdrawn:
        summary["withdrawn"] = True
        fate = "withdrawn (a once-keyed majority write is all or nothing)"
    if result.reason == "not_joined":
        raise errors.Unreachable(
            "no majority can be counted: this node has not joined its cluster yet (the "
            f"change is {fate})",
            detail=summary,
        )
    if result.reason == "storage":
        raise errors.Overloaded(
            "the change is not on this node's disk: its storage is failing (see meshctl "
            f"storage); it is {fate}",
            detail={**summary, "storage": "failing"},
        )
    raise errors.Timeout(
        f"majority not reached: {len(result.acked)} of {result.total} members hold the "
        f"change, {result.needed} needed (a majority of the cluster: dead members count until "
        f"they are reaped or removed; the change is {fate})",
        detail=summary,
    )


def check_writable(driver: ReplicationDriver) -> None:
    """Refuse a state change while this node's store cannot take it (disk full, I/O
    errors): nothing is changed, and the client can retry once storage recovered."""
    storage = driver.storage
    if storage is not None and not storage.writable:
        kind = storage.store.failure or "io_error"
        raise errors.Overloaded(
            f"storage unavailable ({kind}): state changes are refused until it recovers "
            f"({storage.store.failure_detail})",
            detail={"storage": kind},
        )


class StateService:
    """Read, change and watch state documents (``state/<name>``), all or nothing per batch.

    Owns: the state watchers. Changes documents only through the replication driver's write
    path, and refuses changes while the store cannot take them."""

    def __init__(self, driver: ReplicationDriver) -> None:
        self.driver = driver
        self.watchers: dict[str, dict[int, Watcher]] = {}  # doc -> {key: watcher}
        self._watch_keys = itertools.count()
        # Once-keyed majority writes still waiting for their outcome: a repeat of the key
        # here waits too, since the first may yet be withdrawn.
        self._undecided: dict[tuple[str, str], trio.Event] = {}
        driver.doc_listeners.append(self._on_doc_event)

    def _replica_epoch(self, doc: str) -> int:
        replica = self.driver.store.get(doc)
        return replica.epoch if replica is not None else 0

    async def update(
        self,
        name: str,
        ops: Any,
        durability: Durability = "local",
        once: str | None = None,
        *,
        on_wait: Callable[[], Callable[[str], None]] | None = None,
    ) -> dict[str, Any]:
        """Apply ``ops`` atomically. With ``once`` (an idempotency key such as a message id),
        a repeat of the same key changes nothing and reports ``duplicate``. ``on_wait`` is
        called when a ``majority`` write starts waiting for its copies; what it returns is
        called with the wait's outcome (tracing's ``meshd.majority_wait`` span)."""
        name = check_name(name)
        parsed = values.parse_ops(ops)
        if once is not None and (
            not isinstance(once, str) or not 0 < len(once) <= 128 or not once.isprintable()
        ):
            raise errors.Invalid("once must be a string of 1..128 printable characters")
        doc = doc_name(name)
        if once is not None:
            while (undecided := self._undecided.get((doc, once))) is not None:
                await undecided.wait()
        replica = self.driver.store.get(doc)
        if once is not None and replica is not None and values.applied_once(replica.doc, once):
            return {"duplicate": True, "acked": [], "needed": 0, "total": 0}
        current = (
            values.to_plain(replica.doc.get(values.ROOT, type=Map), marked=True)
            if replica is not None
            else {}
        )
        values.dry_run(current, parsed)

        # A once-keyed ``majority`` write is all or nothing: if its majority is not reached it
        # is withdrawn, so a retry (maybe on another host, after a failover) takes effect
        # once. Any other write that misses its durability stays applied and spreads.
        undo_roots: list[str] | None = None
        names = values.fresh_name
        if once is not None and durability == "majority":
            undo_roots, names = values.undo_plan(
                replica.doc if replica is not None else Doc(), parsed
            )

        def apply(d: Any) -> None:
            values.apply_ops(d, parsed, names)
            if once is not None:
                wall_ms = int(time.time() * 1000)
                values.record_once(d, once, wall_ms, per_writer=undo_roots is not None)

        check_writable(self.driver)
        if undo_roots is None or once is None:
            return await self._write(doc, apply, durability, undo_roots, on_wait)
        decided = self._undecided[(doc, once)] = trio.Event()
        try:
            return await self._write(doc, apply, durability, undo_roots, on_wait)
        finally:
            del self._undecided[(doc, once)]
            decided.set()

    async def _write(
        self,
        doc: str,
        apply: Callable[[Any], None],
        durability: Durability,
        undo_roots: list[str] | None,
        on_wait: Callable[[], Callable[[str], None]] | None,
    ) -> dict[str, Any]:
        epoch = self._replica_epoch(doc)
        if on_wait is None or durability != "majority":
            result = await self.driver.update(
                doc, apply, epoch=epoch, durability=durability, undo_roots=undo_roots
            )
            return outcome(result)
        finished = on_wait()
        ended = "cancelled"
        try:
            # Nothing between the write and its wait: an undoable write is settled there.
            token = self.driver.write(
                trio.current_time(),
                doc,
                apply,
                epoch=epoch,
                durability=durability,
                undo_roots=undo_roots,
            )
            result = await self.driver.wait(token)
            ended = "ok" if result.ok else (result.reason or "failed")
        finally:
            finished(ended)
        return outcome(result)

    def get(self, name: str, path: list[str | int] | None = None) -> Any:
        replica = self.driver.store.get(doc_name(check_name(name)))
        if replica is None:
            raise errors.NotFound(f"no state document {name!r}")
        return values.read(replica.doc, path)

    def names(self) -> list[dict[str, Any]]:
        replicas = sorted(
            (r for r in self.driver.store if r.name.startswith(DOC_PREFIX)),
            key=lambda r: r.name,
        )
        return [
            {"name": r.name[len(DOC_PREFIX) :], "epoch": r.epoch, "bytes": r.encoded_size()}
            for r in replicas
        ]

    def watch(self, name: str, watcher: Watcher) -> Callable[[], None]:
        name = check_name(name)
        key = next(self._watch_keys)
        self.watchers.setdefault(name, {})[key] = watcher

        def cancel() -> None:
            listeners = self.watchers.get(name)
            if listeners and listeners.pop(key, None) is not None and not listeners:
                del self.watchers[name]

        return cancel

    def _on_doc_event(self, event: DocEvent) -> None:
        if not event.name.startswith(DOC_PREFIX):
            return
        name = event.name[len(DOC_PREFIX) :]
        watchers = self.watchers.get(name)
        if not watchers:
            return
        if event.kind == "dropped":
            value: Any = None
        else:
            replica = self.driver.store.get(event.name)
            value = values.read(replica.doc) if replica is not None else None
        for watcher in list(watchers.values()):
            watcher(event.kind, value)
