"""Failure detection and false positives of meshd, with Serf as the reference. Real processes.

    python -m bench.membership --nodes N --runs R [--json] [--profile lan]
    python -m bench.membership --nodes N --loss P --duration S [--json]

**Detection mode** (the default). Each run, for each of two faults, starts a *fresh* cluster
of N daemons on loopback (meshd through :class:`~meshd.testing.localcluster.LocalCluster`
with the ``lan`` profile, untuned; then N ``serf agent`` processes with Serf's default LAN
config), waits until every member sees every other alive and the local-health scores have
settled, and picks a random non-seed victim:

* ``kill -9``: the process is gone, the kernel answers TCP connects to its port with a reset.
  meshd treats a refused TCP fallback probe as proof of a crashed process (``refused_is_dead``)
  and skips the suspicion timeout; Serf (memberlist) does not.
* ``hang`` (SIGSTOP): the process stops answering but its sockets stay open, so there is no
  reset, and both systems must go through suspicion. This is the number to compare protocols.

From the signal on, every survivor's membership table is polled every ``--poll`` seconds over
one open connection per survivor (meshd: the local API socket; Serf: its msgpack RPC, spoken
here natively so that polling does not fork a ``serf members`` process per survivor 20 times
a second and steal the CPU the agents need). We record when the first and when every survivor
reports the victim dead (meshd ``dead``, Serf ``failed``); the resolution is the poll
interval. Any other member reported dead by anyone during a run is a false positive. A fresh
cluster per run keeps runs independent: no leftover suspicion, awareness or dead-member gossip
from the previous victim, and no restarted member to re-admit.

**Loss mode** (``--loss P --duration S``). N meshd daemons, each in its own network namespace
(:class:`chaos.netns.HostNet`), converge; then every host drops a fraction P of arriving
packets (nftables ``numgen random``) for S seconds. Nobody is killed, so every death verdict
is a false positive. Counted exactly from each daemon's event stream (meshd ``members.watch``,
Serf's ``stream member-failed``), cross-checked with the ``members`` poll every 0.5 s and with
meshd's ``info`` counters (deaths, suspicions, refutations) read at the end. Serf runs the same
way in the same namespaces afterwards, if installed. Needs root and nftables, else skipped
with the reason.

Every process is started by this module and ended by its pid, on success, error or Ctrl-C;
namespaces are removed by HostNet.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import math
import os
import platform
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from rich.console import Console
from rich.table import Table

from bench import harness
from bench.simulate import SoakCase, sim_detection, sim_soak
from chaos.netns import HostNet, unavailable_reason
from meshd import __version__ as meshd_version
from meshd.testing.localcluster import LocalCluster, free_port
from meshd_client.connection import Connection
from meshd_client.protocol.errors import MeshError

FAULTS: dict[str, int | None] = {"kill9": signal.SIGKILL, "hang": signal.SIGSTOP, "isolate": None}
SERF_HINT = "serf is not installed: `apt-get install serf` (or `make system-deps`)"
Statuses = dict[str, str]
PollFn = Callable[[], Awaitable[Statuses]]
DeathSink = Callable[[str, str, float], None]  # (observer, member, monotonic time)
err = Console(stderr=True, soft_wrap=True)


# ---------------------------------------------------------------------------- msgpack


class Incomplete(Exception):
    """The buffer ends in the middle of a msgpack value."""


def mp_pack(obj: Any) -> bytes:
    """Encode the msgpack subset Serf's RPC needs (maps, strings, ints, bools, bytes, lists)."""
    if obj is None:
        return b"\xc0"
    if obj is True:
        return b"\xc3"
    if obj is False:
        return b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj < 0x80:
            return bytes([obj])
        if -32 <= obj < 0:
            return struct.pack("b", obj)
        if 0 <= obj < 2**64:
            return b"\xcf" + struct.pack(">Q", obj)
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, str):
        raw = obj.encode()
        if len(raw) < 32:
            return bytes([0xA0 | len(raw)]) + raw
        return b"\xdb" + struct.pack(">I", len(raw)) + raw
    if isinstance(obj, bytes):
        return b"\xc6" + struct.pack(">I", len(obj)) + obj
    if isinstance(obj, list | tuple):
        head = bytes([0x90 | len(obj)]) if len(obj) < 16 else b"\xdd" + struct.pack(">I", len(obj))
        return head + b"".join(mp_pack(x) for x in obj)
    if isinstance(obj, dict):
        head = bytes([0x80 | len(obj)]) if len(obj) < 16 else b"\xdf" + struct.pack(">I", len(obj))
        return head + b"".join(mp_pack(k) + mp_pack(v) for k, v in obj.items())
    raise TypeError(f"cannot msgpack {type(obj).__name__}")


_FIXED = {
    0xC4: ("bin", 1),
    0xC5: ("bin", 2),
    0xC6: ("bin", 4),
    0xC7: ("ext", 1),
    0xC8: ("ext", 2),
    0xC9: ("ext", 4),
    0xD9: ("str", 1),
    0xDA: ("str", 2),
    0xDB: ("str", 4),
    0xDC: ("array", 2),
    0xDD: ("array", 4),
    0xDE: ("map", 2),
    0xDF: ("map", 4),
}
_NUM = {
    0xCA: ">f",
    0xCB: ">d",
    0xCC: ">B",
    0xCD: ">H",
    0xCE: ">I",
    0xCF: ">Q",
    0xD0: ">b",
    0xD1: ">h",
    0xD2: ">i",
    0xD3: ">q",
}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def mp_unpack(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """Decode one value from ``buf`` at ``pos``; returns it and the position after it."""

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise Incomplete
        out = buf[pos : pos + n]
        pos += n
        return out

    def length(nbytes: int) -> int:
        return int.from_bytes(take(nbytes), "big")

    def container(kind: str, n: int) -> Any:
        if kind == "array":
            return [one() for _ in range(n)]
        out: dict[Any, Any] = {}
        for _ in range(n):
            key = one()
            out[key] = one()
        return out

    def one() -> Any:
        b = take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if b <= 0x8F:
            return container("map", b & 0x0F)
        if b <= 0x9F:
            return container("array", b & 0x0F)
        if b <= 0xBF:
            return take(b & 0x1F).decode(errors="replace")
        if b == 0xC0:
            return None
        if b in (0xC2, 0xC3):
            return b == 0xC3
        if b in _NUM:
            fmt = _NUM[b]
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]
        if b in _FIXEXT:
            take(1)
            return take(_FIXEXT[b])
        if b in _FIXED:
            kind, nbytes = _FIXED[b]
            n = length(nbytes)
            if kind == "bin":
                return take(n)
            if kind == "ext":
                take(1)
                return take(n)
            if kind == "str":
                return take(n).decode(errors="replace")
            return container(kind, n)
        raise ValueError(f"unsupported msgpack byte 0x{b:02x}")

    value = one()
    return value, pos


