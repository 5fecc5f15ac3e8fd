"""API ops for agents and messaging: serve an agent, send, request, publish, subscribe
(:class:`AgentOps`, given the routing driver, the registry and placement's gate)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from meshd.api import args as args_
from meshd.api.handles import BEGIN_IN_TASK, Deferred, Stream
from meshd.api.server import ApiServer
from meshd.api.session import Session
from meshd.logs import RateLimitedLog
from meshd.node.tracing import SERVER, Span, Tracer
from meshd.registry.model import MAX_CAPABILITIES, Entry
from meshd.registry.registry import Registry
from meshd.routing.driver import RoutingDriver
from meshd.routing.local import LocalAgent
from meshd.routing.messages import DeliveryKind
from meshd.routing.outcome import Err, Ok, Outcome
from meshd.state.service import agent_state
from meshd_client.protocol import errors, messages, tracecontext
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.tracecontext import TraceContext

MAX_TIMEOUT = 3600.0
MAX_MSG_ID = 128


def _msg_id(args: dict[str, Any]) -> str | None:
    return args_.opt_text(args, "id", max_len=MAX_MSG_ID) or None


def trace_of(rejected: dict[str, int], fields: dict[str, Any]) -> TraceContext | None:
    """The trace context a request (or CloudEvent) carries; a malformed one is ignored and
    counted in ``rejected`` (``meshd_rejected_total{layer="tracing"}``), never an error."""
    if "traceparent" not in fields:
        return None
    try:
        return tracecontext.from_fields(fields)
    except tracecontext.Malformed:
        rejected["malformed_traceparent"] = rejected.get("malformed_traceparent", 0) + 1
        # Taken out, so a call begun again in a task (or a published event's subscribers)
        # never sees, nor counts, it twice.
        fields.pop("traceparent", None)
        fields.pop("tracestate", None)
        return None


def api_span(
    tracer: Tracer | None, op: str, trace: TraceContext | None, **attributes: Any
) -> Span | None:
    """A ``meshd.api <op>`` span when tracing is on (None otherwise)."""
    if tracer is None:
        return None
    return tracer.start(f"meshd.api {op}", trace, SERVER, **attributes)


class AgentGate(Protocol):
    """What serving an agent asks of placement."""

    async def state_ready(self, name: str) -> None: ...

    def serving(self, entry: Entry) -> MeshError | None: ...


class AgentOps:
    """Serving agents and messaging them: ``agent.serve``, ``agent.reply``, ``send``,
    ``request``, ``publish``, ``subscribe`` and ``health``, over the routing driver, the
    registry and placement's gate. Owns only its rate-limited log of failed calls; a malformed
    trace context is counted in ``rejected``."""

    def __init__(
        self,
        routing: RoutingDriver,
        registry: Registry,
        gate: AgentGate,
        tracer: Tracer | None,
        rejected: dict[str, int],
    ) -> None:
        self.routing = routing
        self.registry = registry
        self.gate = gate
        self.tracer = tracer
        self.rejected = rejected
        self.calls_log = RateLimitedLog(logging.getLogger("meshd.routing"))

    def failed(self, call: dict[str, Any], kind: DeliveryKind, error: MeshError) -> None:
        """A call that failed, at debug level (rate-limited per error kind), with its
        message id and trace id: grep either to follow one message through the logs."""
        trace = call["trace"]
        self.calls_log.debug(
            ("call_failed", error.kind),
            "call failed",
            op="request" if kind is DeliveryKind.REQUEST else "send",
            to=call["to"],
            kind=error.kind.value,
            error=error.message,
            msg_id=call["msg_id"] or "-",
            trace_id=trace.trace_id if trace is not None else "-",
        )

    async def serve(self, session: Session, req: messages.Request, stream: Stream) -> None:
        """Register an agent and stream its deliveries until the client stops it."""
        args = req.args
        name = args_.text(args, "name")
        # An activation by placement pulls the agent's state while the runner starts it:
        # register (and so take messages, and read state) only once that state is here.
        await self.gate.state_ready(name)
        entry, _ = self.registry.register(
            trio.current_time(),
            name,
            kind=args_.opt_text(args, "kind", "") or "",
            capabilities=args_.text_list(args, "capabilities", max_items=MAX_CAPABILITIES),
            metadata=args_.mapping(args, "metadata"),
        )
        notices = trio.Event()
        conflict: list[dict[str, Any]] = []

        def on_notice(notice: dict[str, Any]) -> None:
            conflict.append(notice)
            notices.set()

        agent = LocalAgent(
            entry, session, stream, notices=on_notice, gate=lambda: self.gate.serving(entry)
        )
        self.routing.attach(agent)
        try:
            stream.emit(
                {"type": "registered", "entry": entry.to_dict(), "state": agent_state(entry.name)}
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.until_failed)
                await notices.wait()
                nursery.cancel_scope.cancel()
            # Lost a duplicate-name resolution after a partition healed: tell the client why,
            # then end the stream (its registration was already withdrawn by the node).
            stream.offer(conflict[0])
            raise errors.Conflict(
                f"{entry.name!r} lost a name conflict to the entry on "
                f"{conflict[0]['winner']['node']}",
                detail=conflict[0],
            )
        finally:
            self.routing.detach(entry.name, session)
            if self.registry.holds(entry.name) == entry:
                self.registry.unregister(trio.current_time(), entry.name)

    async def reply(self, _session: Session, req: messages.Request) -> Any:
        args = req.args
        agent = args_.text(args, "agent")
        msg_id = _msg_id(args)
        if msg_id is None:
            raise errors.Invalid("id is required")
        outcome: Outcome
        if args_.flag(args, "ok", True):
            outcome = Ok(args.get("body"))
        else:
            error = args.get("error")
            outcome = Err(
                errors.error_from_wire(error)
                if isinstance(error, dict)
                else errors.Internal("the agent failed")
            )
        if not self.routing.client_reply(agent, msg_id, outcome):
            raise errors.NotFound("no delivery with that id is waiting for an answer")
        return None

    def call_args(self, req: messages.Request, kind: DeliveryKind) -> dict[str, Any]:
        args = req.args
        return {
            "to": args_.text(args, "to"),
            "body": args.get("body"),
            "sender": args_.opt_text(args, "from", "") or "",
            "kind": kind,
            "at_least_once": args_.flag(args, "at_least_once", False),
            "timeout": args_.seconds(args, "timeout", 10.0, MAX_TIMEOUT),
            "msg_id": _msg_id(args),
            "trace": trace_of(self.rejected, args),
        }

    def start_span(self, call: dict[str, Any], kind: DeliveryKind) -> Span | None:
        """The call's API span (tracing on); its context replaces the client's in ``call``."""
        span = api_span(
            self.tracer,
            "request" if kind is DeliveryKind.REQUEST else "send",
            call["trace"],
            **{"agent.name": call["to"], "message.id": call["msg_id"]},
        )
        if span is not None:
            call["trace"] = span.context
        return span

    async def call(self, req: messages.Request, kind: DeliveryKind) -> Any:
        kwargs = self.call_args(req, kind)
        span = self.start_span(kwargs, kind) if self.tracer is not None else None
        outcome = "cancelled"
        try:
            result = await self.routing.call(**kwargs)
            outcome = "ok"
            return result
        except MeshError as exc:
            outcome = exc.kind.value
            self.failed(kwargs, kind, exc)
            raise
        finally:
            if span is not None:
                span.end(outcome)

    def begin(self, req: messages.Request, kind: DeliveryKind) -> Any:
        """Start the call in the session's read loop; routing answers it when the reply
        comes (no task waits for it). Calls that must wait to start run in a task."""
        deferred = Deferred()
        kwargs = self.call_args(req, kind)

        def done(outcome: Outcome) -> None:
            if isinstance(outcome, Ok):
                deferred.resolve(outcome.value)
            else:
                self.failed(kwargs, kind, outcome.error)
                deferred.fail(outcome.error)

        if self.tracer is None:
            if not self.routing.begin_call(**kwargs, done=done):
                return BEGIN_IN_TASK
            return deferred
        if self.routing.registry.lookup(kwargs["to"]) is None:
            return BEGIN_IN_TASK  # activation first: traced by call() in a task
        span = self.start_span(kwargs, kind)
        assert span is not None
        try:
            started = self.routing.begin_call(**kwargs, done=span.ending(done))
        except MeshError as exc:
            span.end(exc.kind.value)
            raise
        if not started:
            span.end("not_started")
            return BEGIN_IN_TASK
        return deferred

    async def send(self, _session: Session, req: messages.Request) -> Any:
        await self.call(req, DeliveryKind.SEND)
        return None

    def begin_send(self, _session: Session, req: messages.Request) -> Any:
        return self.begin(req, DeliveryKind.SEND)

    async def request(self, _session: Session, req: messages.Request) -> Any:
        return await self.call(req, DeliveryKind.REQUEST)

    def begin_request(self, _session: Session, req: messages.Request) -> Any:
        return self.begin(req, DeliveryKind.REQUEST)

    async def publish(self, _session: Session, req: messages.Request) -> Any:
        event = req.args.get("event")
        if not isinstance(event, dict):
            raise errors.Invalid("event must be a map (a CloudEvents envelope)")
        for key in ("id", "source", "type"):
            if not isinstance(event.get(key), str) or not event[key]:
                raise errors.Invalid(f"event.{key} is required (CloudEvents)")
        topic = args_.text(req.args, "topic")
        trace = trace_of(self.rejected, event)  # a malformed one is counted and taken out
        span = api_span(self.tracer, "publish", trace, topic=topic)
        if span is not None:
            event = {**event}
            span.context.to_args(event)  # subscribers' work joins this trace
        hosts = self.routing.publish(topic, event)
        if span is not None:
            span.set("meshd.hosts", hosts)
            span.end("ok")
        return {"hosts": hosts}

    async def subscribe(self, _session: Session, req: messages.Request, stream: Stream) -> None:
        cancel = self.routing.subscribe(args_.text(req.args, "pattern"), stream)
        try:
            await stream.until_failed()
        finally:
            cancel()

    async def health(self, _session: Session, req: messages.Request) -> Any:
        return self.routing.health(args_.text(req.args, "name"))

    def register(self, api: ApiServer) -> None:
        api.add_stream_op("agent.serve", self.serve, "register an agent and receive its messages")
        api.add_op(
            "agent.reply",
            self.reply,
            "answer (or acknowledge) a delivery to a served agent",
            inline=True,
        )
        api.add_op("send", self.send, "send a message to an agent by name", begin=self.begin_send)
        api.add_op(
            "request",
            self.request,
            "send a request and wait for the reply",
            begin=self.begin_request,
        )
        api.add_op("publish", self.publish, "publish a signal to a topic", inline=True)
        api.add_stream_op("subscribe", self.subscribe, "signals matching a topic pattern")
        api.add_op(
            "health",
            self.health,
            "an agent's health: healthy, degraded, unreachable, not_found",
            inline=True,
        )
