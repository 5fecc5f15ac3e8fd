"""Messages on the ROUTING channel between daemons (CBOR arrays, type code first).

DELIVER  [1, msg_id, to, sender, kind, at_least_once, ttl_ms, body, trace?]
                                          trace (optional): [traceparent] or
                                          [traceparent, tracestate] (W3C Trace Context)
RESULT   [2, msg_id, ok, payload]          payload: the reply body, or an error map
SIGNAL   [3, topic, event]                 a CloudEvents-shaped map
ACTIVATE [4, msg_id, name, kind, ttl_ms]  start agent ``name`` of ``kind`` on the receiver
                                          (its owner); answered with a RESULT (the entry)
CONTROL  [5, msg_id, op, args]            an operator command for the receiving daemon
                                          (e.g. drain); answered with a RESULT
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from meshd.wire.validate import WireError, expect_bool, expect_list, expect_str, expect_uint
from meshd_client.protocol import cbor, tracecontext
from meshd_client.protocol.tracecontext import TraceContext

MAX_ID: Final = 128
MAX_NAME: Final = 256
MAX_TTL_MS: Final = 3_600_000


class Kind(enum.IntEnum):
    DELIVER = 1
    RESULT = 2
    SIGNAL = 3
    ACTIVATE = 4
    CONTROL = 5


class DeliveryKind(enum.IntEnum):
    SEND = 0
    REQUEST = 1


@dataclass(frozen=True, slots=True)
class Deliver:
    msg_id: str
    to: str
    sender: str
    kind: DeliveryKind
    at_least_once: bool
    ttl_ms: int
    body: Any
    # The call's W3C trace context (None: untraced). Sent only when present, so an untraced
    # DELIVER is what daemons before it sent and expect.
    trace: TraceContext | None = None
    # The sender put a trace field that is not valid trace context: ignored, counted.
    bad_trace: bool = False

    def to_wire(self) -> list[Any]:
        wire = [
            Kind.DELIVER,
            self.msg_id,
            self.to,
            self.sender,
            int(self.kind),
            self.at_least_once,
            self.ttl_ms,
            self.body,
        ]
        if self.trace is not None:
            wire.append(self.trace.to_wire())
        return wire


@dataclass(frozen=True, slots=True)
class Result:
    msg_id: str
    ok: bool
    payload: Any

    def to_wire(self) -> list[Any]:
        return [Kind.RESULT, self.msg_id, self.ok, self.payload]


@dataclass(frozen=True, slots=True)
class Signal:
    topic: str
    event: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return [Kind.SIGNAL, self.topic, self.event]


@dataclass(frozen=True, slots=True)
class Activate:
    msg_id: str
    name: str
    kind: str
    ttl_ms: int

    def to_wire(self) -> list[Any]:
        return [Kind.ACTIVATE, self.msg_id, self.name, self.kind, self.ttl_ms]


@dataclass(frozen=True, slots=True)
class Control:
    msg_id: str
    op: str
    args: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return [Kind.CONTROL, self.msg_id, self.op, self.args]


Message = Deliver | Result | Signal | Activate | Control


def encode(msg: Message) -> bytes:
    return cbor.dumps(msg.to_wire())


def _trace(v: list[Any]) -> tuple[TraceContext | None, bool]:
    """A DELIVER's optional trace field: (its context, whether it was malformed). A malformed
    one is ignored, not the message: that is delivered untraced (and counted)."""
    if len(v) < 9:
        return None, False
    try:
        return tracecontext.from_wire(v[8]), False
    except tracecontext.Malformed:
        return None, True


def _deliver(v: list[Any]) -> Message:
    expect_list(v, 8, 9, "deliver")
    delivery = expect_uint(v[4], "kind", 1)
    trace, bad_trace = _trace(v)
    return Deliver(
        expect_str(v[1], "msg_id", MAX_ID),
        expect_str(v[2], "to", MAX_NAME),
        expect_str(v[3], "sender", MAX_NAME, allow_empty=True),
        DeliveryKind(delivery),
        expect_bool(v[5], "at_least_once"),
        expect_uint(v[6], "ttl_ms", MAX_TTL_MS),
        v[7],
        trace,
        bad_trace,
    )


def _result(v: list[Any]) -> Message:
    expect_list(v, 4, 4, "result")
    return Result(expect_str(v[1], "msg_id", MAX_ID), expect_bool(v[2], "ok"), v[3])


def _signal(v: list[Any]) -> Message:
    expect_list(v, 3, 3, "signal")
    if not isinstance(v[2], dict):
        raise WireError("signal: event must be a map")
    return Signal(expect_str(v[1], "topic", 256), v[2])


def _activate(v: list[Any]) -> Message:
    expect_list(v, 5, 5, "activate")
    return Activate(
        expect_str(v[1], "msg_id", MAX_ID),
        expect_str(v[2], "name", MAX_NAME),
        expect_str(v[3], "kind", 128),
        expect_uint(v[4], "ttl_ms", MAX_TTL_MS),
    )


def _control(v: list[Any]) -> Message:
    expect_list(v, 4, 4, "control")
    if not isinstance(v[3], dict):
        raise WireError("control: args must be a map")
    return Control(expect_str(v[1], "msg_id", MAX_ID), expect_str(v[2], "op", 64), v[3])


_DECODERS: Final[dict[int, Callable[[list[Any]], Message]]] = {
    Kind.DELIVER: _deliver,
    Kind.RESULT: _result,
    Kind.SIGNAL: _signal,
    Kind.ACTIVATE: _activate,
    Kind.CONTROL: _control,
}


def decode(data: bytes) -> Message:
    """Decode one message; raises WireError on anything that does not match its schema."""
    try:
        value = cbor.loads(data)
    except cbor.CodecError as exc:
        raise WireError(str(exc)) from None
    if type(value) is not list or not value or type(value[0]) is not int:
        raise WireError("routing message: expected an array starting with a type code")
    decoder = _DECODERS.get(value[0])
    if decoder is None:
        raise WireError(f"routing message: unknown type {value[0]}")
    return decoder(value)