# ---------------------------------------------------------------------------- Serf RPC


class SerfError(Exception):
    """Serf's RPC answered with an error, or out of sequence."""


class SerfRpc:
    """One connection to a Serf agent's RPC port (msgpack over TCP): a request/response at a
    time, or a single event stream."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._buf = b""
        self._seq = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, addr: tuple[str, int], timeout: float = 5.0) -> AsyncIterator[SerfRpc]:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(*addr)
        async with stream:
            rpc = cls(stream)
            with anyio.fail_after(timeout):
                await rpc.request("handshake", {"Version": 1}, reply=False)
            yield rpc

    async def _read(self) -> Any:
        while True:
            try:
                value, used = mp_unpack(self._buf)
            except Incomplete:
                self._buf += await self._stream.receive(65536)
                continue
            self._buf = self._buf[used:]
            return value

    async def _header(self, seq: int) -> None:
        header = await self._read()
        if not isinstance(header, dict) or header.get("Seq") != seq:
            raise SerfError(f"unexpected response header {header!r}")
        if header.get("Error"):
            raise SerfError(str(header["Error"]))

    async def request(self, command: str, body: Any = None, *, reply: bool = True) -> Any:
        self._seq += 1
        seq = self._seq
        data = mp_pack({"Command": command, "Seq": seq})
        if body is not None:
            data += mp_pack(body)
        await self._stream.send(data)
        await self._header(seq)
        return await self._read() if reply else None

    async def statuses(self) -> Statuses:
        body = await self.request("members")
        return {str(m["Name"]): str(m["Status"]) for m in body["Members"]}

    async def stats(self) -> dict[str, dict[str, str]]:
        result: dict[str, dict[str, str]] = await self.request("stats")
        return result

    async def events(self, types: str) -> AsyncIterator[dict[str, Any]]:
        """Subscribe (``stream``) and yield events; uses up the connection."""
        await self.request("stream", {"Type": types}, reply=False)
        seq = self._seq
        while True:
            await self._header(seq)
            event = await self._read()
            if isinstance(event, dict):
                yield event


# ---------------------------------------------------------------------------- systems

POLL_ERRORS = (
    MeshError,
    SerfError,
    OSError,
    TimeoutError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen[Any]
    log: Path
    socket: str = ""  # meshd: API socket
    rpc: tuple[str, int] = ("", 0)  # serf: RPC address


@dataclass
class System:
    """N agents of one kind (meshd or Serf), however they were started; ends them by pid."""

    kind: str
    agents: dict[str, Agent]
    stop: Callable[[Agent], object]
    dead: str = "dead"

    @property
    def names(self) -> list[str]:
        return list(self.agents)

    def signal(self, name: str, sig: int) -> None:
        proc = self.agents[name].proc
        if proc.poll() is None:
            proc.send_signal(sig)

    def exited(self) -> dict[str, int]:
        return {n: a.proc.returncode for n, a in self.agents.items() if a.proc.poll() is not None}

    def log_tail(self, name: str, chars: int = 1500) -> str:
        try:
            return self.agents[name].log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                self.stop(agent)

    @asynccontextmanager
    async def poller(self, name: str, timeout: float = 2.0) -> AsyncIterator[PollFn]:
        """One open connection to ``name``; the yielded function polls its member table."""
        agent = self.agents[name]
        if self.kind == "meshd":
            async with Connection.open(agent.socket, client="bench", timeout=timeout) as conn:

                async def poll_meshd() -> Statuses:
                    members = await conn.call("members", timeout=timeout)
                    return {m["name"]: m["status"] for m in members}

                yield poll_meshd
        else:
            async with SerfRpc.open(agent.rpc, timeout=timeout) as rpc:

                async def poll_serf() -> Statuses:
                    with anyio.fail_after(timeout):
                        return await rpc.statuses()

                yield poll_serf

    async def poll_once(self, name: str) -> Statuses:
        async with self.poller(name) as poll:
            return await poll()

    async def counters(self, name: str) -> dict[str, Any]:
        """meshd: ``info`` (awareness and protocol counters); Serf: ``stats``."""
        agent = self.agents[name]
        if self.kind == "meshd":
            async with Connection.open(agent.socket, client="bench", timeout=3.0) as conn:
                info = await conn.call("info", timeout=3.0)
            return {"awareness": info["awareness"], **info["stats"]}
        async with SerfRpc.open(agent.rpc, timeout=3.0) as rpc:
            with anyio.fail_after(3.0):
                stats = await rpc.stats()
        serf = stats.get("serf", {})
        return {k: _num(v) for k, v in serf.items()}

    async def health_score(self, name: str) -> int:
        """Lifeguard's local health (meshd awareness, Serf health_score); 0 is healthy."""
        c = await self.counters(name)
        return int(c.get("awareness", c.get("health_score", 0)) or 0)

    async def watch_deaths(self, name: str, sink: DeathSink) -> None:
        """Report every death verdict ``name`` reaches, as it happens, until cancelled."""
        agent = self.agents[name]
        if self.kind == "meshd":
            async with (
                Connection.open(agent.socket, client="bench", timeout=3.0) as conn,
                conn.stream("members.watch") as events,
            ):
                async for event in events:
                    if event.get("kind") == "dead":
                        sink(name, event["member"]["name"], time.monotonic())
        else:
            async with SerfRpc.open(agent.rpc, timeout=3.0) as rpc:
                async for event in rpc.events("member-failed"):
                    for member in event.get("Members", []):
                        sink(name, str(member["Name"]), time.monotonic())


