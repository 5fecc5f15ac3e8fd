"""W3C Trace Context (``traceparent``, ``tracestate``) as plain data: parsing and the bounds.

Pure and dependency-free: the daemon, the routing core and the client all use it without
OpenTelemetry. A ``traceparent`` is ``VERSION-TRACEID-PARENTID-FLAGS`` in lowercase hex
(https://www.w3.org/TR/trace-context/). The rules, each with a unit test
(``tests/unit/test_tracecontext.py``):

* Version ``00``: exactly 55 characters. A higher version (not ``ff``) may carry more fields
  after a ``-``: its first 55 characters are read as version 00 (what the spec asks of a
  parser that knows 00 only); at most :data:`MAX_TRACEPARENT` characters.
* Trace id (32 hex) and parent id (16 hex) may not be all zeros; no uppercase.
* ``tracestate`` is optional, printable ASCII, at most :data:`MAX_TRACESTATE` characters; a
  bad one is dropped alone (the ``traceparent`` stays), as the spec asks.
* Anything else is malformed: the caller ignores the context (the message goes on
  untraced) and counts it. Parsing never raises.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final

MAX_TRACEPARENT: Final = 256
MAX_TRACESTATE: Final = 512
_HEX: Final = frozenset("0123456789abcdef")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A validated ``traceparent`` (normalized to version 00) and its ``tracestate``."""

    traceparent: str
    tracestate: str = ""

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]

    @property
    def span_id(self) -> str:
        return self.traceparent[36:52]

    @property
    def sampled(self) -> bool:
        return int(self.traceparent[53:55], 16) & 1 == 1

    def to_wire(self) -> list[str]:
        """The routing DELIVER's optional trace field."""
        return [self.traceparent, self.tracestate] if self.tracestate else [self.traceparent]

    def to_args(self, args: dict[str, Any]) -> None:
        """Put the context into an API request's (or event's) fields."""
        args["traceparent"] = self.traceparent
        if self.tracestate:
            args["tracestate"] = self.tracestate


class Malformed(ValueError):
    """A trace context that is not valid W3C Trace Context (ignored and counted)."""


def _is_hex(text: str) -> bool:
    return all(c in _HEX for c in text)


def parse_traceparent(value: object) -> str:
    """The version-00 form of a ``traceparent``; raises :class:`Malformed`."""
    if not isinstance(value, str):
        raise Malformed("traceparent must be a string")
    if not 55 <= len(value) <= MAX_TRACEPARENT:
        raise Malformed(f"traceparent must have 55..{MAX_TRACEPARENT} characters")
    version = value[:2]
    if not _is_hex(version) or version == "ff":
        raise Malformed("traceparent: bad version")
    if version == "00" and len(value) != 55:
        raise Malformed("traceparent version 00 has exactly 55 characters")
    if len(value) > 55 and value[55] != "-":
        raise Malformed("traceparent: fields of a later version follow a '-'")
    head = value[:55]
    if head[2] != "-" or head[35] != "-" or head[52] != "-":
        raise Malformed("traceparent: expected VERSION-TRACEID-PARENTID-FLAGS")
    trace_id, span_id, flags = head[3:35], head[36:52], head[53:55]
    if not (_is_hex(trace_id) and _is_hex(span_id) and _is_hex(flags)):
        raise Malformed("traceparent: fields must be lowercase hex")
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        raise Malformed("traceparent: all-zero trace id or parent id")
    return head if version == "00" else "00" + head[2:]


def valid_tracestate(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_TRACESTATE
        and all(" " <= c <= "~" for c in value)
    )


def parse(traceparent: object, tracestate: object = None) -> TraceContext:
    """A context from its two fields; raises :class:`Malformed` for a bad ``traceparent``
    (a bad ``tracestate`` is dropped)."""
    parent = parse_traceparent(traceparent)
    state = tracestate if tracestate is not None and valid_tracestate(tracestate) else ""
    assert isinstance(state, str)
    return TraceContext(parent, state)


def from_fields(fields: dict[str, Any]) -> TraceContext | None:
    """The context an API request (or CloudEvent) carries in ``traceparent`` and
    ``tracestate``: None when absent; raises :class:`Malformed` when present but bad."""
    parent = fields.get("traceparent")
    if parent is None:
        return None
    return parse(parent, fields.get("tracestate"))


def from_wire(value: object) -> TraceContext:
    """The routing DELIVER's trace field ``[traceparent]`` or ``[traceparent, tracestate]``;
    raises :class:`Malformed`."""
    if not isinstance(value, list) or not 1 <= len(value) <= 2:
        raise Malformed("trace: expected [traceparent] or [traceparent, tracestate]")
    return parse(value[0], value[1] if len(value) == 2 else None)


def new_root(sampled: bool = True) -> TraceContext:
    """A fresh context (random ids) for a call made outside any trace."""
    trace_id = os.urandom(16).hex()
    span_id = os.urandom(8).hex()
    return TraceContext(f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}")
