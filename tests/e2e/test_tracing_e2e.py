"""Tracing on real daemons: one request across two hosts is one trace.

The daemons are real processes exporting over OTLP/HTTP to a receiver on loopback
(tests/e2e/otlp_receiver.py); the client spans (caller and handler, in this process) go to
the SDK's in-memory exporter. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshd.testing.localcluster import Daemon, LocalCluster
from meshd.testing.poll import eventually, until
from meshd_client import AgentContext, Mesh, Message, NotFound
from meshd_client.protocol import tracecontext
from tests.e2e.otlp_receiver import ReceivedSpan, Receiver, otlp_receiver

_EXPORTER = InMemorySpanExporter()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def client_spans() -> Iterator[InMemorySpanExporter]:
    """The client library's spans in this process (one global provider per process)."""
    if not getattr(trace.get_tracer_provider(), "_meshd_test", False):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._meshd_test = True  # type: ignore[attr-defined]
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


def hexid(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def client_span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


async def traced(cluster: LocalCluster, receiver: Receiver, count: int, *more: str) -> list[Daemon]:
    extra = [f"--set=tracing.endpoint={receiver.endpoint}", *more]
    first = cluster.add("n1", extra=extra)
    daemons = [first] + [
        cluster.add(f"n{i}", seeds=[first.addr], extra=extra) for i in range(2, count + 1)
    ]
    await cluster.wait_ready()
    await cluster.wait_converged()
    return daemons


async def resolves(mesh: Mesh, name: str) -> None:
    async def check() -> bool | None:
        try:
            await mesh.lookup(name)
        except NotFound:
            return None
        return True

    await eventually(check, f"{name!r} to resolve on {mesh.node}")


async def spans_named(receiver: Receiver, name: str, trace_id: str, count: int = 1) -> list[Any]:
    async def check() -> list[ReceivedSpan] | None:
        got = [s for s in receiver.named(name) if s.trace_id == trace_id]
        return got if len(got) >= count else None

    return await eventually(check, f"{count} exported {name!r} span(s) of trace {trace_id}")


async def test_a_request_across_two_hosts_is_one_trace(
    cluster: LocalCluster, receiver: Receiver, client_spans: InMemorySpanExporter
) -> None:
    n1, n2 = await traced(cluster, receiver, 2)
    in_handler: list[str] = []

    async def echo(_ctx: AgentContext, msg: Message) -> Any:
        # The handler runs in the call's trace: what it starts is part of it.
        in_handler.append(hexid(trace.get_current_span().get_span_context().trace_id, 32))
        return {"echo": msg.body, "traceparent": msg.traceparent}

    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n1.socket_path) as caller:
        await host.serve("echo", echo, kind="echo")
        await resolves(caller, "echo")
        reply = await caller.request("echo", "hi")
        assert reply["echo"] == "hi"

    request = client_span(client_spans, "meshd request")
    handle = client_span(client_spans, "meshd handle echo")
    trace_id = hexid(request.context.trace_id, 32)
    assert request.parent is None  # the caller had no trace: the client started one
    assert request.kind is trace.SpanKind.CLIENT
    assert in_handler == [trace_id]
    assert reply["traceparent"].split("-")[1] == trace_id

    (api,) = await spans_named(receiver, "meshd.api request", trace_id)
    (forward,) = await spans_named(receiver, "meshd.forward", trace_id)
    (deliver,) = await spans_named(receiver, "meshd.deliver", trace_id)
    # caller -> n1 API receive -> n1 forward -> n2 remote deliver -> the handler on n2's client
    assert api.parent_id == hexid(request.context.span_id, 16)
    assert forward.parent_id == api.span_id
    assert deliver.parent_id == forward.span_id
    assert handle.parent is not None and hexid(handle.parent.span_id, 16) == deliver.span_id
    assert hexid(handle.context.trace_id, 32) == trace_id
    assert (api.kind, forward.kind, deliver.kind) == ("server", "client", "server")
    assert (api.service, forward.service, deliver.service) == ("n1", "n1", "n2")
    for span in (api, forward, deliver):
        assert span.attributes["meshd.agent.name"] == "echo"
        assert span.attributes["meshd.outcome"] == "ok"
    assert api.attributes["meshd.host"] == "n1" and deliver.attributes["meshd.host"] == "n2"
    assert forward.attributes["meshd.peer"] == "n2" and deliver.attributes["meshd.peer"] == "n1"
    assert forward.attributes["meshd.agent.kind"] == "echo"
    assert handle.attributes is not None and handle.attributes["meshd.outcome"] == "ok"


