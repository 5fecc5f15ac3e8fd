"""The routing driver's own rules: what needs waiting (activation before a call, an awaited
outcome) and when a call may start from an API session's read loop. Routing rules are the
core's (test_routing_core.py); here the driver runs under trio's mock clock."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from meshd.registry.model import Entry
from meshd.routing.driver import RoutingDriver
from meshd.routing.local import LocalAgent
from meshd.routing.messages import DeliveryKind
from meshd.routing.outcome import Err, Ok, Outcome
from meshd_client.protocol import errors
from tests.unit.routing_helpers import Directory, Members, Sink, entry

REQ = DeliveryKind.REQUEST


@dataclass
class Activator:
    directory: Directory
    asked: list[str] = field(default_factory=list)
    delay: float = 0.5

    async def ensure_active(self, name: str, _kind: str | None, _deadline: float) -> Entry:
        self.asked.append(name)
        await trio.sleep(self.delay)
        if name.startswith("nobody"):
            raise errors.NotFound(f"nobody serves {name}")
        found = self.directory.live[name] = entry(name, "a")
        return found

    def may_run(self, _kind: str) -> bool:
        return True

    async def activate_local(self, name: str, _kind: str, _deadline: float) -> Entry:
        return entry(name, "a")


def driver(directory: Directory, activator: Activator | None = None) -> RoutingDriver:
    return RoutingDriver(
        node="a",
        registry=directory,  # type: ignore[arg-type]
        docs=None,  # type: ignore[arg-type]
        membership=Members(),  # type: ignore[arg-type]
        log=logging.getLogger("test.routing"),
        activator=activator,
    )


def serve(d: RoutingDriver, directory: Directory, name: str, sink: Sink) -> None:
    directory.live[name] = entry(name, "a")
    d.attach(LocalAgent(directory.live[name], object(), sink))


async def test_an_awaited_call_ends_with_the_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    directory, sink = Directory(), Sink()
    d = driver(directory)
    serve(d, directory, "echo", sink)

    async def answer() -> None:
        await trio.sleep(0.2)
        assert d.client_reply("echo", sink.events[0]["id"], Ok("pong"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        assert await d.call(to="echo", body=1, kind=REQ, timeout=5.0) == "pong"


async def test_an_awaited_call_times_out_even_before_the_driver_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    directory = Directory()
    d = driver(directory)
    serve(d, directory, "slow", Sink())
    start = trio.current_time()
    with pytest.raises(errors.Timeout):
        await d.call(to="slow", body=1, kind=REQ, timeout=2.0)
    assert trio.current_time() - start == pytest.approx(2.0)
    assert d.local["slow"].pending == {}


async def test_an_agent_active_nowhere_is_activated_first_within_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    directory = Directory()
    activator = Activator(directory, delay=0.5)
    d = driver(directory, activator)
    sink = Sink()
    d.attach(LocalAgent(entry("virtual", "a"), object(), sink))
    got: list[Outcome] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        # From a session's read loop the call cannot start (it must wait for placement).
        assert not d.begin_call(to="virtual", body=1, kind=REQ, done=got.append)
        start = trio.current_time()
        with pytest.raises(errors.Timeout):
            await d.call(to="virtual", body=1, kind=REQ, timeout=2.0)
        assert activator.asked == ["virtual"] and len(sink.events) == 1
        assert trio.current_time() - start == pytest.approx(2.0)  # activation included
        with pytest.raises(errors.NotFound):
            await d.call(to="nobody-x", body=1, kind=REQ, timeout=2.0)
        nursery.cancel_scope.cancel()
    assert got == []


async def test_a_call_starts_from_the_read_loop_only_once_the_driver_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    directory = Directory()
    d = driver(directory)
    serve(d, directory, "echo", Sink())
    got: list[Outcome] = []
    assert not d.begin_call(to="echo", body=1, kind=DeliveryKind.SEND, done=got.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        assert d.begin_call(to="echo", body=1, kind=DeliveryKind.SEND, done=got.append)
        assert got == [Ok(None)]
        # A request's deadline is kept by the driver's deadline task: no task waits.
        assert d.begin_call(to="echo", body=1, kind=REQ, timeout=1.0, done=got.append)
        await trio.sleep(1.5)
        assert len(got) == 2
        assert isinstance(got[1], Err) and isinstance(got[1].error, errors.Timeout)
        with pytest.raises(errors.NotFound):
            d.begin_call(to="missing", body=1, kind=REQ, done=got.append)
        with pytest.raises(errors.Invalid):
            d.begin_call(to="echo", body=b"x" * (600 * 1024), kind=REQ, done=got.append)
        nursery.cancel_scope.cancel()
