"""Metrics: the registry, the text exposition format and the HTTP server over real TCP."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import trio

from meshd.metrics import CONTENT_TYPE, MetricsRegistry, Sample, render_text, serve_metrics

# -- rendering ---------------------------------------------------------------------------------


def test_render_empty() -> None:
    assert render_text([]) == ""


def test_render_families_sorted_with_one_help_and_type_each() -> None:
    samples = [
        Sample("meshd_members", 3, (("state", "alive"),), help="Members by state."),
        Sample("meshd_gossip_sent_total", 10, kind="counter", help="Gossip messages sent."),
        Sample("meshd_members", 1, (("state", "dead"),)),
        Sample("meshd_members", 2, (("state", "suspect"),)),
    ]
    assert render_text(samples) == (
        "# HELP meshd_gossip_sent_total Gossip messages sent.\n"
        "# TYPE meshd_gossip_sent_total counter\n"
        "meshd_gossip_sent_total 10\n"
        "# HELP meshd_members Members by state.\n"
        "# TYPE meshd_members gauge\n"
        'meshd_members{state="alive"} 3\n'
        'meshd_members{state="dead"} 1\n'
        'meshd_members{state="suspect"} 2\n'
    )


def test_render_is_independent_of_input_order() -> None:
    samples = [
        Sample("b", 1, (("x", "2"),)),
        Sample("a", 1),
        Sample("b", 1, (("x", "1"),)),
        Sample("b", 1, (("x", "1"), ("y", "0"))),
    ]
    assert render_text(samples) == render_text(reversed(samples))
    body = [ln for ln in render_text(samples).splitlines() if not ln.startswith("#")]
    assert body == ["a 1", 'b{x="1"} 1', 'b{x="1",y="0"} 1', 'b{x="2"} 1']


def test_label_pairs_are_rendered_sorted_by_name() -> None:
    out = render_text([Sample("m", 1, (("peer", "b"), ("dc", "x")))])
    assert 'm{dc="x",peer="b"} 1' in out.splitlines()


def test_label_values_escaped() -> None:
    out = render_text([Sample("m", 1, (("v", 'a\\b"c\nd'),))])
    assert out.splitlines()[-1] == r'm{v="a\\b\"c\nd"} 1'


def test_help_escaped() -> None:
    out = render_text([Sample("m", 1, help='back\\slash\nnew "quoted"')])
    assert out.splitlines()[0] == r'# HELP m back\\slash\nnew "quoted"'


def test_counter_name_kept_as_given() -> None:
    out = render_text([Sample("meshd_probes_total", 7, kind="counter")])
    assert "# TYPE meshd_probes_total counter" in out
    assert "meshd_probes_total 7" in out.splitlines()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3, "3"),
        (3.0, "3"),
        (-2, "-2"),
        (0.25, "0.25"),
        (1e300, "1e+300"),
        (float("nan"), "NaN"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
    ],
)
def test_value_formatting(value: float, text: str) -> None:
    assert render_text([Sample("m", value)]).splitlines()[-1] == f"m {text}"


@pytest.mark.parametrize(
    "bad",
    [
        Sample("1starts_with_digit", 1),
        Sample("has-dash", 1),
        Sample("", 1),
        Sample("has space", 1),
        Sample("ok", 1, (("bad-label", "x"),)),
        Sample("ok", 1, (("__reserved", "x"),)),
        Sample("ok", 1, (("a", "x"), ("a", "y"))),
        Sample("ok", True),
        Sample("ok", "12"),  # type: ignore[arg-type]
        Sample("ok", 10**400),
    ],
)
def test_invalid_samples_skipped(bad: Sample, caplog: pytest.LogCaptureFixture) -> None:
    good = Sample("good:metric_name", 1)
    with caplog.at_level(logging.WARNING, logger="meshd.metrics"):
        assert render_text([bad, good]) == render_text([good])
    assert caplog.records


def test_kind_conflict_and_duplicates_dropped() -> None:
    out = render_text(
        [
            Sample("m", 1, (("a", "1"),), kind="counter"),
            Sample("m", 2, (("a", "2"),), kind="gauge"),
            Sample("m", 3, (("a", "1"),), kind="counter"),
        ]
    )
    assert out == '# HELP m \n# TYPE m counter\nm{a="1"} 1\n'


# -- registry ----------------------------------------------------------------------------------


@dataclass
class GossipStats:
    """What a protocol core keeps: plain integers, no metrics dependency."""

    sent: int = 0
    dropped: int = 0

    def samples(self) -> Iterator[Sample]:
        yield Sample("meshd_gossip_sent_total", self.sent, kind="counter")
        yield Sample("meshd_gossip_dropped_total", self.dropped, kind="counter")


def test_collect_pulls_current_values() -> None:
    stats = GossipStats()
    registry = MetricsRegistry()
    registry.register(stats.samples)
    stats.sent += 5
    values = {s.name: s.value for s in registry.collect()}
    assert values["meshd_gossip_sent_total"] == 5
    stats.sent += 1
    values = {s.name: s.value for s in registry.collect()}
    assert values["meshd_gossip_sent_total"] == 6
    assert values["meshd_metrics_collector_errors_total"] == 0


def test_failing_collector_is_logged_skipped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = MetricsRegistry()

    def broken() -> list[Sample]:
        raise RuntimeError("boom")

    def broken_midway() -> Iterator[Sample]:
        yield Sample("partial", 1)
        raise RuntimeError("boom")

    registry.register(broken)
    registry.register(broken_midway)
    registry.register(lambda: [Sample("fine", 1)])
    with caplog.at_level(logging.ERROR, logger="meshd.metrics"):
        samples = registry.collect()
    names = [s.name for s in samples]
    assert names == ["fine", "meshd_metrics_collector_errors_total"]
    assert samples[-1].value == 2
    assert samples[-1].kind == "counter"
    assert "boom" in caplog.text
    assert registry.collect()[-1].value == 4  # cumulative, like any counter


def test_unregister() -> None:
    registry = MetricsRegistry()
    unregister = registry.register(lambda: [Sample("x", 1)])
    assert "x" in {s.name for s in registry.collect()}
    unregister()
    unregister()  # idempotent
    assert "x" not in {s.name for s in registry.collect()}


# -- HTTP server -------------------------------------------------------------------------------


@pytest.fixture
def registry() -> MetricsRegistry:
    reg = MetricsRegistry()
    reg.register(lambda: [Sample("meshd_up", 1, (("node", 'a"b'),), help="Daemon is up.")])
    return reg


async def start_server(
    nursery: trio.Nursery,
    registry: MetricsRegistry,
    *,
    head_timeout: float,
    max_connections: int = 64,
) -> int:
    """Starts a server on an ephemeral loopback port and returns that port."""
    port: int = await nursery.start(
        functools.partial(
            serve_metrics,
            registry,
            "127.0.0.1",
            0,
            head_timeout=head_timeout,
            max_connections=max_connections,
        )
    )
    return port


@pytest.fixture
async def port(registry: MetricsRegistry) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        yield await start_server(nursery, registry, head_timeout=5.0)
        nursery.cancel_scope.cancel()


async def exchange(port: int, request: bytes, *, half_close: bool = False) -> bytes:
    """Sends ``request`` (then EOF if ``half_close``) and returns everything the server sends
    until it closes."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if request:
                await stream.send_all(request)
            if half_close:
                await stream.send_eof()
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
            return bytes(data)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    assert int(headers["content-length"]) == len(body) or not body
    return int(status), headers, body