async def test_the_callers_context_is_joined_and_a_send_is_traced_too(
    cluster: LocalCluster, receiver: Receiver, client_spans: InMemorySpanExporter
) -> None:
    n1, n2 = await traced(cluster, receiver, 2)
    got: list[Message] = []

    async def sink(_ctx: AgentContext, msg: Message) -> None:
        got.append(msg)

    tracer = trace.get_tracer("test")
    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n1.socket_path) as caller:
        await host.serve("sink", sink)
        await resolves(caller, "sink")
        with tracer.start_as_current_span("checkout") as outer:
            await caller.send("sink", 1)
        await until(lambda: len(got) == 1, "the send to reach the agent")
    trace_id = hexid(outer.get_span_context().trace_id, 32)
    send = client_span(client_spans, "meshd send")
    assert send.parent is not None and send.parent.span_id == outer.get_span_context().span_id
    (api,) = await spans_named(receiver, "meshd.api send", trace_id)
    (deliver,) = await spans_named(receiver, "meshd.deliver", trace_id)
    assert api.parent_id == hexid(send.context.span_id, 16)
    assert got[0].traceparent is not None and got[0].traceparent.split("-")[2] == deliver.span_id


async def test_a_malformed_traceparent_is_ignored_and_counted(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    n1, _n2 = await traced(cluster, receiver, 2)
    got: list[Message] = []

    async def sink(_ctx: AgentContext, msg: Message) -> str:
        got.append(msg)
        return "ok"

    async with Mesh.connect(n1.socket_path) as host:
        await host.serve("sink", sink)
        # Raw API calls, as a foreign client would make them.
        for bad in ("garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", 42):
            args = {"to": "sink", "body": None, "traceparent": bad, "timeout": 5}
            assert await n1.call("request", args) == "ok"
        # A name active nowhere goes to placement first (the call starts over in a task):
        # counted once all the same.
        with pytest.raises(NotFound):
            await n1.call("request", {"to": "nobody", "traceparent": "x", "timeout": 5})
        async with host.subscribe("t.*") as signals:
            event = {"id": "e1", "source": "test", "type": "t", "traceparent": "x"}
            await n1.call("publish", {"topic": "t.a", "event": event})
            with anyio.fail_after(10):
                signal = await signals.__anext__()
        info = await n1.call("info")
    # Each went on as a trace of its own, started by the daemon (none is the bad one).
    traces = {tracecontext.parse(m.traceparent).trace_id for m in got}
    assert len(traces) == 3 and "0" * 32 not in traces
    assert tracecontext.parse(signal.extensions["traceparent"]).trace_id not in traces
    assert info["tracing"] == {"enabled": True, "malformed_traceparent": 5}


async def test_with_tracing_off_the_context_still_reaches_the_handler(
    cluster: LocalCluster, client_spans: InMemorySpanExporter
) -> None:
    n1, n2 = cluster.start_many(2)
    await cluster.wait_ready()
    await cluster.wait_converged()

    async def echo(_ctx: AgentContext, msg: Message) -> Any:
        return msg.traceparent

    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n1.socket_path) as caller:
        await host.serve("echo", echo)
        await resolves(caller, "echo")
        carried = await caller.request("echo", None)
        info = await n1.call("info")
    request = client_span(client_spans, "meshd request")
    handle = client_span(client_spans, "meshd handle echo")
    # No daemon span in between: the handler is the caller's span's child.
    assert carried[:52] == (
        f"00-{hexid(request.context.trace_id, 32)}-{hexid(request.context.span_id, 16)}"
    )
    assert handle.parent is not None and handle.parent.span_id == request.context.span_id
    assert info["tracing"]["enabled"] is False


