"""The local API and messaging paths of meshd, measured end to end on real processes.

    python -m bench.api [--json] [--profile lan] [--backend auto|trio|asyncio]
                        [--tracing off|on|compare]

Every daemon is a real ``python -m meshd run`` process started by
:class:`~meshd.testing.localcluster.LocalCluster` (``lan`` profile unless ``--profile``,
encrypted links); every client is the real client library over the real Unix socket. Four
measurements, each on a fresh cluster so one's background work does not disturb the next:

1. **Local lookup latency** (one daemon). A name is registered on one connection; another
   connection calls ``lookup`` on it sequentially, one call in flight, after a warm-up, timing
   each call with ``perf_counter_ns`` around :meth:`Connection.call`. This is the floor of every
   API call: client encode + write, daemon read/decode/dispatch/encode/write, client read and
   decode, and one wake-up on each side. The client's event loop is trio or asyncio (anyio);
   with ``--backend auto`` both are measured in alternating rounds and the faster p50 is used
   for everything that follows (reported as ``client_backend``).
2. **Local request throughput vs a bare echo server.** ``--inflight`` ``lookup`` calls kept in
   flight on one connection (and the same total spread over ``--conns`` connections), for
   ``--duration`` s after a warm-up, counting completed calls. The baseline is a bare trio
   Unix-socket server in its own process (so, like the daemon, it does not share the client's
   CPU) that speaks the same framing (4-byte length + CBOR map, decoded and encoded with the
   same codec as the daemon) and answers every request at once with the very reply value the
   daemon gave to the same ``lookup``: same concurrency, same request and reply sizes, same
   client code path (:meth:`Connection.call`), so the same client-side codec work. It answers
   all the frames of one read with one write (``--echo-writes per-read``, what an echo of the
   bytes read does) or one write per frame (``per-frame``). Daemon and echo runs alternate,
   ``--rounds`` each; the median is reported. ``ratio_vs_echo`` = daemon / echo: how much of
   the bare socket + codec capacity the daemon's session machinery keeps. When the client is
   the bottleneck (``echo_client_bound``: the client spends more CPU per call than the echo
   server) this ratio flatters the daemon, so ``server_cpu_ratio_vs_echo`` (echo server CPU
   per request / daemon CPU per request, from ``/proc``) is reported too: it does not depend
   on who saturates first, nor on the machine's load.
3. **Cross-host request/reply** (two daemons). An echo agent is served by a client process of
   daemon B (``Mesh.serve``, the examples' echo handler); a client of daemon A calls
   ``Mesh.request`` on it at an offered rate of ``--rate`` per second, open loop: request *i*
   is started at ``t0 + i / rate`` whatever happened to the previous ones, and its latency is
   measured from that scheduled time to its reply, so a stall shows up in every request it
   delays (no coordinated omission). ``--warmup`` s at the same rate are discarded first; a
   short run at ``--low-rate`` before it is the unloaded reference. Each latency is split into
   the sender's lateness (timer slop, own stalls) and the service time, and the service time
   into its forward (client to handler) and return halves, from the handler's timestamp.
   Requests (and signals in 4.) are paced with :class:`Pacer`, a ``timerfd`` on Linux:
   ``anyio.sleep_until`` wakes up to a whole millisecond late (CPython rounds the epoll
   timeout up to milliseconds), which would add ~0.5 ms of the sender's own timer slop to the
   median of every latency.
4. **Signal fan-out** (five daemons). ``--subscribers`` subscriptions (``Mesh.subscribe``, one
   connection each) spread evenly over four daemons, one client process per daemon; a client
   of a fifth daemon publishes ``--signals`` signals open loop every ``--signal-interval`` s.
   Each signal's data carries its scheduled send time (``time.monotonic``, the same clock in
   every process on one machine); each subscriber records its receipt time. Latency = receipt
   minus scheduled send, over every (signal, subscriber) receipt; also the time until the last
   subscriber of each signal got it.

**Tracing cost** (``--tracing``). ``on`` runs phase 3 with both daemons' ``[tracing] endpoint``
set to an OTLP/HTTP receiver in a process of its own (it decodes and counts what it gets, as a
collector would): every request then records four daemon spans (api, forward on daemon a;
deliver on daemon b; plus the export). ``compare`` runs phase 3 ``--tracing-rounds`` times
each way, off and on alternating (the order flipped every other round), in the one session, and
reports the medians of p50, p99 and each daemon's CPU per call, and their differences
(``tracing_compare.cost``). The clients are the same in both: with the OpenTelemetry API
installed (the dev lock) they put a ``traceparent`` on every request either way, so the
difference is the daemons' span recording and export.

Every measurement window also records, per process, CPU use, CPU time per call and the share
of the window spent runnable but waiting for a CPU (``runq_wait_pct``, from
``/proc/PID/schedstat``), plus the 1-minute load average: on a shared machine that tells a slow
path from a busy machine.

With ``--py-spy PATH --profile-dir DIR`` the measurement windows are sampled with py-spy
(``record --format raw --nonblocking``) on the daemon(s), the serving/subscribing child
processes and this client process, and the top costs are printed. Profiling perturbs the
numbers: compare timings from runs without it. py-spy samples wall-clock stacks of threads
that are not idle, and a thread preempted while runnable counts as busy at the line it was
preempted on (often a ``send``): on a loaded machine, read its shares with ``runq_wait_pct``.

Every process is started here and ended by its pid (child processes first, then the
daemons through LocalCluster), on success, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

import anyio
import trio
from anyio.abc import TaskStatus
from rich.console import Console
from rich.table import Table

from bench import harness
from meshd import __version__ as meshd_version
from meshd.testing.localcluster import Daemon, LocalCluster
from meshd_client import AgentContext, Mesh, Message
from meshd_client.connection import Connection
from meshd_client.protocol import cbor, messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

err = Console(stderr=True, soft_wrap=True)

TARGET_NAME: Final = "bench-lookup-target"
ECHO_AGENT: Final = "bench-echo"
TOPIC: Final = "bench.fanout.tick"
PATTERN: Final = "bench.fanout.*"
REPO: Final = Path(__file__).resolve().parents[1]
# metric -> (comparison, limit)
TARGETS: Final[dict[str, tuple[str, float]]] = {
    "ratio_vs_echo": (">=", 0.5),
    "local_lookup_p50_us": ("<", 100.0),
    "xhost_request_p50_ms": ("<", 1.0),
    "xhost_request_p99_ms": ("<", 5.0),
}


# ---------------------------------------------------------------------------- helpers


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _dist(values: Sequence[float], scale: float, digits: int = 3) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max of ``values`` multiplied by ``scale``."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None}
    return {
        "p50": _r(statistics.median(values) * scale, digits),
        "p90": _r(percentile(values, 90) * scale, digits),
        "p99": _r(percentile(values, 99) * scale, digits),
        "p999": _r(percentile(values, 99.9) * scale, digits),
        "max": _r(max(values) * scale, digits),
    }


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Pacer:
    """Sleeps until an instant on ``time.monotonic()``, as precisely as the OS allows.

    ``anyio.sleep_until`` ends (on asyncio and trio alike) in an ``epoll_wait`` whose timeout
    CPython rounds *up* to a whole millisecond, so an open-loop sender paced with it starts
    each request about 0.5 ms late (measured: p50 0.63 ms, p90 1.0 ms at 2 ms intervals), and
    that lateness is counted in every latency measured from the scheduled time. On Linux a
    ``timerfd`` armed at the absolute instant makes the loop's fd readable on time instead
    (measured: p50 ~0.06 ms). The lateness that remains (wake-up, the sender's own stalls) is
    still measured and counted. Elsewhere this falls back to ``anyio.sleep_until``."""

    _CLOCK_MONOTONIC: Final = 1
    _TFD_TIMER_ABSTIME: Final = 1

    def __init__(self) -> None:
        self._fd = -1
        self._libc: Any = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                fd = libc.timerfd_create(self._CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
                if fd >= 0:
                    self._fd, self._libc = fd, libc

    @property
    def precise(self) -> bool:
        return self._fd >= 0

    async def sleep_until(self, when: float) -> None:
        """Until ``time.monotonic() >= when``."""
        if self._fd < 0:
            await anyio.sleep_until(anyio.current_time() + (when - time.monotonic()))
            return
        if time.monotonic() >= when:
            await anyio.lowlevel.checkpoint()
            return
        sec = int(when)
        value = _Timespec(sec, int((when - sec) * 1e9))
        spec = _Itimerspec(_Timespec(0, 0), value)
        if self._libc.timerfd_settime(self._fd, self._TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        while True:
            await anyio.wait_readable(self._fd)
            try:
                os.read(self._fd, 8)
                return
            except BlockingIOError:
                continue

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Pacer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Children:
    """Helper processes started by this run (echo server, agents, subscribers, py-spy); each
    is ended by its own pid."""

    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(
        self, name: str, argv: Sequence[str], *, pipe: bool = True
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else log,
                stderr=log,
                env=env,
                cwd=REPO,
            )
        self.procs[name] = proc
        return proc

    def role(self, name: str, role: str, *extra: str) -> subprocess.Popen[bytes]:
        """This module again, as a helper ``role``."""
        return self.spawn(name, [sys.executable, "-m", "bench.api", "--role", role, *extra])

    def stop(self, name: str, grace: float = 3.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


async def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """The next stdout line of a child, or an error naming ``what`` (the child is killed on
    timeout, which also ends the blocked read)."""
    assert proc.stdout is not None
    stdout: IO[bytes] = proc.stdout
    try:
        with anyio.fail_after(timeout):
            line = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"{what}: no answer within {timeout} s") from None
    if not line:
        raise RuntimeError(f"{what}: exited with {proc.wait()} before answering")
    return line.decode().strip()


@dataclass
class Profiler:
    """Optional py-spy sampling of the measurement windows."""

    py_spy: str | None
    out: Path | None
    children: Children
    files: list[Path] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.py_spy is not None and self.out is not None

    def record(self, phase: str, pids: dict[str, int], seconds: float) -> None:
        if self.py_spy is None or self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for role, pid in pids.items():
            path = self.out / f"{phase}.{role}.txt"
            self.files.append(path)
            argv = [self.py_spy, "record", "--format", "raw", "--nonblocking", "-r", "500"]
            argv += ["-d", str(max(1, math.ceil(seconds))), "-p", str(pid), "-o", str(path)]
            self.children.spawn(f"py-spy.{phase}.{role}", argv, pipe=False)

    def wait(self) -> None:
        for name in [n for n in self.children.procs if n.startswith("py-spy.")]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.children.procs[name].wait(30)
            self.children.stop(name)


def summarize_profile(path: Path, top: int) -> dict[str, Any]:
    """Self and inclusive sample shares per function of a py-spy raw (collapsed) file."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"samples": 0}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        own[_frame(frames[-1])] += count
        for name in {_frame(f) for f in frames}:
            incl[name] += count
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "self": [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)],
        "inclusive": [(name, round(100 * n / total, 1)) for name, n in incl.most_common(top)],
    }


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py:123)``."""
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else where
    return f"{func} ({short})"


# ---------------------------------------------------------------------------- helper roles


async def _echo_session(stream: trio.SocketStream, reply_value: Any, per_frame: bool) -> None:
    """Serve one connection of the bare echo server."""
    decoder = FrameDecoder(DEFAULT_MAX_FRAME)
    hello = encode_frame(messages.hello_reply(messages.API_VERSION, "echo", "bench-echo/1"))
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            decoder.feed(bytes(data))
            out: list[bytes] = []
            while (frame := decoder.next_frame()) is not None:
                kind = frame.get("t")
                if kind == "req":
                    out.append(encode_frame(messages.ok(frame["id"], reply_value)))
                elif kind == "hello":
                    out.append(hello)
                if per_frame and out:
                    await stream.send_all(out.pop())
            if out:
                await stream.send_all(b"".join(out))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


def role_echo_server(args: argparse.Namespace) -> None:
    """The baseline: a bare trio Unix-socket server answering every request frame at once."""
    reply_value = cbor.loads(bytes.fromhex(args.reply))
    per_frame = args.echo_writes == "per-frame"

    async def main() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(args.socket)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        print("ready", flush=True)

        async def handler(stream: trio.SocketStream) -> None:
            await _echo_session(stream, reply_value, per_frame)

        await trio.serve_listeners(handler, [listener])

    trio.run(main)


async def _echo(ctx: AgentContext, msg: Message) -> dict[str, object]:
    """The echo handler of ``examples/echo_asyncio.py``, plus the time it ran (to split the
    round trip into its forward and return halves)."""
    return {"echo": msg.body, "by": ctx.name, "from": msg.sender, "at": time.monotonic()}


async def role_echo_agent(args: argparse.Namespace) -> None:
    """Serve the echo agent on one daemon until terminated."""
    async with Mesh.connect(args.socket, client="bench-echo-agent") as mesh:
        agent = await mesh.serve(
            ECHO_AGENT, _echo, kind="echo", capabilities=["echo"], concurrency=args.concurrency
        )
        print("ready", flush=True)
        await agent.wait()


def role_otlp_sink(_args: argparse.Namespace) -> None:
    """An OTLP/HTTP trace receiver for ``--tracing on``: decodes and counts what the daemons
    export (as a collector would, in a process of its own), prints its port, then its counts
    as one JSON line for every line read on stdin."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    counts = {"exports": 0, "spans": 0, "bytes": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with lock:
                counts["exports"] += 1
                counts["spans"] += spans
                counts["bytes"] += len(body)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    for _line in sys.stdin:
        with lock:
            print(json.dumps(counts), flush=True)