async def test_port_zero_reports_the_bound_port(port: int) -> None:
    assert 0 < port < 65536


async def test_get_metrics(port: int, registry: MetricsRegistry) -> None:
    status, headers, body = parse(await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    assert headers["connection"] == "close"
    assert body.decode() == render_text(registry.collect())
    assert 'meshd_up{node="a\\"b"} 1\n' in body.decode()


async def test_get_metrics_http10_with_query_and_bare_newlines(port: int) -> None:
    status, _, body = parse(await exchange(port, b"GET /metrics?x=1 HTTP/1.0\n\n"))
    assert status == 200
    assert b"meshd_up" in body


async def test_head_metrics_has_no_body(port: int) -> None:
    status, headers, body = parse(await exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


@pytest.mark.parametrize("path", [b"/", b"/metricsx", b"/other"])
async def test_other_paths_404(port: int, path: bytes) -> None:
    status, _, _ = parse(await exchange(port, b"GET " + path + b" HTTP/1.1\r\n\r\n"))
    assert status == 404


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS"])
async def test_other_methods_405(port: int, method: bytes) -> None:
    request = method + b" /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    status, headers, _ = parse(await exchange(port, request))
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS hello-ish
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"G(T /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", 400),
    ],
)
async def test_garbage_requests_get_4xx_and_server_survives(
    port: int, request_bytes: bytes, expected: int
) -> None:
    assert parse(await exchange(port, request_bytes))[0] == expected
    status, _, _ = parse(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert status == 200


async def test_eof_inside_the_head_is_400(port: int) -> None:
    raw = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n", half_close=True)
    assert parse(raw)[0] == 400
    status, _, _ = parse(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert status == 200


async def test_oversized_head_431(port: int) -> None:
    request = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    status, _, _ = parse(await exchange(port, request))
    assert status == 431


async def test_client_closing_without_a_request_gets_nothing(port: int) -> None:
    assert await exchange(port, b"", half_close=True) == b""


async def test_silent_client_does_not_block_others(registry: MetricsRegistry) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, registry, head_timeout=30.0)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        with trio.fail_after(2):  # far less than the 30 s the idle clients may take
            status, _, _ = parse(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        assert status == 200
        for stream in idle:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_silent_client_times_out_with_408(registry: MetricsRegistry) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, registry, head_timeout=0.2)
        start = trio.current_time()
        raw = await exchange(port, b"")
        assert 0.2 <= trio.current_time() - start < 3
        assert parse(raw)[0] == 408
        nursery.cancel_scope.cancel()


async def test_slow_partial_head_times_out(registry: MetricsRegistry) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, registry, head_timeout=0.2)
        raw = await exchange(port, b"GET /metrics HTTP/1.1\r\n")
        assert parse(raw)[0] == 408
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_limit_get_503(registry: MetricsRegistry) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, registry, head_timeout=30.0, max_connections=2)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.sleep(0.1)  # let the server accept both
        status, _, _ = parse(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        assert status == 503
        for stream in idle:
            await stream.aclose()
        with trio.fail_after(3):
            while True:
                status, _, _ = parse(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
                if status == 200:
                    break
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_failing_collector_still_serves_the_rest(
    port: int, registry: MetricsRegistry
) -> None:
    def broken() -> list[Sample]:
        raise RuntimeError("boom")

    registry.register(broken)
    status, _, body = parse(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert status == 200
    assert b"meshd_up" in body
    assert b"meshd_metrics_collector_errors_total 1\n" in body


async def test_many_concurrent_scrapes(port: int) -> None:
    results: list[int] = []

    async def scrape() -> None:
        results.append(parse(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0])

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(scrape)
    assert results == [200] * 20


def test_a_histogram_is_one_family_with_buckets_in_order() -> None:
    from meshd.metrics.exposition import render_text
    from meshd.metrics.registry import Sample

    name = "meshd_storage_fsync_seconds"
    samples = [
        Sample(f"{name}_count", 3, (), "histogram", "Fsync latency."),
        Sample(f"{name}_bucket", 3, (("le", "+Inf"),), "histogram"),
        Sample(f"{name}_bucket", 1, (("le", "0.001"),), "histogram"),
        Sample(f"{name}_bucket", 2, (("le", "0.01"),), "histogram"),
        Sample(f"{name}_sum", 0.02, (), "histogram"),
        Sample("meshd_storage_fsync_oops", 1, (), "histogram"),  # no suffix: dropped
    ]
    assert render_text(samples).splitlines() == [
        f"# HELP {name} Fsync latency.",
        f"# TYPE {name} histogram",
        f'{name}_bucket{{le="0.001"}} 1',
        f'{name}_bucket{{le="0.01"}} 2',
        f'{name}_bucket{{le="+Inf"}} 3',
        f"{name}_sum 0.02",
        f"{name}_count 3",
    ]