def _num(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value


def _kill_and_reap(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()  # by pid; works on a stopped process too
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def meshd_loopback(root: Path, n: int, profile: str) -> System:
    """N meshd daemons on 127.0.0.1 via LocalCluster; n1 is everyone's seed."""
    cluster = LocalCluster(root, profile=profile)
    agents: dict[str, Agent] = {}
    try:
        for daemon in cluster.start_many(n):
            assert daemon.proc is not None
            agents[daemon.name] = Agent(
                daemon.name, daemon.proc, daemon.log_path, socket=daemon.socket_path
            )
    except BaseException:
        for daemon in cluster.daemons.values():
            daemon.kill()
            daemon.wait(10)
        raise
    return System("meshd", agents, lambda a: _kill_and_reap(a.proc))


def _spawn_logged(argv: Sequence[str], log: Path, **kw: Any) -> subprocess.Popen[Any]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kw,
        )


async def _wait_rpc(system: System, agent: Agent, timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"serf {agent.name} exited:\n{system.log_tail(agent.name)}")
            try:
                async with SerfRpc.open(agent.rpc, timeout=1.0):
                    return
            except POLL_ERRORS:
                await anyio.sleep(0.1)


def _serf_argv(name: str, bind: str, rpc: tuple[str, int], join: str | None) -> list[str]:
    return [
        "serf",
        "agent",
        f"-node={name}",
        f"-bind={bind}",
        f"-rpc-addr={rpc[0]}:{rpc[1]}",
        *([f"-join={join}"] if join else []),
    ]


async def serf_loopback(root: Path, n: int) -> System:
    """N Serf agents on 127.0.0.1, default (LAN) configuration; n1 is the join address."""
    root.mkdir(parents=True, exist_ok=True)
    system = System("serf", {}, lambda a: _kill_and_reap(a.proc), dead="failed")
    try:
        seed = ""
        for i in range(1, n + 1):
            name = f"n{i}"
            bind = f"127.0.0.1:{free_port()}"
            rpc = ("127.0.0.1", free_port())
            log = root / f"serf-{name}.log"
            proc = _spawn_logged(_serf_argv(name, bind, rpc, seed or None), log)
            system.agents[name] = Agent(name, proc, log, rpc=rpc)
            if i == 1:
                seed = bind
                await _wait_rpc(system, system.agents[name])
    except BaseException:
        system.close()
        raise
    return system


def meshd_netns(net: HostNet, root: Path, profile: str, port: int = 7946) -> System:
    """One meshd daemon per host of ``net`` (API sockets under ``root``, reachable from here:
    Unix sockets live in the file system, not in the network namespace)."""
    root.mkdir(parents=True, exist_ok=True)
    key = base64.b64encode(os.urandom(32)).decode()
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONUNBUFFERED"] = "1"
    seed = f"{net.hosts[0].addr}:{port}"
    system = System("meshd", {}, lambda a: net.stop(a.proc, grace=0))
    try:
        for i, host in enumerate(net.hosts, start=1):
            name = f"n{i}"
            sock = str(root / f"{name}.sock")
            log = root / f"{name}.log"
            argv = [
                sys.executable,
                "-m",
                "meshd",
                "run",
                "--name",
                name,
                "--bind",
                f"{host.addr}:{port}",
                "--socket",
                sock,
                "--data-dir",
                str(root / f"{name}.data"),
                "--profile",
                profile,
                "--log-format",
                "logfmt",
                f"--key={key}",
                *([f"--seed={seed}"] if i > 1 else []),
            ]
            with open(log, "ab") as out:
                proc = net.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            system.agents[name] = Agent(name, proc, log, socket=sock)
    except BaseException:
        system.close()
        raise
    return system


async def serf_netns(net: HostNet, root: Path, port: int = 7946, rpc_port: int = 7373) -> System:
    """One Serf agent per host; RPC on the host's address, reached over the bridge (whose
    address is exempt from every fault, so polling is never lost)."""
    root.mkdir(parents=True, exist_ok=True)
    seed = f"{net.hosts[0].addr}:{port}"
    system = System("serf", {}, lambda a: net.stop(a.proc, grace=0), dead="failed")
    try:
        for i, host in enumerate(net.hosts, start=1):
            name = f"n{i}"
            log = root / f"serf-{name}.log"
            rpc = (host.addr, rpc_port)
            argv = _serf_argv(name, f"{host.addr}:{port}", rpc, seed if i > 1 else None)
            with open(log, "ab") as out:
                proc = net.popen(host, argv, stdout=out, stderr=subprocess.STDOUT)
            system.agents[name] = Agent(name, proc, log, rpc=rpc)
            if i == 1:
                await _wait_rpc(system, system.agents[name])
    except BaseException:
        system.close()
        raise
    return system


async def wait_converged(system: System, timeout: float) -> float:
    """Until every agent sees every agent alive; returns how long it took."""
    expected = set(system.names)
    started = time.monotonic()
    with anyio.fail_after(timeout):
        while True:
            exited = system.exited()
            if exited:
                name, code = next(iter(exited.items()))
                raise RuntimeError(
                    f"{system.kind} {name} exited with {code}:\n{system.log_tail(name)}"
                )
            try:
                views = [await system.poll_once(n) for n in system.names]
            except POLL_ERRORS:
                views = []
            if views and all({m for m, s in v.items() if s == "alive"} == expected for v in views):
                return time.monotonic() - started
            await anyio.sleep(0.2)


async def wait_healthy(system: System, settle: float, timeout: float = 20.0) -> bool:
    """Let startup load pass: wait ``settle`` s, then until every local-health score is 0
    (a busy start can raise Lifeguard's awareness, which stretches probe intervals)."""
    await anyio.sleep(settle)
    with anyio.move_on_after(timeout):
        while True:
            try:
                scores = [await system.health_score(n) for n in system.names]
            except POLL_ERRORS:
                scores = [1]
            if not any(scores):
                return True
            await anyio.sleep(0.25)
    return False


# ---------------------------------------------------------------------------- detection


@dataclass
class Detection:
    fault: str  # "kill9" | "hang" | "isolate"
    victim: str
    first_s: float | None
    all_s: float | None
    seen_by: dict[str, float]
    false_positives: list[tuple[str, str]]  # (observer, member)
    suspect_pairs: int
    poll_errors: int
    converge_s: float
    healthy: bool
    counters: dict[str, int] = field(default_factory=dict)


def fault_action(
    system: System, victim: str, fault: str, net: HostNet | None = None
) -> Callable[[], None]:
    """What ``fault`` does to ``victim``: SIGKILL (``kill9``), SIGSTOP (``hang``), or every
    packet of its host dropped (``isolate``: needs the victim in a HostNet host ``hN`` for
    member ``nN``)."""
    if fault == "isolate":
        if net is None:
            raise ValueError("isolate needs hosts in network namespaces")
        host = net.hosts[int(victim[1:]) - 1]
        return lambda: net.isolate(host)
    sig = FAULTS[fault]
    assert sig is not None
    return lambda: system.signal(victim, sig)


async def measure_detection(
    system: System,
    victim: str,
    fault: str,
    apply: Callable[[], None],
    *,
    poll_s: float,
    timeout_s: float,
    tail_s: float,
) -> Detection:
    """Apply ``fault`` to ``victim``, then poll every survivor until all report it dead (or
    timeout). The clock starts just before the fault is applied."""
    survivors = [n for n in system.names if n != victim]
    seen: dict[str, float] = {}
    fps: set[tuple[str, str]] = set()
    suspects: set[tuple[str, str]] = set()
    errors = 0
    all_seen = anyio.Event()
    async with contextlib.AsyncExitStack() as stack:
        polls = {n: await stack.enter_async_context(system.poller(n)) for n in survivors}
        for n in survivors:
            await polls[n]()  # the connection works and is warm before the clock starts
        t0 = time.monotonic()
        apply()

        async def watch(name: str, poll: PollFn) -> None:
            nonlocal errors
            due = time.monotonic()
            while True:
                try:
                    view = await poll()
                except POLL_ERRORS:
                    errors += 1
                    view = {}
                now = time.monotonic()
                if view.get(victim) == system.dead and name not in seen:
                    seen[name] = now - t0
                    if len(seen) == len(survivors):
                        all_seen.set()
                for member, status in view.items():
                    if member != victim and status == system.dead:
                        fps.add((name, member))
                    elif member != victim and status == "suspect":
                        suspects.add((name, member))
                due += poll_s
                await anyio.sleep(max(0.0, due - time.monotonic()))

        async with anyio.create_task_group() as tg:
            for name, poll in polls.items():
                tg.start_soon(watch, name, poll)
            with anyio.move_on_after(timeout_s):
                await all_seen.wait()
            if all_seen.is_set():
                await anyio.sleep(tail_s)  # keep watching a little for collateral verdicts
            tg.cancel_scope.cancel()
    times = sorted(seen.values())
    return Detection(
        fault=fault,
        victim=victim,
        first_s=times[0] if times else None,
        all_s=times[-1] if len(times) == len(survivors) else None,
        seen_by=seen,
        false_positives=sorted(fps),
        suspect_pairs=len(suspects),
        poll_errors=errors,
        converge_s=0.0,
        healthy=True,
    )


async def detection_once(
    make: Callable[[Path], Awaitable[System]],
    root: Path,
    fault: str,
    rng: random.Random,
    args: argparse.Namespace,
    net: HostNet | None = None,
) -> Detection:
    system = await make(root)
    try:
        converge_s = await wait_converged(system, args.converge_timeout)
        healthy = await wait_healthy(system, args.settle)
        victim = rng.choice(system.names[1:])
        result = await measure_detection(
            system,
            victim,
            fault,
            fault_action(system, victim, fault, net),
            poll_s=args.poll,
            timeout_s=args.timeout,
            tail_s=args.tail,
        )
        result.converge_s = converge_s
        result.healthy = healthy
        if system.kind == "meshd":
            totals: dict[str, int] = {}
            for name in system.names:
                if name == victim:
                    continue
                with contextlib.suppress(*POLL_ERRORS):
                    for key, value in (await system.counters(name)).items():
                        if isinstance(value, int):
                            totals[key] = totals.get(key, 0) + value
            result.counters = totals
        return result
    finally:
        system.close()
        if net is not None:
            net.heal()


def _median(values: Sequence[float | None]) -> float | None:
    """Median with a run that never finished counted as infinitely slow (None if that wins)."""
    if not values:
        return None
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else round(m, 3)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


# Keys of each fault's figures; kill9 keeps its historical (unprefixed) names.
_PREFIX = {"kill9": "", "hang": "hang_", "isolate": "isolate_"}


def summarize(results: list[Detection]) -> dict[str, Any]:
    fps = [
        {"fault": r.fault, "victim": r.victim, "observer": o, "member": m}
        for r in results
        for o, m in r.false_positives
    ]
    out: dict[str, Any] = {}
    for fault, prefix in _PREFIX.items():
        runs = [r for r in results if r.fault == fault]
        if not runs:
            continue
        out[f"{prefix}detect_first_median_s"] = _median([r.first_s for r in runs])
        out[f"{prefix}detect_all_median_s"] = _median([r.all_s for r in runs])
        out[f"{prefix}detect_first_runs"] = [_r(r.first_s) for r in runs]
        out[f"{prefix}detect_all_runs"] = [_r(r.all_s) for r in runs]
        out[f"{prefix}false_positives"] = sum(len(r.false_positives) for r in runs)
    out |= {
        "false_positives": len(fps),
        "false_positive_pairs": fps,
        "suspect_pairs_seen": sum(r.suspect_pairs for r in results),
        "timeouts": sum(r.all_s is None for r in results),
        "poll_errors": sum(r.poll_errors for r in results),
        "converge_median_s": _median([r.converge_s for r in results]),
        "unsettled_runs": sum(not r.healthy for r in results),
    }
    kill = [r for r in results if r.fault == "kill9"]
    if any(r.counters for r in kill):
        out["kill9_deaths_by_refusal_runs"] = [r.counters.get("deaths_by_refusal") for r in kill]
    silent = [r for r in results if r.fault != "kill9" and r.counters]
    if silent:
        out["silent_suspicions_runs"] = [r.counters.get("suspicions") for r in silent]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else round(a / b, 3)


async def run_detection(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    serf = shutil.which("serf") if not args.no_serf else None
    results: dict[str, list[Detection]] = {"meshd": [], "serf": []}
    faults = args.faults.split(",")
    netns = args.netns or "isolate" in faults
    if netns:
        reason = unavailable_reason()
        if reason is not None:
            raise SystemExit(f"--faults isolate / --netns: {reason}")
    net = (
        HostNet(args.nodes, prefix=args.prefix, subnet=args.subnet, root_addr=True)
        if netns
        else None
    )
    ports = itertools.count(20000, 10)  # a fresh port per cluster: no TIME_WAIT surprises

    async def make_meshd(where: Path) -> System:
        if net is not None:
            return meshd_netns(net, where, args.profile, port=next(ports))
        return meshd_loopback(where, args.nodes, args.profile)

    async def make_serf(where: Path) -> System:
        if net is not None:
            port = next(ports)
            return await serf_netns(net, where, port=port, rpc_port=port + 1)
        return await serf_loopback(where, args.nodes)

    makers: list[tuple[str, Callable[[Path], Awaitable[System]]]] = [("meshd", make_meshd)]
    if serf:
        makers.append(("serf", make_serf))
    with net if net is not None else contextlib.nullcontext():
        for run in range(1, args.runs + 1):
            # Interleaved, so that any drift in machine load hits both systems alike.
            for fault in faults:
                for kind, make in makers:
                    where = root / f"run{run}-{fault}-{kind}"
                    r = await detection_once(make, where, fault, rng, args, net)
                    results[kind].append(r)
                    err.print(
                        f"[dim]run {run}/{args.runs} {kind:5} {fault:7} victim {r.victim}: "
                        f"first {_fmt(r.first_s)} all {_fmt(r.all_s)} "
                        f"fp {len(r.false_positives)} (converged in {r.converge_s:.1f} s, "
                        f"load {_load()})[/dim]"
                    )
    meshd = summarize(results["meshd"])
    serf_summary = summarize(results["serf"]) if serf else None
    out: dict[str, Any] = {
        "mode": "detect",
        "nodes": args.nodes,
        "runs": args.runs,
        "faults": faults,
        "profile": args.profile,
        "meshd": meshd,
        "serf": serf_summary,
    }
    for fault, prefix in _PREFIX.items():
        if fault in faults:
            key = f"{prefix}detect_all_median_s"
            name = "ratio_detect" if fault == "kill9" else f"ratio_{fault}"
            out[name] = _ratio(meshd[key], serf_summary[key] if serf_summary else None)
    out["method"] = _method(args)
    if not serf:
        out["serf_note"] = "skipped (--no-serf)" if args.no_serf else SERF_HINT
    if args.sim_seeds > 0:
        err.print("[dim]the same faults in the simulator...[/dim]")
        # The simulator runs its own trio loop (virtual time): in a worker thread.
        out["sim"] = await anyio.to_thread.run_sync(
            sim_detection, args.nodes, faults, args.sim_seeds, args.profile
        )
    return out


# ---------------------------------------------------------------------------- soak


class CpuQuota:
    """Throttle one process with a cgroup CPU quota (``percent`` of one CPU per 100 ms), in a
    cgroup of its own made for the purpose; on exit the process (if still alive) goes back to
    where it was and the cgroup is removed. cgroup v1 (``cpu`` controller) or v2."""

    PERIOD_US = 100_000

    def __init__(self, pid: int, percent: int, name: str) -> None:
        self.pid = pid
        self.percent = percent
        self.name = name
        self.path: Path | None = None
        self.origin: Path | None = None
        self.version = 0

    def _locate(self) -> tuple[int, Path, Path]:
        v1 = Path("/sys/fs/cgroup/cpu")
        if (v1 / "cpu.cfs_quota_us").exists():
            rel = self._own_path(lambda c: "cpu" in c.split(","))
            return 1, v1, v1 / rel.lstrip("/")
        v2 = Path("/sys/fs/cgroup")
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            rel = self._own_path(lambda c: c == "")
            return 2, v2, v2 / rel.lstrip("/")
        raise RuntimeError("no cgroup CPU controller here (v1 cpu or v2 with cpu enabled)")

    def _own_path(self, match: Callable[[str], bool]) -> str:
        for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if match(controllers):
                return path
        return "/"

    def __enter__(self) -> CpuQuota:
        self.version, base, self.origin = self._locate()
        self.path = base / self.name
        self.path.mkdir()
        try:
            quota = self.PERIOD_US * self.percent // 100
            if self.version == 1:
                (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
            (self.path / "cgroup.procs").write_text(str(self.pid))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        if self.origin is not None:
            with contextlib.suppress(OSError):
                (self.origin / "cgroup.procs").write_text(str(self.pid))
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    err.print(f"[yellow]could not remove cgroup {self.path}[/yellow]")
                    break
                time.sleep(0.05)
        self.path = None


@dataclass(frozen=True)
class Starve:
    """``stop:S/R`` (SIGSTOP for S s, SIGCONT for R s, again and again) or ``quota:Q`` (a
    cgroup CPU quota of Q % of one CPU)."""

    kind: str
    stop: float = 0.0
    run: float = 0.0
    percent: int = 0

    @classmethod
    def parse(cls, text: str) -> Starve:
        kind, _, arg = text.partition(":")
        try:
            if kind == "stop":
                stop, run = (float(x) for x in arg.split("/"))
                if stop > 0 and run > 0:
                    return cls("stop", stop=stop, run=run)
            elif kind == "quota":
                percent = int(arg)
                if 1 <= percent <= 100:
                    return cls("quota", percent=percent)
        except ValueError:
            pass
        raise SystemExit(f"--starve {text!r}: use stop:S/R (seconds) or quota:Q (1-100 %)")

    def describe(self) -> str:
        if self.kind == "stop":
            return f"SIGSTOP {self.stop:g} s / SIGCONT {self.run:g} s, repeated"
        return f"cgroup CPU quota {self.percent} % of one CPU (period 100 ms)"

    def sim_case(self) -> SoakCase:
        if self.kind == "stop":
            return SoakCase("starve", stop=self.stop, run=self.run)
        # A quota is a duty cycle at the period's scale: stopped for the rest of each 100 ms.
        return SoakCase("starve", stop=0.1 * (1 - self.percent / 100), run=0.1 * self.percent / 100)


@asynccontextmanager
async def starving(system: System, name: str, how: Starve) -> AsyncIterator[None]:
    """Starve ``name``'s process for as long as the block runs."""
    proc = system.agents[name].proc
    if how.kind == "quota":
        with CpuQuota(proc.pid, how.percent, f"meshd-bench-{os.getpid()}-{system.kind}"):
            yield
        return
    async with anyio.create_task_group() as tg:

        async def cycle() -> None:
            try:
                while proc.poll() is None:
                    proc.send_signal(signal.SIGSTOP)
                    await anyio.sleep(how.stop)
                    proc.send_signal(signal.SIGCONT)
                    await anyio.sleep(how.run)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)

        tg.start_soon(cycle)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


def soak_targets(system: System, args: argparse.Namespace) -> list[str]:
    """The members a soak's fault is aimed at: the starved one, or the asymmetric senders
    (never the seed n1)."""
    names = system.names
    if args.soak == "starve":
        return [names[1]]
    if args.soak == "asym":
        return names[1 : 1 + args.asym_hosts]
    return []


async def soak_once(system: System, net: HostNet, args: argparse.Namespace) -> dict[str, Any]:
    """Converge, then hold the soak's fault for ``--duration`` s; every death verdict anyone
    reaches meanwhile is a false positive (nobody fails)."""
    converge_s = await wait_converged(system, args.converge_timeout)
    healthy = await wait_healthy(system, args.settle)
    verdicts: list[tuple[str, str, float]] = []
    polled: set[tuple[str, str]] = set()
    suspect_obs = 0
    errors = 0
    counters: dict[str, dict[str, Any]] = {}
    nft: dict[str, int] = {}  # packets arriving at / dropped by the fault rules, all hosts
    targets = soak_targets(system, args)

    def sink(observer: str, member: str, at: float) -> None:
        verdicts.append((observer, member, at))

    async with anyio.create_task_group() as watchers:
        for name in system.names:
            watchers.start_soon(system.watch_deaths, name, sink)
        await anyio.sleep(0.5)  # subscriptions registered before the fault starts
        starve = contextlib.AsyncExitStack()
        if args.soak == "loss":
            for host in net.hosts:
                net.set_loss(host, args.loss)
        elif args.soak == "asym":
            for src in targets:
                sender = net.hosts[int(src[1:]) - 1]
                for host in net.hosts:
                    if host != sender:
                        net.set_link_loss(sender, host, args.asym_loss)
        t0 = time.monotonic()
        try:
            if args.soak == "starve":
                await starve.enter_async_context(starving(system, targets[0], args.starve))
            async with contextlib.AsyncExitStack() as stack:
                polls = {n: await stack.enter_async_context(system.poller(n)) for n in system.names}
                while time.monotonic() - t0 < args.duration:
                    tick = time.monotonic()
                    for name, poll in polls.items():
                        if name in targets and args.soak == "starve":
                            continue  # its own table is read through its event stream
                        try:
                            view = await poll()
                        except POLL_ERRORS:
                            errors += 1
                            continue
                        for member, status in view.items():
                            if status == system.dead:
                                polled.add((name, member))
                            elif status == "suspect":
                                suspect_obs += 1
                    await anyio.sleep(max(0.0, 0.5 - (time.monotonic() - tick)))
            await starve.aclose()
            for name in system.names:
                with contextlib.suppress(*POLL_ERRORS):
                    counters[name] = await system.counters(name)
            for host in net.hosts:
                for rule, packets in net.counters(host).items():
                    key = "dropped" if rule.startswith("loss") else rule
                    nft[key] = nft.get(key, 0) + packets
        finally:
            await starve.aclose()
            net.heal()
        watchers.cancel_scope.cancel()
    crashed = system.exited()
    pairs = sorted({(o, m) for o, m, _ in verdicts} | polled)
    totals: dict[str, Any] = {}
    for c in counters.values():
        for key in ("deaths", "suspicions", "refutations", "probes", "probe_failures", "failed"):
            if isinstance(c.get(key), int):
                totals[key] = totals.get(key, 0) + c[key]
    out = {
        "false_positives": len(verdicts),
        "false_positive_pairs": [{"observer": o, "member": m} for o, m in pairs],
        "false_positive_members": sorted({m for _, m in pairs}),
        "polled_dead_pairs": len(polled),
        "suspect_observations": suspect_obs if system.kind == "meshd" else None,
        "first_verdict_after_s": _r(min(at for *_, at in verdicts) - t0) if verdicts else None,
        "totals": totals,
        "nft_packets": nft,
        "per_node": counters,
        "crashed": crashed,
        "poll_errors": errors,
        "converge_s": round(converge_s, 2),
        "settled": healthy,
    }
    if args.soak == "loss":
        arriving = nft.get("arriving")
        out["loss_measured"] = round(nft.get("dropped", 0) / arriving, 4) if arriving else None
    if targets:
        out["targets"] = targets
        out["false_positives_about_targets"] = sum(1 for _, m, _ in verdicts if m in targets)
        out["false_positives_by_targets"] = sum(1 for o, _, _ in verdicts if o in targets)
    return out


def soak_case(args: argparse.Namespace) -> SoakCase:
    if args.soak == "loss":
        return SoakCase("loss", loss=args.loss)
    if args.soak == "asym":
        return SoakCase("asym", loss=args.asym_loss, hosts=args.asym_hosts)
    starve: Starve = args.starve
    return starve.sim_case()


async def run_soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mode": args.soak,
        "nodes": args.nodes,
        "runs": 1,
        "profile": args.profile,
        "duration_s": args.duration,
        "method": _method(args),
    }
    if args.soak == "loss":
        out["loss"] = args.loss
    elif args.soak == "asym":
        out |= {"asym_loss": args.asym_loss, "asym_hosts": args.asym_hosts}
    else:
        out["starve"] = args.starve.describe()
    reason = unavailable_reason()
    serf = shutil.which("serf") if not args.no_serf else None
    if reason is not None:
        out |= {
            "skipped": reason,
            "meshd": {"false_positives": None},
            "serf": {"false_positives": None} if serf else None,
        }
        if not serf:
            out["serf_note"] = SERF_HINT
        return out
    net = HostNet(args.nodes, prefix=args.prefix, subnet=args.subnet, root_addr=True)
    with net:
        system = meshd_netns(net, root / "meshd", args.profile)
        try:
            out["meshd"] = await soak_once(system, net, args)
        finally:
            system.close()
        err.print(f"[dim]meshd, {_soak_title(out)}: {_soak_line(out['meshd'])}[/dim]")
        if serf:
            system = await serf_netns(net, root / "serf")
            try:
                out["serf"] = await soak_once(system, net, args)
            finally:
                system.close()
            err.print(f"[dim]serf, {_soak_title(out)}: {_soak_line(out['serf'])}[/dim]")
        else:
            out["serf"] = None
            out["serf_note"] = "skipped (--no-serf)" if args.no_serf else SERF_HINT
    if args.sim_seeds > 0:
        err.print("[dim]the same fault in the simulator...[/dim]")
        out["sim"] = await anyio.to_thread.run_sync(
            sim_soak, args.nodes, soak_case(args), args.duration, 1, args.profile
        )
    return out


def _soak_title(result: dict[str, Any]) -> str:
    mode = result["mode"]
    if mode == "loss":
        return f"{result['loss']:.0%} loss"
    if mode == "asym":
        return f"{result['asym_hosts']} hosts lose {result['asym_loss']:.0%} of what they send"
    return f"one host starved ({result['starve']})"


def _soak_line(r: dict[str, Any]) -> str:
    return f"false positives {r['false_positives']}, totals {r['totals']}"


# ---------------------------------------------------------------------------- output


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} s"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _serf_version() -> str | None:
    if not shutil.which("serf"):
        return None
    res = subprocess.run(["serf", "version"], capture_output=True, text=True, check=False)
    return res.stdout.splitlines()[0].strip() if res.stdout else None


