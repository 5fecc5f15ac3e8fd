"""The receiver's de-duplication window for at-least-once messages.

A retried message (same message id) must not run its handler twice. The window remembers,
per message id, whether it is still in progress (then the retry just waits for the same
outcome) or finished (then the retry gets the remembered outcome at once). Bounded by count
and age; outcomes larger than a few KiB are remembered as "done" without the body.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

_MAX_REMEMBERED_BODY = 8192


@dataclass(slots=True)
class Outcome:
    ok: bool
    payload: Any
    at: float


@dataclass(slots=True)
class InProgress:
    at: float


class DedupWindow:
    def __init__(self, max_entries: int = 100_000, max_age: float = 600.0) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self._entries: OrderedDict[str, Outcome | InProgress] = OrderedDict()
        self.duplicates = 0

    def begin(self, msg_id: str, now: float) -> Outcome | InProgress | None:
        """None: a new message, go ahead (it is now in progress). Otherwise a duplicate:
        what is known about the first delivery."""
        self._expire(now)
        known = self._entries.get(msg_id)
        if known is not None:
            self.duplicates += 1
            return known
        self._entries[msg_id] = InProgress(now)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return None

    def finish(self, msg_id: str, ok: bool, payload: Any, now: float, size: int) -> None:
        if msg_id in self._entries:
            remembered = payload if size <= _MAX_REMEMBERED_BODY else None
            self._entries[msg_id] = Outcome(ok, remembered, now)
            self._entries.move_to_end(msg_id)

    def forget(self, msg_id: str) -> None:
        """The attempt failed before the handler ran: a retry may run it."""
        self._entries.pop(msg_id, None)

    def _expire(self, now: float) -> None:
        while self._entries:
            first = next(iter(self._entries.values()))
            if now - first.at <= self.max_age:
                return
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