async def meshctl(daemon: Daemon, *args: str) -> tuple[int, str, str]:
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [sys.executable, "-m", "meshd.cli.meshctl", "--socket", daemon.socket_path, *args],
            check=False,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_meshctl_request_trace_prints_the_trace_id_the_logs_and_spans_carry(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    n1, n2 = await traced(cluster, receiver, 2, "--log-level=debug")
    slow = anyio.Event()

    async def echo(_ctx: AgentContext, msg: Message) -> Any:
        if msg.body == "slow":
            await slow.wait()  # never answers in time: the call fails with a timeout
        return msg.body

    async with Mesh.connect(n2.socket_path) as host, Mesh.connect(n1.socket_path) as caller:
        await host.serve("echo", echo)
        await resolves(caller, "echo")
        code, out, err = await meshctl(n1, "request", "echo", '"hi"', "--trace")
        assert code == 0 and json.loads(out) == "hi"
        trace_id, msg_id = err.split()[2], err.split()[5]
        assert err.startswith("trace id: ") and len(trace_id) == 32
        code, out, _ = await meshctl(
            n1, "--json", "--timeout", "1", "request", "echo", '"slow"', "--trace"
        )
        slow.set()
    assert code != 0
    (api,) = await spans_named(receiver, "meshd.api request", trace_id)
    assert api.attributes["meshd.message.id"] == msg_id
    await spans_named(receiver, "meshd.deliver", trace_id)

    # The failed call's log line on n1 names its message id and trace id.
    failed = await eventually(
        lambda: _line(n1, "call failed"), "n1 to log the failed call", timeout=10
    )
    assert "kind=timeout" in failed and "msg_id=" in failed and "trace_id=" in failed
    slow_trace = failed.split("trace_id=")[1].split()[0]
    assert len(slow_trace) == 32 and slow_trace != trace_id
    await spans_named(receiver, "meshd.forward", slow_trace)


async def _line(daemon: Daemon, text: str) -> str | None:
    for line in daemon.log_text().splitlines():
        if text in line:
            return line
    return None


async def test_activation_and_a_majority_write_from_the_handler_join_the_trace(
    cluster: LocalCluster, receiver: Receiver, client_spans: InMemorySpanExporter
) -> None:
    n1, n2 = await traced(cluster, receiver, 2)

    async def counter(ctx: AgentContext, _msg: Message) -> Any:
        await ctx.state.update([{"op": "incr", "path": ["n"], "by": 1}], durability="majority")
        return ctx.mesh.node

    async def kind_served() -> bool | None:
        kinds = await n1.call("kinds")
        return True if "n2" in kinds.get("counter", {}) else None

    async with Mesh.connect(n2.socket_path) as runner, Mesh.connect(n1.socket_path) as caller:
        await runner.serve_kind("counter", lambda _name: counter, idle_timeout=None)
        await eventually(kind_served, "n1 to see n2 serving the kind")
        # The first message to a name active nowhere activates it (on n2, the only runner).
        assert await caller.request("counter/a", None) == "n2"

    request = client_span(client_spans, "meshd request")
    trace_id = hexid(request.context.trace_id, 32)
    (api,) = await spans_named(receiver, "meshd.api request", trace_id)
    (activate,) = await spans_named(receiver, "meshd.activate", trace_id)
    (forward,) = await spans_named(receiver, "meshd.forward", trace_id)
    (deliver,) = await spans_named(receiver, "meshd.deliver", trace_id)
    assert activate.parent_id == api.span_id and forward.parent_id == api.span_id
    assert activate.attributes["meshd.agent.name"] == "counter/a"
    assert activate.attributes["meshd.agent.kind"] == "counter"
    assert activate.attributes["meshd.agent.host"] == "n2"
    assert activate.attributes["meshd.outcome"] == "ok"
    assert deliver.parent_id == forward.span_id

    # The handler's state write: client span -> n2's API span -> its majority wait.
    handle = client_span(client_spans, "meshd handle counter/a")
    write = client_span(client_spans, "meshd state.update")
    assert handle.parent is not None and hexid(handle.parent.span_id, 16) == deliver.span_id
    assert write.parent is not None and write.parent.span_id == handle.context.span_id
    (api_write,) = await spans_named(receiver, "meshd.api state.update", trace_id)
    (wait,) = await spans_named(receiver, "meshd.majority_wait", trace_id)
    assert api_write.parent_id == hexid(write.context.span_id, 16)
    assert wait.parent_id == api_write.span_id
    assert api_write.service == "n2" and api_write.attributes["meshd.durability"] == "majority"
    assert wait.attributes["meshd.outcome"] == "ok"


async def test_a_failover_is_a_span_on_the_host_that_takes_over(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    n1, n2 = await traced(cluster, receiver, 2)

    async def worker(ctx: AgentContext, _msg: Message) -> Any:
        return ctx.mesh.node

    async def both_serve() -> bool | None:
        kinds = await n1.call("kinds")
        return True if set(kinds.get("w", {})) == {"n1", "n2"} else None

    async with Mesh.connect(n1.socket_path) as m1, Mesh.connect(n2.socket_path) as m2:
        for mesh in (m1, m2):
            await mesh.serve_kind(
                "w", lambda _name: worker, strategy="allow_duplicates", idle_timeout=None
            )
        await eventually(both_serve, "both hosts to serve kind w")
        for i in range(64):  # a name n2 owns
            name = f"w/{i}"
            placed = await n1.call("placement", {"kind": "w", "name": name})
            if placed["owner"] == "n2":
                break
        assert await m1.request(name, None) == "n2"

        async def registered_on_n2() -> bool | None:
            try:
                entry = await n1.call("lookup", {"name": name})
            except NotFound:
                return None  # n2's registry document has not reached n1 yet
            return True if entry["node"] == "n2" else None

        # n1 fails over what its registry holds of n2: wait for the entry to replicate.
        await eventually(registered_on_n2, f"n1's registry to place {name} on n2")
        n2.kill()

        async def failed_over() -> ReceivedSpan | None:
            spans = [s for s in receiver.named("meshd.failover") if s.service == "n1"]
            return spans[0] if spans else None

        span = await eventually(failed_over, "n1 to export a meshd.failover span", 60)
        assert await m1.request(name, None) == "n1"
    assert span.parent_id == ""  # no caller's context reaches a failover: a trace of its own
    assert span.attributes["meshd.agent.name"] == name
    assert span.attributes["meshd.agent.kind"] == "w"
    assert span.attributes["meshd.from_host"] == "n2"
    assert span.attributes["meshd.outcome"] == "ok"