async def role_subscribers(args: argparse.Namespace) -> None:
    """``--count`` subscribers on one daemon; records (signal, latency) per receipt and prints
    them as one JSON line once every subscriber saw the stop signal (or at the timeout)."""
    receipts: list[tuple[int, int, float]] = []
    warm = [0]
    stopped = [0]
    all_stopped = anyio.Event()

    async def listen(k: int, mesh: Mesh, *, task_status: TaskStatus[None]) -> None:
        async with mesh.subscribe(PATTERN) as signals:
            task_status.started()
            async for sig in signals:
                now = time.monotonic()
                data = sig.data if isinstance(sig.data, dict) else {}
                if "seq" in data:
                    receipts.append((int(data["seq"]), k, now - float(data["t"])))
                elif data.get("stop"):
                    stopped[0] += 1
                    if stopped[0] == args.count:
                        all_stopped.set()
                    return
                else:
                    warm[0] += 1

    async with contextlib.AsyncExitStack() as stack:
        meshes = [
            await stack.enter_async_context(Mesh.connect(args.socket, client=f"bench-sub-{k}"))
            for k in range(args.count)
        ]
        async with anyio.create_task_group() as tg:
            for k, mesh in enumerate(meshes):
                await tg.start(listen, k, mesh)
            print("ready", flush=True)
            with anyio.move_on_after(args.timeout):
                await all_stopped.wait()
            tg.cancel_scope.cancel()
    out = {"receipts": receipts, "warm": warm[0], "stopped": stopped[0], "count": args.count}
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- phase 1+2: local


