"""The history of a chaos run: every operation with its outcome, every fault, every observation.

One JSON object per line, appended and flushed as it happens, so a history survives a crash
of the harness and can be checked again later (``chaos check --history FILE``). The checker
(:mod:`chaos.checker`) is a pure function of these records; nothing it judges comes from
anywhere else, which is what lets the tests feed it fabricated histories.

Record types (field ``type``):

* ``meta``: scenario, seed, hosts, backend, daemon spec, expectations;
* ``fault``: a fault or process action (``action``, ``args``) at time ``t``;
* ``op``: a client operation: ``op`` (``write``, ``incr``, ``request``, ``publish``,
  ``register``), ``host`` (whose daemon it went through), ``id``, ``t0``/``t1``,
  ``outcome`` (``ok``, ``fail`` — definitely not done, ``unknown`` — may or may not have
  taken effect) and ``error`` (the error kind);
* ``handled``: an agent handler ran (``agent``, ``host``, ``id``, ``duplicate``);
* ``signal``: a subscriber on ``host`` received signal ``id``;
* ``member``: a membership event (``observer``, ``kind``, ``member``);
* ``heal``: the final heal (faults removed, paused hosts resumed, dead hosts restarted);
* ``observe``: what the harness saw after the heal (``what`` names it).

Times ``t``, ``t0``, ``t1`` are seconds since the run started, on the wall clock, so that
records appended by different processes (``chaos workload`` in one shell, ``chaos kill`` in
another, all sharing the run's ``base``) can be ordered against each other.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

Event = dict[str, Any]

# Operation outcomes.
OK = "ok"
FAIL = "fail"  # the system said no (or never got it): the operation did not happen
UNKNOWN = "unknown"  # a timeout or a lost connection: it may or may not have happened


class History:
    """An append-only JSONL log (thread-safe: fault actions run in worker threads)."""

    def __init__(self, path: str | Path | None = None, *, base: float | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.events: list[Event] = []
        self.base = time.time() if base is None else base
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)

    def now(self) -> float:
        return round(time.time() - self.base, 4)

    def add(self, type_: str, **fields: Any) -> Event:
        event: Event = {"type": type_, **fields}
        if "t" not in event and "t0" not in event:
            event["t"] = self.now()
        line = json.dumps(event, default=str, sort_keys=True)
        with self._lock:
            self.events.append(event)
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
        return event

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | Path) -> list[Event]:
    """Every record of a history file (a torn last line, from a crash, is skipped)."""
    out: list[Event] = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def of_type(events: Iterable[Event], type_: str) -> Iterator[Event]:
    return (e for e in events if e.get("type") == type_)


def observation(events: Iterable[Event], what: str) -> Event | None:
    """The last ``observe`` record named ``what``."""
    found = None
    for e in events:
        if e.get("type") == "observe" and e.get("what") == what:
            found = e
    return found
