"""The receiver's de-duplication window for at-least-once messages.

A retried message (same message id) must not run its handler twice. The window remembers,
per message id, whether it is still in progress (then the retry just waits for the same
outcome) or finished (then the retry gets the remembered outcome at once). Bounded by count
and age, and remembered reply bodies by their total size: when that budget is full the
oldest bodies are let go first. A retry whose first delivery finished but whose reply is no
longer held is told so (``conflict``, ``detail.handled``) rather than given a wrong reply:
the handler ran once and does not run again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_BODY_BYTES = 32 << 20  # reply bodies remembered in all (per daemon)


@dataclass(slots=True)
class Outcome:
    ok: bool
    payload: Any
    at: float
    size: int = 0  # the remembered body's size (0 once it is let go)
    kept: bool = True  # False: the body was too large for the budget, or let go since


@dataclass(slots=True)
class InProgress:
    at: float


class DedupWindow:
    def __init__(
        self,
        max_entries: int = 100_000,
        max_age: float = 600.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_body_bytes = max_body_bytes
        self._entries: OrderedDict[Hashable, Outcome | InProgress] = OrderedDict()
        self._bodies: OrderedDict[Hashable, None] = (
            OrderedDict()
        )  # outcomes holding a body, oldest first
        self.body_bytes = 0
        self.duplicates = 0
        self.bodies_dropped = 0

    def begin(self, msg_id: Hashable, now: float) -> Outcome | InProgress | None:
        """None: a new message, go ahead (it is now in progress). Otherwise a duplicate:
        what is known about the first delivery."""
        self._expire(now)
        known = self._entries.get(msg_id)
        if known is not None:
            self.duplicates += 1
            return known
        self._entries[msg_id] = InProgress(now)
        while len(self._entries) > self.max_entries:
            self._pop_first()
        return None

    def finish(self, msg_id: Hashable, ok: bool, payload: Any, now: float, size: int) -> None:
        if msg_id not in self._entries:
            return
        self._drop_body(msg_id)
        if payload is None or size <= 0:
            self._entries[msg_id] = Outcome(ok, payload, now)
        elif size > self.max_body_bytes:
            self.bodies_dropped += 1
            self._entries[msg_id] = Outcome(ok, None, now, kept=False)
        else:
            self._entries[msg_id] = Outcome(ok, payload, now, size)
            self._bodies[msg_id] = None
            self.body_bytes += size
            while self.body_bytes > self.max_body_bytes:
                oldest = next(iter(self._bodies))
                self._drop_body(oldest, let_go=True)
        self._entries.move_to_end(msg_id)

    def forget(self, msg_id: Hashable) -> None:
        """The attempt failed before the handler ran: a retry may run it."""
        self._drop_body(msg_id)
        self._entries.pop(msg_id, None)

    def _drop_body(self, msg_id: Hashable, *, let_go: bool = False) -> None:
        """Stop holding the body of ``msg_id``'s outcome, if it holds one; ``let_go``: to
        make room (a retry is then told that the reply is gone)."""
        if msg_id not in self._bodies:
            return
        del self._bodies[msg_id]
        known = self._entries.get(msg_id)
        if isinstance(known, Outcome):
            self.body_bytes -= known.size
            known.size = 0
            if let_go:
                known.payload = None
                known.kept = False
                self.bodies_dropped += 1

    def _pop_first(self) -> None:
        msg_id = next(iter(self._entries))
        self._drop_body(msg_id)
        del self._entries[msg_id]

    def _expire(self, now: float) -> None:
        while self._entries:
            first = next(iter(self._entries.values()))
            if now - first.at <= self.max_age:
                return
            self._pop_first()

    def __len__(self) -> int:
        return len(self._entries)
