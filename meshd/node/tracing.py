"""The daemon's spans: OpenTelemetry, exported over OTLP/HTTP when ``[tracing] endpoint`` is set.

Only :func:`start` imports OpenTelemetry (the optional ``meshd[tracing]`` extra), and only
when an endpoint is configured. Everything else holds a ``Tracer | None``: with tracing off
the cost on a message's path is that None check (a call's trace context, if the client sent
one, still travels to the agent and to other daemons as plain data).

Spans (names and where they start; every one has ``meshd.host`` and ``meshd.outcome``, and
``meshd.agent.name`` / ``meshd.agent.kind`` where an agent is concerned):

* ``meshd.api <op>`` (server): an API request that carries or starts a trace (``send``,
  ``request``, ``publish``, ``state.update``), from receipt to its answer.
* ``meshd.activate`` (internal): waiting for placement to start an agent active nowhere.
* ``meshd.forward`` (client): a call sent to the agent's host, until its RESULT (or until
  handed to the link, for a send). Its context travels in the DELIVER.
* ``meshd.deliver`` (server): a DELIVER from another host, until the agent's answer; the
  agent's handler span (client library) is its child.
* ``meshd.majority_wait`` (internal): a ``majority`` state write waiting for its copies.
* ``meshd.failover`` (internal): placement restarting an agent here after its host died (a
  trace of its own).

The routing core never sees a span: it carries :class:`TraceContext` values and reports
remote deliveries through its :class:`~meshd.routing.ports.DeliveryObserver` port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from meshd.config.model import ConfigError
from meshd.routing.outcome import Ok, Outcome
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.tracecontext import TraceContext

if TYPE_CHECKING:
    from meshd.config.model import TracingConfig
    from meshd.routing.messages import Deliver

log = logging.getLogger("meshd.tracing")

SERVER: Final = "server"
CLIENT: Final = "client"
INTERNAL: Final = "internal"


def outcome_name(outcome: Outcome) -> str:
    return "ok" if isinstance(outcome, Ok) else outcome.error.kind.value


class Span:
    """One span in progress: its context (for children and the wire) and its end."""

    __slots__ = ("_span", "context")

    def __init__(self, span: Any, context: TraceContext) -> None:
        self._span = span
        self.context = context

    def set(self, key: str, value: str | int | bool) -> None:
        self._span.set_attribute(key, value)

    def end(self, outcome: str) -> None:
        span = self._span
        span.set_attribute("meshd.outcome", outcome)
        if outcome != "ok":
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    def ending(self, done: Callable[[Outcome], None]) -> Callable[[Outcome], None]:
        """``done``, ending this span with the outcome first."""

        def finished(outcome: Outcome) -> None:
            self.end(outcome_name(outcome))
            done(outcome)

        return finished


class Tracer:
    """Starts the daemon's spans (see the module doc). Built by :func:`start`."""

    def __init__(self, node: str, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.span import TraceState

        self.node = node
        self.provider = provider
        self._tracer = provider.get_tracer("meshd")
        self._kinds = {
            SERVER: trace.SpanKind.SERVER,
            CLIENT: trace.SpanKind.CLIENT,
            INTERNAL: trace.SpanKind.INTERNAL,
        }
        self._api = trace, TraceState

    def _parent(self, parent: TraceContext) -> Any:
        """The OpenTelemetry context of a (validated) remote parent; built directly, without
        parsing the header again as the propagator would."""
        trace, trace_state = self._api
        tp = parent.traceparent
        context = trace.SpanContext(
            trace_id=int(tp[3:35], 16),
            span_id=int(tp[36:52], 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(tp[53:55], 16)),
            trace_state=trace_state.from_header([parent.tracestate]) if parent.tracestate else None,
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(context))

    def start(
        self, name: str, parent: TraceContext | None, kind: str = INTERNAL, **attributes: Any
    ) -> Span:
        """A span, child of ``parent`` (a new trace if None)."""
        attrs = {"meshd.host": self.node}
        for key, value in attributes.items():
            if value is not None:
                attrs["meshd." + key] = value
        span = self._tracer.start_span(
            name,
            context=self._parent(parent) if parent is not None else None,
            kind=self._kinds[kind],
            attributes=attrs,
        )
        sc = span.get_span_context()
        header = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
        state = sc.trace_state.to_header() if sc.trace_state else ""
        return Span(span, TraceContext(header, state))

    # ------------------------------------------------------------------ routing's port

    def remote_delivery(self, peer: str, msg: Deliver) -> tuple[Deliver, Callable[[Outcome], None]]:
        span = self.start(
            "meshd.deliver",
            msg.trace,
            SERVER,
            **{"agent.name": msg.to, "peer": peer, "message.id": msg.msg_id},
        )

        def finished(outcome: Outcome) -> None:
            span.end(outcome_name(outcome))

        return replace(msg, trace=span.context), finished

    @contextmanager
    def failover_span(self, name: str, kind: str, host: str) -> Iterator[None]:
        """``meshd.failover``: placement restarting ``name`` here after ``host`` died (a
        trace of its own: no caller's context reaches a failover)."""
        span = self.start(
            "meshd.failover", None, **{"agent.name": name, "agent.kind": kind, "from_host": host}
        )
        outcome = "cancelled"
        try:
            yield
            outcome = "ok"
        except MeshError as exc:
            outcome = exc.kind.value
            raise
        finally:
            span.end(outcome)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout) and stop."""
        try:
            self.provider.shutdown()
        except Exception:
            log.exception("tracing shutdown failed")


def start(config: TracingConfig, node: str, exporter: Any = None) -> Tracer | None:
    """The daemon's tracer, or None when ``config.endpoint`` is empty (and no ``exporter``
    is given: tests pass an in-memory one). Raises ``ConfigError`` naming the extra if the
    OpenTelemetry packages are missing."""
    if not config.endpoint and exporter is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise ConfigError(
            "tracing.endpoint",
            f"is set but OpenTelemetry is not installed (no {exc.name}): install "
            "meshd[tracing], or leave the endpoint empty",
        ) from None
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.endpoint, timeout=config.export_timeout)
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name, "host.name": node}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=config.max_queue,
            max_export_batch_size=min(512, config.max_queue),
            schedule_delay_millis=200,
            export_timeout_millis=int(config.export_timeout * 1000),
        )
    )
    return Tracer(node, provider)
