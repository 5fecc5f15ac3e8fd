"""The outcome of a routed operation as a value: ``Ok(value)`` or ``Err(error)``.

Inside the router every operation ends in one of these; an error keeps its kind
(:class:`~meshd_client.protocol.errors.MeshError`). The wire form (a RESULT's ``ok`` flag and
payload, an error as its map) is made only where a RESULT is written or read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshd.routing.messages import Result
from meshd_client.protocol import errors
from meshd_client.protocol.errors import MeshError

_log = logging.getLogger("meshd.routing")


@dataclass(frozen=True, slots=True)
class Ok:
    value: Any = None


@dataclass(frozen=True, slots=True)
class Err:
    error: MeshError


Outcome = Ok | Err
# Told an operation's outcome, once.
Done = Callable[[Outcome], None]

SENT = Ok(None)


def from_result(msg: Result) -> Outcome:
    """The outcome a RESULT carries (a malformed error map becomes ``internal``)."""
    return Ok(msg.payload) if msg.ok else Err(errors.error_from_wire(msg.payload))


def to_result(msg_id: str, outcome: Outcome) -> Result:
    if isinstance(outcome, Ok):
        return Result(msg_id, True, outcome.value)
    return Result(msg_id, False, outcome.error.to_wire())


def unwrap(outcome: Outcome) -> Any:
    """The value, or the error raised."""
    if isinstance(outcome, Err):
        raise outcome.error
    return outcome.value


def complete(done: Done, outcome: Outcome) -> None:
    """Hand ``outcome`` to ``done``; a failing completion is logged, never raised into the
    rule that settled it."""
    try:
        done(outcome)
    except Exception:
        _log.exception("a call's completion failed")
