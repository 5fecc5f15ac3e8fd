"""Trace context propagation for the client (only when ``opentelemetry-api`` is importable).

Outgoing (``send``, ``request``, ``publish``, state writes): a CLIENT span ``meshd <op>``
is started in the caller's current OpenTelemetry context (a new trace if there is none) and
its context goes into the request as ``traceparent`` (and ``tracestate``). With the API but
no SDK the span is not recorded; the caller's own context is used then, or a fresh random one
if there is none, so the daemons can still correlate their logs and spans. Incoming (a
delivery to an agent): the handler runs in a SERVER span ``meshd handle <agent>`` whose
parent is the context the message carried, so what the handler calls joins the same trace.

Without ``opentelemetry-api`` both are no-ops (nothing is imported, nothing is added), unless
the caller passes a ``traceparent`` explicitly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from meshd_client._version import __version__
from meshd_client.protocol import tracecontext

if TYPE_CHECKING:
    from meshd_client.types import Message

# Whether the optional extra is installed; it is imported on the first traced call only, so
# importing the client (as the daemon does for the wire protocol) loads none of it.
AVAILABLE = importlib.util.find_spec("opentelemetry") is not None
_api: Any = None  # (trace module, tracer, propagator) once loaded


def _load() -> Any:
    global _api
    if _api is None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:  # a namespace package without the API: propagate nothing
            _api = ()
        else:
            tracer = trace.get_tracer("meshd_client", __version__)
            _api = (trace, tracer, TraceContextTextMapPropagator())
    return _api or None


def _put(propagator: Any, args: dict[str, Any], explicit: str | None) -> None:
    if explicit is not None:
        tracecontext.parse(explicit).to_args(args)
        return
    carrier: dict[str, str] = {}
    propagator.inject(carrier)
    if "traceparent" in carrier:
        args.update(carrier)
    else:
        tracecontext.new_root().to_args(args)


@contextmanager
def outgoing(
    op: str, args: dict[str, Any], *, to: str = "", traceparent: str | None = None
) -> Iterator[None]:
    """Run a call in a CLIENT span and put its trace context into ``args``.

    ``traceparent``: a context chosen by the caller (``meshctl request --trace``), used as it
    is (a malformed one raises ``ValueError`` before anything is sent)."""
    api = _load() if AVAILABLE else None
    if api is None:
        if traceparent is not None:
            tracecontext.parse(traceparent).to_args(args)
        yield
        return
    trace, tracer, propagator = api
    attributes = {"meshd.op": op}
    if to:
        attributes["meshd.agent.name"] = to
    with tracer.start_as_current_span(
        f"meshd {op}", kind=trace.SpanKind.CLIENT, attributes=attributes
    ) as span:
        _put(propagator, args, traceparent)
        try:
            yield
        except Exception as exc:
            kind = getattr(getattr(exc, "kind", None), "value", type(exc).__name__)
            span.set_attribute("meshd.outcome", str(kind))
            raise
        span.set_attribute("meshd.outcome", "ok")


@contextmanager
def handling(agent: str, msg: Message) -> Iterator[Any]:
    """Run a handler in a SERVER span, child of the context ``msg`` carried; yields the span
    (None without ``opentelemetry-api`` or without a context)."""
    api = _load() if AVAILABLE and msg.traceparent is not None else None
    if api is None or msg.traceparent is None:
        yield None
        return
    trace, tracer, propagator = api
    carrier = {"traceparent": msg.traceparent}
    if msg.tracestate:
        carrier["tracestate"] = msg.tracestate
    parent = propagator.extract(carrier)
    with tracer.start_as_current_span(
        f"meshd handle {agent}",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={
            "meshd.agent.name": agent,
            "meshd.message.id": msg.id,
            "meshd.delivery": "request" if msg.is_request else "message",
        },
    ) as span:
        yield span