def _method(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "meshd_version": meshd_version,
        "serf_version": _serf_version(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "poll_interval_s": args.poll if args.soak is None else 0.5,
        "cluster_per_run": "fresh cluster for every (run, fault, system)",
        "hosts": "network namespaces on a bridge (chaos.netns.HostNet)"
        if args.soak is not None or args.netns or "isolate" in args.faults.split(",")
        else "loopback",
        "converge": "from spawn: includes process start; meshd daemons start all at once "
        "(joins retry with backoff until the seed is up), Serf's seed is started first",
        "settle_s": args.settle,
        "meshd": f"profile {args.profile}, encrypted gossip (AES-GCM key), UDP+TCP on one port",
        "serf": "serf agent defaults (LAN profile), no encryption, untuned",
        "hang": "SIGSTOP: sockets stay open, no TCP reset",
        "kill9": "SIGKILL: TCP connects are refused (meshd's refused_is_dead fast path applies)",
        "isolate": "every packet to and from the victim's host dropped by nftables (input "
        "hooks of every host): no reset, connects time out; the process keeps running",
    }


def print_table(result: dict[str, Any]) -> None:
    console = Console()
    if result["mode"] != "detect":
        table = Table(
            title=f"{result['nodes']} nodes, {_soak_title(result)} for {result['duration_s']} s"
        )
        table.add_column("")
        table.add_column("false positives", justify="right")
        table.add_column("members hit", justify="right")
        table.add_column("suspicions", justify="right")
        table.add_column("refutations", justify="right")
        for kind in ("meshd", "serf"):
            r = result.get(kind)
            if not r or r.get("false_positives") is None:
                table.add_row(kind, "—", "—", "—", "—")
                continue
            t = r["totals"]
            table.add_row(
                kind,
                str(r["false_positives"]),
                ", ".join(r["false_positive_members"]) or "none",
                str(t.get("suspicions", "—")),
                str(t.get("refutations", "—")),
            )
        console.print(table)
        sim = result.get("sim")
        if sim:
            console.print(
                f"simulator, same fault, {sim['virtual_s']:g} virtual s: "
                f"{sim['false_positives']} false positives"
            )
    else:
        faults = [f for f in _PREFIX if f in result["faults"]]
        table = Table(title=f"{result['nodes']} nodes, {result['runs']} runs (medians)")
        table.add_column("")
        for fault in faults:
            table.add_column(f"{fault}: first", justify="right")
            table.add_column(f"{fault}: all", justify="right")
        table.add_column("false pos.", justify="right")
        for kind in ("meshd", "serf"):
            r = result.get(kind)
            if not r:
                table.add_row(kind, *["—"] * (2 * len(faults) + 1))
                continue
            cells = []
            for fault in faults:
                prefix = _PREFIX[fault]
                cells += [
                    _fmt(r[f"{prefix}detect_first_median_s"]),
                    _fmt(r[f"{prefix}detect_all_median_s"]),
                ]
            table.add_row(kind, *cells, str(r["false_positives"]))
        console.print(table)
        ratios = ", ".join(
            f"{f} {result.get('ratio_detect' if f == 'kill9' else f'ratio_{f}')}" for f in faults
        )
        console.print(f"ratio meshd/serf, detect all: {ratios}")
        sim = result.get("sim")
        if sim:
            line = ", ".join(f"{f} {_fmt(sim[f]['median_s'])}" for f in faults)
            console.print(f"simulator, {sim['seeds']} seeded clusters (virtual medians): {line}")
    for key in ("serf_note", "skipped"):
        if result.get(key):
            console.print(f"[yellow]{key}: {result[key]}[/yellow]")


# ---------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.membership",
        description="meshd failure detection and false positives, with Serf as the reference",
    )
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--runs", type=int, default=5, help="detection mode: runs per fault")
    p.add_argument("--json", action="store_true", help="print JSON (else a table)")
    p.add_argument("--profile", default="lan", help="meshd profile (Serf always uses its LAN)")
    p.add_argument("--loss", type=float, default=None, help="loss mode: fraction dropped, 0-1")
    p.add_argument(
        "--starve",
        type=Starve.parse,
        default=None,
        help="starvation mode: one host throttled, stop:S/R (SIGSTOP S s, SIGCONT R s) "
        "or quota:Q (cgroup CPU quota, %% of one CPU)",
    )
    p.add_argument(
        "--asym-loss",
        type=float,
        default=None,
        help="asymmetric mode: fraction of their packets --asym-hosts hosts lose (one way)",
    )
    p.add_argument("--asym-hosts", type=int, default=4, help="asymmetric mode: lossy senders")
    p.add_argument(
        "--duration", type=float, default=60.0, help="loss/starve/asym: seconds under the fault"
    )
    p.add_argument(
        "--faults",
        default="kill9,hang",
        help="detection mode: any of kill9, hang (SIGSTOP), isolate (all packets dropped)",
    )
    p.add_argument(
        "--netns", action="store_true", help="detection mode: hosts in namespaces for every fault"
    )
    p.add_argument("--poll", type=float, default=0.05, help="detection poll interval (s)")
    p.add_argument("--settle", type=float, default=2.0, help="pause after convergence (s)")
    p.add_argument("--tail", type=float, default=1.0, help="keep watching after detection (s)")
    p.add_argument("--timeout", type=float, default=120.0, help="give up on a detection (s)")
    p.add_argument("--converge-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=None, help="victim choice RNG seed")
    p.add_argument("--no-serf", action="store_true", help="do not run the Serf reference")
    p.add_argument(
        "--sim-seeds",
        type=int,
        default=20,
        help="seeded simulator clusters for the same figures (0: none; soaks use one)",
    )
    p.add_argument("--prefix", default="mshb", help="namespace name prefix")
    p.add_argument("--subnet", default="10.77.0.0/24", help="host subnet")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    return p


async def _measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    if args.soak is None:
        return await run_detection(args, root)
    return await run_soak(args, root)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.nodes < 3:
        raise SystemExit("--nodes must be at least 3 (a seed, a victim and an observer)")
    if not set(args.faults.split(",")) <= set(FAULTS):
        raise SystemExit(f"--faults: choose from {', '.join(FAULTS)}")
    chosen = [
        mode
        for mode, value in (("loss", args.loss), ("starve", args.starve), ("asym", args.asym_loss))
        if value is not None
    ]
    if len(chosen) > 1:
        raise SystemExit("--loss, --starve and --asym-loss are separate modes: choose one")
    args.soak = chosen[0] if chosen else None
    for name, value in (("--loss", args.loss), ("--asym-loss", args.asym_loss)):
        if value is not None and not 0 <= value <= 1:
            raise SystemExit(f"{name} is a fraction between 0 and 1")
    if args.asym_loss is not None and not 1 <= args.asym_hosts < args.nodes:
        raise SystemExit("--asym-hosts must be between 1 and --nodes - 1")
    return harness.run(
        "meshd-bench-",
        lambda root: anyio.run(harness.until_sigterm, lambda: _measure(args, root), backend="trio"),
        keep=args.keep,
        as_json=args.json,
        table=print_table,
        # Every process was already ended by pid on the way out (finally blocks, HostNet).
        interrupted="interrupted; every process and namespace was cleaned up",
    )


if __name__ == "__main__":
    raise SystemExit(main())