async def capture_lookup(sock: str) -> bytes:
    """The CBOR of the daemon's ``lookup`` reply value (the echo server sends the same)."""
    async with (
        Connection.open(sock, client="bench-register") as registrar,
        Connection.open(sock, client="bench-lookup") as conn,
    ):
        await registrar.call("register", {"name": TARGET_NAME, "kind": "bench"})
        return cbor.dumps(await conn.call("lookup", {"name": TARGET_NAME}))


async def lookup_samples(
    sock: str, warmup: int, samples: int, register: bool, usage: Usage | None = None
) -> list[int]:
    """Sequential ``lookup`` round trips on one connection, in nanoseconds."""
    args = {"name": TARGET_NAME}
    async with contextlib.AsyncExitStack() as stack:
        if register:
            registrar = await stack.enter_async_context(
                Connection.open(sock, client="bench-register")
            )
            await registrar.call("register", {"name": TARGET_NAME, "kind": "bench"})
        conn = await stack.enter_async_context(Connection.open(sock, client="bench-lookup"))
        for _ in range(warmup):
            await conn.call("lookup", args)
        out = [0] * samples
        clock = time.perf_counter_ns
        if usage is not None:
            usage.begin()
        for i in range(samples):
            t0 = clock()
            await conn.call("lookup", args)
            out[i] = clock() - t0
        if usage is not None:
            usage.extra = usage.end(samples)
        return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc; 0.0 if unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait(pid: int) -> float:
    """Seconds the main thread of ``pid`` spent runnable but waiting for a CPU (schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Usage:
    """CPU use and run-queue waiting of some processes over a measurement window.

    On a shared machine a latency can be this program's cost or time spent waiting for a CPU
    that another process holds; ``runq_wait_pct`` (time runnable but not running, from
    ``/proc/PID/schedstat``) tells the two apart, and CPU time per call does not depend on
    the load at all."""

    pids: dict[str, int]
    start: dict[str, tuple[float, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    t0: float = 0.0
    load: float = 0.0

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        self.load = os.getloadavg()[0]
        self.start = {k: (cpu_seconds(p), runqueue_wait(p)) for k, p in self.pids.items()}

    def end(self, calls: int) -> dict[str, Any]:
        span = max(1e-9, time.perf_counter() - self.t0)
        out: dict[str, Any] = {"window_s": round(span, 2), "loadavg_1m": round(self.load, 2)}
        total = 0.0
        for key, pid in self.pids.items():
            cpu0, wait0 = self.start.get(key, (0.0, 0.0))
            cpu, wait = cpu_seconds(pid) - cpu0, runqueue_wait(pid) - wait0
            total += cpu
            out[key] = {
                "cpu_pct": round(100 * cpu / span, 1),
                "runq_wait_pct": round(100 * wait / span, 1),
                "cpu_us_per_call": round(cpu / max(1, calls) * 1e6, 1),
            }
        out["cpu_us_per_call_total"] = round(total / max(1, calls) * 1e6, 1)
        return out


@dataclass(frozen=True)
class Rate:
    """Completed calls per second, and CPU use of the server and of this client."""

    per_s: float
    usage: dict[str, Any]


def _median_rate(rates: Sequence[Rate]) -> Rate:
    return sorted(rates, key=lambda r: r.per_s)[len(rates) // 2]


async def throughput(
    sock: str,
    server_pid: int,
    conns: int,
    inflight: int,
    warmup: float,
    duration: float,
    *,
    register: bool,
    on_measure: Callable[[], None] | None = None,
) -> Rate:
    """Completed ``lookup`` calls per second with ``inflight`` calls kept in flight in total,
    spread evenly over ``conns`` connections; plus CPU time per call on both sides (which side
    is saturated tells whether the number measures the server or the client)."""
    args = {"name": TARGET_NAME}
    done = [0]
    async with contextlib.AsyncExitStack() as stack:
        if register:
            registrar = await stack.enter_async_context(
                Connection.open(sock, client="bench-register")
            )
            await registrar.call("register", {"name": TARGET_NAME, "kind": "bench"})
        opened = [
            await stack.enter_async_context(Connection.open(sock, client="bench-load"))
            for _ in range(conns)
        ]

        async def worker(conn: Connection) -> None:
            while True:
                await conn.call("lookup", args)
                done[0] += 1

        async with anyio.create_task_group() as tg:
            for i in range(inflight):
                tg.start_soon(worker, opened[i % conns])
            await anyio.sleep(warmup)
            if on_measure is not None:
                on_measure()
            usage = Usage({"server": server_pid, "client": os.getpid()})
            start, t0 = done[0], time.perf_counter()
            usage.begin()
            await anyio.sleep(duration)
            end, t1 = done[0], time.perf_counter()
            used = usage.end(end - start)
            tg.cancel_scope.cancel()
    return Rate(per_s=(end - start) / (t1 - t0), usage=used)


@dataclass
class LocalConfig:
    args: argparse.Namespace
    daemon_sock: str
    echo_sock: str
    profiler: Profiler
    daemon_pid: int
    echo_pid: int


async def local_throughput(cfg: LocalConfig) -> dict[str, Any]:
    """Daemon vs echo, alternating, for one connection and for ``--conns`` connections."""
    args = cfg.args
    configs = [(1, args.inflight)]
    if args.conns > 1:
        configs.append((args.conns, args.inflight))
    out: dict[str, Any] = {}
    for conns, inflight in configs:
        rates: dict[str, list[Rate]] = {"daemon": [], "echo": []}
        for rnd in range(args.rounds):
            for target in ("daemon", "echo"):
                sock = cfg.daemon_sock if target == "daemon" else cfg.echo_sock
                pid = cfg.daemon_pid if target == "daemon" else cfg.echo_pid
                hook: Callable[[], None] | None = None
                if rnd == 0 and cfg.profiler.enabled:
                    phase = f"throughput-{conns}c-{target}"

                    def hook(phase: str = phase, pid: int = pid) -> None:
                        cfg.profiler.record(
                            phase, {"server": pid, "client": os.getpid()}, args.duration
                        )

                rate = await throughput(
                    sock,
                    pid,
                    conns,
                    inflight,
                    args.tp_warmup,
                    args.duration,
                    register=target == "daemon",
                    on_measure=hook,
                )
                rates[target].append(rate)
        daemon = statistics.median(r.per_s for r in rates["daemon"])
        echo = statistics.median(r.per_s for r in rates["echo"])
        out[f"{conns}c"] = {
            "conns": conns,
            "inflight": inflight,
            "daemon_per_s": round(daemon, 1),
            "echo_per_s": round(echo, 1),
            "ratio": round(daemon / echo, 3),
            "daemon_rounds": [round(r.per_s, 1) for r in rates["daemon"]],
            "echo_rounds": [round(r.per_s, 1) for r in rates["echo"]],
            "daemon_usage": _median_rate(rates["daemon"]).usage,
            "echo_usage": _median_rate(rates["echo"]).usage,
        }
        # Load-independent: server CPU per request, echo over daemon (1.0: as cheap as the
        # bare server; 0.5: twice its CPU), and the client's share of the work.
        d_cpu = statistics.median(r.usage["server"]["cpu_us_per_call"] for r in rates["daemon"])
        e_cpu = statistics.median(r.usage["server"]["cpu_us_per_call"] for r in rates["echo"])
        c_cpu = statistics.median(r.usage["client"]["cpu_us_per_call"] for r in rates["echo"])
        out[f"{conns}c"]["server_cpu_ratio_vs_echo"] = _r(e_cpu / d_cpu if d_cpu else None)
        out[f"{conns}c"]["echo_client_bound"] = c_cpu > e_cpu
        err.print(
            f"[dim]throughput {conns} conn(s) x {inflight} in flight: daemon {daemon:.0f}/s, "
            f"echo {echo:.0f}/s, ratio {daemon / echo:.2f}[/dim]"
        )
    return out


def phase_local(args: argparse.Namespace, root: Path, profiler: Profiler) -> dict[str, Any]:
    """Phases 1 and 2 on a one-daemon cluster plus the echo server."""
    result: dict[str, Any] = {}
    with LocalCluster(root / "local", profile=args.profile) as cluster, Children(root) as kids:
        daemon = cluster.add("a")
        anyio.run(cluster.wait_ready, backend="trio")
        reply = anyio.run(capture_lookup, daemon.socket_path, backend="trio")
        echo_sock = str(root / "echo.sock")
        echo = kids.role(
            "echo-server",
            "echo-server",
            f"--socket={echo_sock}",
            f"--reply={reply.hex()}",
            f"--echo-writes={args.echo_writes}",
        )
        anyio.run(read_line, echo, 20.0, "echo server", backend="trio")
        backends = ["trio", "asyncio"] if args.backend == "auto" else [args.backend]
        samples: dict[tuple[str, str], list[int]] = {}
        usages: dict[tuple[str, str], Usage] = {}
        per_round = max(1, args.lookups // args.lookup_rounds)
        socks = {"daemon": daemon.socket_path, "echo": echo_sock}
        server_pids = {"daemon": daemon.pid, "echo": echo.pid}
        for _ in range(args.lookup_rounds):
            for target, sock in socks.items():
                for backend in backends:
                    usage = Usage({"server": server_pids[target], "client": os.getpid()})
                    usages[target, backend] = usage
                    samples.setdefault((target, backend), [])
                    samples[target, backend] += anyio.run(
                        lookup_samples, sock, args.lookup_warmup, per_round, target == "daemon",
                        usage, backend=backend,
                    )  # fmt: skip
        dists = {key: _dist(s, 1e-3, 1) for key, s in samples.items()}
        chosen = min(backends, key=lambda b: statistics.median(samples["daemon", b]))
        result["client_backend"] = chosen
        result["local_lookup_p50_us"] = dists["daemon", chosen]["p50"]
        result["local_lookup_p99_us"] = dists["daemon", chosen]["p99"]
        result["local_lookup_us"] = {b: dists["daemon", b] for b in backends}
        result["echo_lookup_us"] = {b: dists["echo", b] for b in backends}
        result["local_lookup_samples"] = len(samples["daemon", chosen])
        result["local_lookup_usage"] = usages["daemon", chosen].extra
        result["echo_lookup_usage"] = usages["echo", chosen].extra
        for (target, backend), d in dists.items():
            err.print(f"[dim]lookup on {target} ({backend} client): {d} us[/dim]")
        if profiler.enabled:
            # One more sequential run per target, sampled (not counted).
            for target, sock in socks.items():
                pid = daemon.pid if target == "daemon" else echo.pid
                seconds = per_round * (dists[target, chosen]["p50"] or 100) * 1e-6
                profiler.record(f"lookup-{target}", {"server": pid, "client": os.getpid()}, seconds)
                anyio.run(lookup_samples, sock, 0, per_round, target == "daemon", backend=chosen)
                profiler.wait()

        cfg = LocalConfig(args, daemon.socket_path, echo_sock, profiler, daemon.pid, echo.pid)
        tp = anyio.run(local_throughput, cfg, backend=chosen)
        profiler.wait()
        main = tp["1c"]
        result["local_request_per_s"] = main["daemon_per_s"]
        result["echo_baseline_per_s"] = main["echo_per_s"]
        result["ratio_vs_echo"] = main["ratio"]
        result["server_cpu_ratio_vs_echo"] = main["server_cpu_ratio_vs_echo"]
        result["local_throughput"] = tp
        result["reply_frame_bytes"] = len(encode_frame(messages.ok(1, cbor.loads(reply))))
    return result


# ---------------------------------------------------------------------------- phase 3: xhost


async def wait_resolves(daemon: Daemon, name: str, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                await daemon.call("lookup", {"name": name}, timeout=2.0)
                return
            except MeshError:
                await anyio.sleep(0.05)


@dataclass
class Paced:
    """What an open-loop run saw: latency from each request's scheduled start (s), the two
    halves of each round trip (s; from the request's actual start to the echo handler, and
    from the handler to the reply, on ``time.monotonic``, shared by every process), errors by
    kind, the span from the first schedule to the last completion, and the sender's largest
    lateness in starting a request. ``latencies`` = ``lateness`` (scheduled time to the
    request's task running: timer slop and this process's own stalls) + ``service`` (request
    call to reply)."""

    latencies: list[float] = field(default_factory=list)
    service: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    forward: list[float] = field(default_factory=list)
    back: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    span: float = 0.0
    late: float = 0.0


async def open_loop(mesh: Mesh, rate: float, duration: float, timeout: float) -> Paced:
    """Requests to the echo agent at fixed intervals, each started at its scheduled time in
    its own task whatever happened to the previous ones; latency from the scheduled time."""
    interval = 1.0 / rate
    count = max(1, round(rate * duration))
    out = Paced()
    last = [0.0]

    async def one(i: int, scheduled: float) -> None:
        started = time.monotonic()
        try:
            reply = await mesh.request(ECHO_AGENT, {"i": i}, timeout=timeout)
        except MeshError as exc:
            out.errors[exc.kind.value] += 1
            return
        now = time.monotonic()
        out.latencies.append(now - scheduled)
        out.service.append(now - started)
        out.lateness.append(started - scheduled)
        at = reply.get("at") if isinstance(reply, dict) else None
        if isinstance(at, float):
            out.forward.append(at - started)
            out.back.append(now - at)
        last[0] = max(last[0], now)

    t0 = time.monotonic() + 0.01
    with Pacer() as pacer:
        async with anyio.create_task_group() as tg:
            for i in range(count):
                scheduled = t0 + i * interval
                await pacer.sleep_until(scheduled)
                out.late = max(out.late, time.monotonic() - scheduled)
                tg.start_soon(one, i, scheduled)
    out.span = max(last[0], t0 + count * interval) - t0
    return out


async def xhost_client(
    args: argparse.Namespace, sock: str, usage: Usage, profile: Callable[[], None]
) -> dict[str, Any]:
    async with Mesh.connect(sock, client="bench-xhost") as mesh:
        await mesh.request(ECHO_AGENT, {"first": True}, timeout=10)
        low = None
        if args.low_rate > 0:
            low = await open_loop(mesh, args.low_rate, args.low_duration, args.request_timeout)
        await open_loop(mesh, args.rate, args.warmup, args.request_timeout)
        profile()
        usage.begin()
        run = await open_loop(mesh, args.rate, args.xhost_duration, args.request_timeout)
        used = usage.end(len(run.latencies))
    requested = max(1, round(args.rate * args.xhost_duration))
    dist = _dist(run.latencies, 1e3)
    result = {
        "xhost_request_p50_ms": dist["p50"],
        "xhost_request_p99_ms": dist["p99"],
        "xhost_request_ms": dist,
        "xhost_service_ms": _dist(run.service, 1e3),
        "xhost_send_lateness_ms": _dist(run.lateness, 1e3),
        "xhost_forward_ms": _dist(run.forward, 1e3),
        "xhost_back_ms": _dist(run.back, 1e3),
        "xhost_offered_per_s": args.rate,
        "xhost_achieved_per_s": round(len(run.latencies) / run.span, 1),
        "xhost_requests": requested,
        "xhost_ok": len(run.latencies),
        "xhost_errors": dict(run.errors),
        "xhost_sender_max_late_ms": _r(run.late * 1e3),
        "xhost_usage": used,
    }
    if low is not None:
        result["xhost_low_rate"] = {
            "rate_per_s": args.low_rate,
            "request_ms": _dist(low.latencies, 1e3),
            "service_ms": _dist(low.service, 1e3),
            "forward_ms": _dist(low.forward, 1e3),
            "back_ms": _dist(low.back, 1e3),
            "errors": dict(low.errors),
        }
    return result


def phase_xhost(
    args: argparse.Namespace,
    root: Path,
    profiler: Profiler,
    backend: str,
    *,
    tracing: str | None = None,
    run: str = "xhost",
) -> dict[str, Any]:
    """Phase 3 on a two-daemon cluster (exporting spans to ``tracing``, an OTLP endpoint,
    if given)."""
    extra = [f"--set=tracing.endpoint={tracing}"] if tracing else []
    with LocalCluster(root / run, profile=args.profile) as cluster, Children(root) as kids:
        a = cluster.add("a", extra=extra)
        b = cluster.add("b", seeds=[a.addr], extra=extra)
        anyio.run(_converge, cluster, backend="trio")
        agent = kids.role(
            "echo-agent",
            "echo-agent",
            f"--socket={b.socket_path}",
            f"--backend={backend}",
            f"--concurrency={args.agent_concurrency}",
        )
        anyio.run(read_line, agent, 30.0, "echo agent", backend="trio")
        anyio.run(wait_resolves, a, ECHO_AGENT, 30.0, backend="trio")

        pids = {"daemon_a": a.pid, "daemon_b": b.pid, "agent": agent.pid, "client": os.getpid()}

        def profile() -> None:
            profiler.record("xhost", pids, args.xhost_duration)

        result: dict[str, Any] = anyio.run(
            xhost_client, args, a.socket_path, Usage(pids), profile, backend=backend
        )
        profiler.wait()
        err.print(
            f"[dim]xhost at {args.rate}/s: {result['xhost_request_ms']} ms, achieved "
            f"{result['xhost_achieved_per_s']}/s, errors {result['xhost_errors']}; forward "
            f"p50 {result['xhost_forward_ms']['p50']} ms, back p50 {result['xhost_back_ms']['p50']}"
            f" ms; at {args.low_rate}/s: {result.get('xhost_low_rate', {}).get('request_ms')}"
            "[/dim]"
        )
        return result


async def _converge(cluster: LocalCluster) -> None:
    await cluster.wait_ready(timeout=60)
    await cluster.wait_converged(timeout=60)


def _xhost_summary(res: dict[str, Any]) -> dict[str, Any]:
    usage = res["xhost_usage"]
    return {
        "p50_ms": res["xhost_request_p50_ms"],
        "p99_ms": res["xhost_request_p99_ms"],
        "achieved_per_s": res["xhost_achieved_per_s"],
        "errors": res["xhost_errors"],
        "daemon_a_cpu_us_per_call": usage["daemon_a"]["cpu_us_per_call"],
        "daemon_b_cpu_us_per_call": usage["daemon_b"]["cpu_us_per_call"],
        "loadavg_1m": usage["loadavg_1m"],
    }


def phase_xhost_tracing(
    args: argparse.Namespace, root: Path, profiler: Profiler, backend: str, kids: Children
) -> dict[str, Any]:
    """Phase 3 with tracing on (``--tracing on``: the daemons export every span over OTLP to a
    receiver process), or alternating off/on rounds in this one session (``compare``)."""
    sink = kids.role("otlp-sink", "otlp-sink")
    port = int(anyio.run(read_line, sink, 30.0, "OTLP sink", backend="trio"))
    endpoint = f"http://127.0.0.1:{port}/v1/traces"
    if args.tracing == "on":
        result = phase_xhost(args, root, profiler, backend, tracing=endpoint)
        result["tracing"] = {"endpoint": "OTLP/HTTP receiver on loopback", **_sink(sink)}
        return result
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for k in range(args.tracing_rounds):
        # Alternating, and in the other order every other round, so drift in the machine's
        # load falls on both sides.
        order = ("off", "on") if k % 2 == 0 else ("on", "off")
        for mode in order:
            res = phase_xhost(
                args,
                root,
                profiler,
                backend,
                tracing=endpoint if mode == "on" else None,
                run=f"xhost-{mode}-{k}",
            )
            rounds[mode].append(_xhost_summary(res))
    medians = {
        mode: {
            key: statistics.median(r[key] for r in runs)
            for key in ("p50_ms", "p99_ms", "daemon_a_cpu_us_per_call", "daemon_b_cpu_us_per_call")
        }
        for mode, runs in rounds.items()
    }
    off, on = medians["off"], medians["on"]
    return {
        "tracing_compare": {
            "rounds": rounds,
            "median": medians,
            "cost": {
                "p50_ms": round(on["p50_ms"] - off["p50_ms"], 3),
                "p99_ms": round(on["p99_ms"] - off["p99_ms"], 3),
                "daemon_a_cpu_us_per_call": round(
                    on["daemon_a_cpu_us_per_call"] - off["daemon_a_cpu_us_per_call"], 1
                ),
                "daemon_b_cpu_us_per_call": round(
                    on["daemon_b_cpu_us_per_call"] - off["daemon_b_cpu_us_per_call"], 1
                ),
            },
            "exported": _sink(sink),
        }
    }


def _sink(sink: subprocess.Popen[bytes]) -> dict[str, Any]:
    """What the OTLP receiver got so far."""
    assert sink.stdin is not None
    sink.stdin.write(b"report\n")
    sink.stdin.flush()
    counts: dict[str, Any] = json.loads(anyio.run(read_line, sink, 10.0, "OTLP sink"))
    return counts


# ---------------------------------------------------------------------------- phase 4: fan-out


async def publisher(
    args: argparse.Namespace, sock: str, hosts: int, usage: Usage, profile: Callable[[], None]
) -> dict[str, Any]:
    """Publish warm-ups until every subscribing host is known, then the measured signals open
    loop, then the stop signal."""
    errors: Counter[str] = Counter()
    reached: list[int] = []
    async with Mesh.connect(sock, client="bench-publisher") as mesh:
        with anyio.fail_after(60):
            while await mesh.publish(TOPIC, {"warm": True}) < hosts:
                await anyio.sleep(0.1)
        for _ in range(args.signal_warmup):
            await mesh.publish(TOPIC, {"warm": True})
            await anyio.sleep(args.signal_interval)

        async def one(i: int, sent_at: float) -> None:
            try:
                reached.append(await mesh.publish(TOPIC, {"seq": i, "t": sent_at}))
            except MeshError as exc:
                errors[exc.kind.value] += 1

        profile()
        usage.begin()
        mono0 = time.monotonic() + 0.01
        with Pacer() as pacer:
            async with anyio.create_task_group() as tg:
                for i in range(args.signals):
                    await pacer.sleep_until(mono0 + i * args.signal_interval)
                    tg.start_soon(one, i, mono0 + i * args.signal_interval)
        await anyio.sleep(0.5)
        used = usage.end(len(reached) * args.subscribers)
        for _ in range(3):
            await mesh.publish(TOPIC, {"stop": True})
            await anyio.sleep(0.1)
    return {"errors": dict(errors), "hosts_min": min(reached, default=0), "usage": used}


async def collect(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> list[Any]:
    out: list[Any] = []
    for k, proc in enumerate(procs):
        out.append(json.loads(await read_line(proc, timeout, f"subscribers {k}")))
    return out


def phase_fanout(
    args: argparse.Namespace, root: Path, profiler: Profiler, backend: str
) -> dict[str, Any]:
    """Phase 4 on five daemons: four hold the subscribers, the fifth the publisher."""
    hosts = 4
    with LocalCluster(root / "fanout", profile=args.profile) as cluster, Children(root) as kids:
        subs_hosts = [cluster.add("s1")]
        subs_hosts += [cluster.add(f"s{i}", seeds=[subs_hosts[0].addr]) for i in range(2, 5)]
        pub_host = cluster.add("p", seeds=[subs_hosts[0].addr])
        anyio.run(_converge, cluster, backend="trio")
        counts = [args.subscribers // hosts + (k < args.subscribers % hosts) for k in range(hosts)]
        timeout = 120 + args.signals * args.signal_interval
        procs = [
            kids.role(
                f"subscribers-{d.name}",
                "subscribers",
                f"--socket={d.socket_path}",
                f"--backend={backend}",
                f"--count={n}",
                f"--timeout={timeout}",
            )
            for d, n in zip(subs_hosts, counts, strict=True)
        ]
        for k, proc in enumerate(procs):
            anyio.run(read_line, proc, 60.0, f"subscribers {k}", backend="trio")

        pids = {f"daemon_{d.name}": d.pid for d in [*subs_hosts, pub_host]}
        pids |= {f"subs_{d.name}": p.pid for d, p in zip(subs_hosts, procs, strict=True)}
        pids["client"] = os.getpid()

        def profile() -> None:
            profiler.record("fanout", pids, args.signals * args.signal_interval)

        pub = anyio.run(
            publisher, args, pub_host.socket_path, hosts, Usage(pids), profile, backend=backend
        )
        reports = anyio.run(collect, procs, 60.0, backend="trio")
        profiler.wait()
    latencies = [lat for rep in reports for _, _, lat in rep["receipts"]]
    last: dict[int, float] = {}
    for rep in reports:
        for seq, _, lat in rep["receipts"]:
            last[seq] = max(last.get(seq, 0.0), lat)
    expected = args.signals * sum(counts)
    dist = _dist(latencies, 1e3)
    result = {
        "signal_fanout_p50_ms": dist["p50"],
        "signal_fanout_p99_ms": dist["p99"],
        "signal_fanout_ms": dist,
        "signal_fanout_last_subscriber_ms": _dist(list(last.values()), 1e3),
        "signal_fanout_receipts": len(latencies),
        "signal_fanout_expected": expected,
        "signal_fanout_missing": expected - len(latencies),
        "signal_fanout_publish_errors": pub["errors"],
        "signal_fanout_hosts_min": pub["hosts_min"],
        "signal_fanout_usage": pub["usage"],
    }
    err.print(
        f"[dim]fan-out: {dist} ms over {len(latencies)}/{expected} receipts, "
        f"publish errors {pub['errors']}[/dim]"
    )
    return result


# ---------------------------------------------------------------------------- main


PHASES = ("local", "xhost", "fanout")


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"profile": args.profile}
    with Children(root) as kids:
        profiler = Profiler(args.py_spy, args.profile_dir, kids)
        phases = set(args.phases.split(","))
        backend = args.backend if args.backend != "auto" else "trio"
        if "local" in phases:
            result |= phase_local(args, root, profiler)
            backend = result["client_backend"]
        result["client_backend"] = backend
        if "xhost" in phases and args.tracing == "off":
            result |= phase_xhost(args, root, profiler, backend)
        elif "xhost" in phases:
            result |= phase_xhost_tracing(args, root, profiler, backend, kids)
        if "fanout" in phases:
            result |= phase_fanout(args, root, profiler, backend)
        if profiler.enabled:
            result["profiles"] = {
                str(p.name): summarize_profile(p, args.profile_top) for p in profiler.files
            }
    result["targets"] = {  # only for what this run measured (see --phases)
        key: {"target": f"{op} {limit}", "met": _met(result[key], op, limit)}
        for key, (op, limit) in TARGETS.items()
        if key in result
    }
    result["method"] = {
        "meshd_version": meshd_version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cluster_profile": args.profile,
        "client_backend": backend,
        "lookup": f"{args.lookups} sequential lookup calls on one Connection after "
        f"{args.lookup_warmup} warm-up calls per round, {args.lookup_rounds} rounds "
        "alternating client backends",
        "throughput": f"{args.inflight} lookup calls in flight in total on 1 and on "
        f"{args.conns} connections, {args.duration} s after {args.tp_warmup} s warm-up, median "
        f"of {args.rounds} alternating daemon/echo rounds",
        "echo": f"bare trio Unix-socket server in a subprocess, same framing and codec, replies "
        f"with the daemon's lookup reply value; writes {args.echo_writes}",
        "xhost": f"open loop {args.rate}/s for {args.xhost_duration} s after {args.warmup} s "
        f"(and {args.low_rate}/s for {args.low_duration} s before, as an unloaded reference), "
        "Mesh.request from a client of daemon a to an echo agent (Mesh.serve, concurrency "
        f"{args.agent_concurrency}) served by a client process of daemon b; latency from the "
        "scheduled send time",
        "tracing": f"--tracing {args.tracing}"
        + (f", {args.tracing_rounds} alternating rounds each" if args.tracing == "compare" else ""),
        "fanout": f"{args.subscribers} Mesh.subscribe subscribers over 4 daemons (one client "
        f"process each), {args.signals} signals published open loop every "
        f"{args.signal_interval} s from a client of a fifth daemon; latency from the "
        "scheduled send time (time.monotonic) to each receipt",
    }
    return result


def _met(value: Any, op: str, limit: float) -> bool:
    if not isinstance(value, int | float):
        return False
    return value >= limit if op == ">=" else value < limit


def print_summary(result: dict[str, Any]) -> None:
    console = Console()
    table = Table(
        title=f"local API and messaging ({result['profile']} profile, "
        f"{result['client_backend']} client)",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = (
        ("lookup p50 (us)", "local_lookup_p50_us"),
        ("lookup p99 (us)", "local_lookup_p99_us"),
        ("local requests/s (1 connection)", "local_request_per_s"),
        ("echo baseline/s (1 connection)", "echo_baseline_per_s"),
        ("ratio vs echo", "ratio_vs_echo"),
        ("server CPU per request, echo / daemon", "server_cpu_ratio_vs_echo"),
        ("cross-host request p50 (ms)", "xhost_request_p50_ms"),
        ("cross-host request p99 (ms)", "xhost_request_p99_ms"),
        ("cross-host achieved/s", "xhost_achieved_per_s"),
        ("cross-host errors", "xhost_errors"),
        ("tracing cost (on - off, medians)", "tracing_cost"),
        ("signal fan-out p50 (ms)", "signal_fanout_p50_ms"),
        ("signal fan-out p99 (ms)", "signal_fanout_p99_ms"),
        ("signal receipts missing", "signal_fanout_missing"),
    )
    if "tracing_compare" in result:
        result = {**result, "tracing_cost": result["tracing_compare"]["cost"]}
    for label, key in rows:
        if key not in result:
            continue
        target = result["targets"].get(key)
        shown = "" if target is None else f"{target['target']} " + ("✓" if target["met"] else "✗")
        table.add_row(label, str(result.get(key)), shown)
    console.print(table)
    for name, prof in result.get("profiles", {}).items():
        console.print(f"[bold]{name}[/bold] ({prof.get('samples', 0)} samples) self:")
        for func, share in prof.get("self", [])[:10]:
            console.print(f"  {share:5.1f}%  {func}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.api",
        description="meshd local API latency/throughput, cross-host requests, signal fan-out",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", default="lan", help="meshd profile (lan)")
    p.add_argument("--backend", default="auto", choices=("auto", "trio", "asyncio"))
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    p.add_argument("--lookups", type=int, default=20_000, help="measured lookup calls")
    p.add_argument("--lookup-warmup", type=int, default=2_000)
    p.add_argument("--lookup-rounds", type=int, default=2)
    p.add_argument("--inflight", type=int, default=64, help="requests in flight in total")
    p.add_argument("--conns", type=int, default=4, help="connections for the second config")
    p.add_argument("--duration", type=float, default=3.0, help="throughput window (s)")
    p.add_argument("--tp-warmup", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3, help="alternating daemon/echo rounds")
    p.add_argument("--echo-writes", default="per-read", choices=("per-read", "per-frame"))
    p.add_argument("--rate", type=float, default=500.0, help="cross-host offered load (req/s)")
    p.add_argument("--xhost-duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0, help="cross-host warm-up (s)")
    p.add_argument("--request-timeout", type=float, default=5.0)
    p.add_argument("--low-rate", type=float, default=50.0, help="unloaded reference rate (0: off)")
    p.add_argument("--low-duration", type=float, default=4.0)
    p.add_argument("--agent-concurrency", type=int, default=1)
    p.add_argument(
        "--tracing",
        default="off",
        choices=("off", "on", "compare"),
        help="cross-host phase with the daemons' tracing off, on (spans exported over OTLP "
        "to a receiver process), or compare: alternating off/on rounds (off)",
    )
    p.add_argument("--tracing-rounds", type=int, default=3, help="rounds of each, compare")
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--signals", type=int, default=200)
    p.add_argument("--signal-interval", type=float, default=0.05)
    p.add_argument("--signal-warmup", type=int, default=20)
    p.add_argument("--py-spy", default=None, help="path to py-spy: sample the windows")
    p.add_argument("--profile-dir", type=Path, default=None)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    # Helper processes (this module runs itself in these roles).
    p.add_argument("--role", choices=("echo-server", "echo-agent", "subscribers", "otlp-sink"))
    p.add_argument("--socket")
    p.add_argument("--reply", default="a0")
    p.add_argument("--count", type=int, default=25)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0)
    return p


def _run_role(args: argparse.Namespace) -> int:
    backend = args.backend if args.backend != "auto" else "trio"
    with contextlib.suppress(KeyboardInterrupt):
        if args.role == "echo-server":
            role_echo_server(args)
        elif args.role == "otlp-sink":
            role_otlp_sink(args)
        elif args.role == "echo-agent":
            anyio.run(role_echo_agent, args, backend=backend)
        else:
            anyio.run(role_subscribers, args, backend=backend)
    return 0


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.role is not None:
        return _run_role(args)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        raise SystemExit(f"--phases: unknown {', '.join(sorted(unknown))}; choose from {PHASES}")
    if args.profile_dir is not None and args.py_spy is None:
        raise SystemExit("--profile-dir needs --py-spy PATH")
    if args.py_spy is not None and args.profile_dir is None:
        args.profile_dir = Path(tempfile.mkdtemp(prefix="meshd-bench-api-prof-"))
    signal.signal(signal.SIGTERM, _on_sigterm)  # (several event loops run in turn here)
    return harness.run(
        "meshd-bench-api-",
        lambda root: bench(args, root),
        keep=args.keep,
        as_json=args.json,
        table=print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
