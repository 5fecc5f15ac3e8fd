"""Hostile input against real daemons: memory, descriptors and event-loop stalls under attack.

    python -m bench.hostile [--json] [--only preauth,connects,streams,partial,sessions]

Every daemon is a real ``python -m meshd run`` process started by
:class:`~meshd.testing.localcluster.LocalCluster` (two daemons, ``lan`` profile, encrypted
links; the second is a peer that watches the first). Each attack runs on a fresh cluster, so
one's leftovers do not count against the next:

1. **preauth** (issue 11, item 1): ``--conns`` TCP connections to the gossip port, each
   announcing a frame of ``--frame-mib`` MiB and sending all of it but one byte, without any
   key; held ``--hold`` s, then closed.
2. **connects**: ``--connects`` connections opened as fast as the daemon accepts them and
   held ``--hold`` s without sending anything, then closed: the descriptors the daemon holds.
3. **streams** (item 3): one API session opens ``--streams`` ``subscribe`` streams with
   distinct patterns (pipelined), then cancels them all; for each count, the time until every
   stream was answered and until every one ended, each bounded by ``--phase-timeout``. The
   peer's view of the target (suspected or not) is polled throughout.
4. **partial** (item 7): ``--sessions`` API sessions say hello, then announce a frame of
   ``--partial-kib`` KiB and send all of it but one byte; held ``--partial-hold`` s, then
   closed. Sessions the daemon closed meanwhile are counted, with the error it gave.
5. **sessions**: ``--flood`` API sessions opened and held: how many the daemon refused.

For each attack: the target's RSS before, its peak (``VmHWM``), its RSS ``--after`` s after
the attack ended, its peak descriptor count; and the longest event-loop stall, seen from a
probe process that calls ``info`` on its own API session every 10 ms and records each round
trip (the longest round trip during the attack is the stall; idle it is well under 1 ms).
Figures are printed as JSON (``--json``) or a table. Nothing here asserts a timing.

Every process is started here and ended by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import trio

from bench import harness
from meshd.testing.localcluster import Daemon, LocalCluster
from meshd_client.connection import Connection
from meshd_client.protocol import messages
from meshd_client.protocol.errors import MeshError
from meshd_client.protocol.framing import HEADER, FrameDecoder, FrameError, encode_frame

Result = dict[str, Any]


# ---------------------------------------------------------------------------- process figures


def _status_kib(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(pid: int) -> float:
    return round(_status_kib(pid, "VmRSS") / 1024, 1)


def peak_rss_mib(pid: int) -> float:
    return round(_status_kib(pid, "VmHWM") / 1024, 1)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class FdSampler:
    """The most descriptors ``pid`` held at once, sampled every 50 ms in a thread (a busy
    event loop in this process must not hide the peak)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, fd_count(self.pid))

    def __enter__(self) -> FdSampler:
        self.peak = fd_count(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------- the stall probe


async def probe_main(path: str) -> None:
    """The probe process: ``info`` every 10 ms; one line per call: start, round trip."""
    async with Connection.open(path, client="bench-hostile-probe", timeout=30) as conn:
        while True:
            started = time.monotonic()
            try:
                await conn.call("info", timeout=600)
            except MeshError as exc:
                print(f"# {exc.kind.value}", flush=True)
                if conn.closed:
                    return
            print(f"{started:.6f} {time.monotonic() - started:.6f}", flush=True)
            await trio.sleep(0.01)


@dataclass
class Probe:
    """A probe process on ``daemon``'s API; :meth:`stall` is the longest round trip of the
    calls that overlapped a window."""

    daemon: Daemon
    out: Path
    proc: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, float]] = field(default_factory=list)

    def start(self) -> None:
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.hostile", "--probe", self.daemon.socket_path],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parents[1],
            )

    async def wait_first(self, timeout: float = 30.0) -> None:
        with anyio.fail_after(timeout):
            while not self._read():
                await anyio.sleep(0.05)

    def _read(self) -> list[tuple[float, float]]:
        samples = []
        with contextlib.suppress(OSError):
            for line in self.out.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and not line.startswith("#"):
                    samples.append((float(parts[0]), float(parts[1])))
        self.samples = samples
        return samples

    def stall_ms(self, start: float, end: float) -> float | None:
        """The longest round trip of a call that overlapped [start, end] (a call still
        unanswered at ``end`` counts until now)."""
        samples = self._read()
        worst = [rtt for t, rtt in samples if t <= end and t + rtt >= start]
        last = samples[-1][0] + samples[-1][1] if samples else start
        still = time.monotonic() - last if last < end else 0.0
        if not worst and not still:
            return None
        return round(1000 * max([*worst, still]), 1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---------------------------------------------------------------------------- one attack's frame


@dataclass
class Target:
    cluster: LocalCluster
    daemon: Daemon
    peer: Daemon
    probe: Probe

    async def transport(self) -> dict[str, Any]:
        """The target's rejection counters and transport figures (those its version has)."""
        try:
            info = await self.daemon.call("info", timeout=30)
        except MeshError:
            return {}
        stats: dict[str, Any] = info.get("stats", {})
        return {
            "rejected": stats.get("rejected", {}),
            "transport": info.get("transport", {}),
            "api": info.get("api", {}),
        }


async def open_target(root: Path, name: str, args: argparse.Namespace) -> Target:
    cluster = LocalCluster(
        root / name, profile=args.profile, extra_args=[f"--set={kv}" for kv in args.set]
    )
    first, peer = cluster.start_many(2)
    await cluster.wait_ready(timeout=60)
    await cluster.wait_converged(timeout=60)
    probe = Probe(first, root / f"{name}-probe.txt")
    probe.start()
    await probe.wait_first()
    return Target(cluster, first, peer, probe)


def close_target(target: Target) -> None:
    target.probe.stop()
    target.cluster.stop_all()


async def settle_rss(target: Target, after: float) -> float:
    """The target's RSS ``after`` seconds from now."""
    await anyio.sleep(after)
    return rss_mib(target.daemon.pid)


# ---------------------------------------------------------------------------- 1. pre-auth frames


async def attack_preauth(root: Path, args: argparse.Namespace) -> Result:
    target = await open_target(root, "preauth", args)
    try:
        pid = target.daemon.pid
        frame = args.frame_mib << 20
        chunk = b"\xa5" * (256 << 10)
        sent = [0] * args.conns
        cut = finished = 0
        rss_before = rss_mib(pid)
        hold = trio.Event()
        start = time.monotonic()

        async def one(i: int) -> None:
            nonlocal cut, finished
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", target.daemon.port)
            except OSError:
                cut += 1
                finished += 1
                return
            try:
                await stream.send_all(HEADER.pack(frame))
                left = frame - 1
                while left > 0:
                    piece = chunk[: min(len(chunk), left)]
                    await stream.send_all(piece)
                    left -= len(piece)
                    sent[i] += len(piece)
                finished += 1
                await hold.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                cut += 1
                finished += 1
            finally:
                with contextlib.suppress(Exception):
                    await trio.aclose_forcefully(stream)

        with FdSampler(pid) as fds:
            async with trio.open_nursery() as nursery:
                for i in range(args.conns):
                    nursery.start_soon(one, i)
                with trio.move_on_after(args.send_timeout):
                    while finished < args.conns:
                        await trio.sleep(0.1)
                sending = time.monotonic() - start
                await trio.sleep(args.hold)
                peak = peak_rss_mib(pid)
                end = time.monotonic()
                hold.set()
        counters = await target.transport()
        after = await settle_rss(target, args.after)
        return {
            "connections": args.conns,
            "frame_mib": args.frame_mib,
            "bytes_sent_mib": round(sum(sent) / (1 << 20), 1),
            "connections_cut_by_daemon": cut,
            "rss_before_mib": rss_before,
            "rss_peak_mib": peak,
            "rss_after_mib": after,
            "after_s": args.after,
            "fds_peak": fds.peak,
            "stall_ms": target.probe.stall_ms(start, end),
            "sending_s": round(sending, 2),
            "attack_s": round(end - start, 2),
            **counters,
        }
    finally:
        close_target(target)


# ---------------------------------------------------------------------------- 2. quick connects


async def attack_connects(root: Path, args: argparse.Namespace) -> Result:
    target = await open_target(root, "connects", args)
    try:
        pid = target.daemon.pid
        held: list[socket.socket] = []
        failed = 0
        fds_before = fd_count(pid)
        start = time.monotonic()
        with FdSampler(pid) as fds:
            for _ in range(args.connects):
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    with trio.fail_after(2):
                        await sock.connect(("127.0.0.1", target.daemon.port))
                except (OSError, trio.TooSlowError):
                    failed += 1
                    sock.close()
                    continue
                held.append(socket.socket(fileno=sock.detach()))
            opened = time.monotonic()
            await trio.sleep(args.hold)
            fds_held = fd_count(pid)
            # How many of ours the daemon closed meanwhile (EOF or reset on our side).
            closed_by_daemon = 0
            for conn in held:
                try:
                    data = conn.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
                    closed_by_daemon += data == b""
                except BlockingIOError:
                    pass
                except OSError:
                    closed_by_daemon += 1
            for conn in held:
                conn.close()
            end = time.monotonic()
            await trio.sleep(2)
            fds_2s = fd_count(pid)
        counters = await target.transport()
        await anyio.sleep(max(0.0, args.after - 2))
        return {
            "connects": args.connects,
            "connect_failures": failed,
            "connect_s": round(opened - start, 2),
            "closed_by_daemon_while_held": closed_by_daemon,
            "fds_before": fds_before,
            "fds_peak": fds.peak,
            "fds_held_after_hold": fds_held,
            "fds_2s_after_close": fds_2s,
            "fds_after": fd_count(pid),
            "hold_s": args.hold,
            "stall_ms": target.probe.stall_ms(start, end),
            **counters,
        }
    finally:
        close_target(target)


# ---------------------------------------------------------------------------- API sessions


async def api_session(path: str) -> tuple[trio.SocketStream, FrameDecoder]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    await stream.send_all(encode_frame(messages.hello("bench-hostile")))
    return stream, FrameDecoder(1 << 20)


async def next_frame(stream: trio.SocketStream, decoder: FrameDecoder) -> dict[str, Any] | None:
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        data = await stream.receive_some(1 << 16)
        if not data:
            return None
        decoder.feed(data)


async def hello_session(path: str) -> tuple[trio.SocketStream, FrameDecoder] | str:
    """A session past its hello, or why not: ``connect_failed``, ``closed``, or the kind of
    the error the daemon answered with (``overloaded``: too many sessions)."""
    try:
        stream, decoder = await api_session(path)
    except (OSError, trio.BrokenResourceError):
        return "connect_failed"
    try:
        with trio.fail_after(30):
            frame = await next_frame(stream, decoder)
    except (trio.TooSlowError, trio.BrokenResourceError, OSError, FrameError):
        frame = None
    if frame is not None and frame.get("t") == "hello":
        return stream, decoder
    await trio.aclose_forcefully(stream)
    return "closed" if frame is None else str((frame.get("error") or {}).get("kind"))


# ---------------------------------------------------------------------------- 3. many streams


async def streams_round(target: Target, count: int, args: argparse.Namespace) -> Result:
    stream, decoder = await api_session(target.daemon.socket_path)
    out: Result = {"streams": count}
    try:
        hello = await next_frame(stream, decoder)
        assert hello is not None and hello.get("t") == "hello", hello
        answered = {"ok": 0, "refused": 0, "ended": 0}
        kinds: dict[str, int] = {}
        all_answered = trio.Event()
        all_ended = trio.Event()

        async def reader() -> None:
            while True:
                try:
                    frame = await next_frame(stream, decoder)
                except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError, OSError):
                    frame = None
                if frame is None:
                    out["session_closed_by_daemon"] = True
                    all_answered.set()
                    all_ended.set()
                    return
                if frame.get("t") == "res":
                    if frame.get("ok"):
                        answered["ok"] += 1
                    else:
                        answered["refused"] += 1
                        kind = (frame.get("error") or {}).get("kind", "?")
                        kinds[kind] = kinds.get(kind, 0) + 1
                    if answered["ok"] + answered["refused"] >= count:
                        all_answered.set()
                elif frame.get("t") == "end":
                    answered["ended"] += 1
                    if answered["ended"] >= answered["ok"] and all_answered.is_set():
                        all_ended.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            start = time.monotonic()
            batch = bytearray()
            for i in range(1, count + 1):
                req = messages.request(i, "subscribe", {"pattern": f"bench.p{i}.*"})
                batch += encode_frame(req)
                if len(batch) > 64 << 10 or i == count:
                    await stream.send_all(bytes(batch))
                    batch.clear()
            with trio.move_on_after(args.phase_timeout) as opening:
                await all_answered.wait()
            opened = time.monotonic()
            out["open_s"] = None if opening.cancelled_caught else round(opened - start, 3)
            out["opened"] = answered["ok"]
            out["refused"] = answered["refused"]
            out["refused_kinds"] = kinds
            out["open_stall_ms"] = target.probe.stall_ms(start, opened)
            if not opening.cancelled_caught:
                batch = bytearray()
                for i in range(1, count + 1):
                    batch += encode_frame(messages.cancel(i))
                    if len(batch) > 64 << 10 or i == count:
                        await stream.send_all(bytes(batch))
                        batch.clear()
                if answered["ended"] >= answered["ok"]:
                    all_ended.set()
                with trio.move_on_after(args.phase_timeout) as closing:
                    await all_ended.wait()
                closed = time.monotonic()
                out["close_s"] = None if closing.cancelled_caught else round(closed - opened, 3)
                out["close_stall_ms"] = target.probe.stall_ms(opened, closed)
            nursery.cancel_scope.cancel()
    finally:
        closed_at = time.monotonic()
        await trio.aclose_forcefully(stream)
    # Closing with streams still open (a timed-out phase) costs the daemon too: wait for it.
    with trio.move_on_after(args.phase_timeout) as gone:
        await target.daemon.call("info", timeout=args.phase_timeout)
    if out.get("close_s") is None:
        out["session_close_s"] = (
            None if gone.cancelled_caught else round(time.monotonic() - closed_at, 3)
        )
    return out


async def attack_streams(root: Path, args: argparse.Namespace) -> Result:
    target = await open_target(root, "streams", args)
    try:
        pid = target.daemon.pid
        seen: set[str] = set()
        watching = True

        async def watch_peer() -> None:
            while watching:
                with contextlib.suppress(MeshError):
                    statuses = await target.peer.statuses(timeout=5)
                    seen.add(statuses.get(target.daemon.name, "missing"))
                await anyio.sleep(0.2)

        before = await target.peer.call("info")
        rss_before = rss_mib(pid)
        rounds = []
        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_peer)
            for count in args.streams:
                rounds.append(await streams_round(target, count, args))  # noqa: PERF401
            watching = False
        end = time.monotonic()
        after_info = await target.peer.call("info", timeout=30)
        peak = peak_rss_mib(pid)
        return {
            "rounds": rounds,
            "rss_before_mib": rss_before,
            "rss_peak_mib": peak,
            "rss_after_mib": await settle_rss(target, args.after),
            "after_s": args.after,
            "stall_ms": target.probe.stall_ms(start, end),
            "peer_saw_target_as": sorted(seen),
            "peer_suspicions": after_info["stats"]["suspicions"] - before["stats"]["suspicions"],
        }
    finally:
        close_target(target)


# ---------------------------------------------------------------------------- 4. partial frames


async def attack_partial(root: Path, args: argparse.Namespace) -> Result:
    target = await open_target(root, "partial", args)
    try:
        pid = target.daemon.pid
        size = args.partial_kib << 10
        body = b"\xa5" * (size - 1)
        closed_kinds: dict[str, int] = {}
        opened = 0
        hold = trio.Event()
        listen: list[trio.CancelScope] = []
        rss_before = rss_mib(pid)
        start = time.monotonic()

        async def hold_partial(stream: trio.SocketStream, decoder: FrameDecoder) -> None:
            try:
                await stream.send_all(HEADER.pack(size) + body)
                # What the daemon says (if anything) before the hold ends.
                with trio.CancelScope() as listening:
                    listen.append(listening)
                    frame = await next_frame(stream, decoder)
                    kind = "eof" if frame is None else str((frame.get("error") or {}).get("kind"))
                    closed_kinds[kind] = closed_kinds.get(kind, 0) + 1
                await hold.wait()
            except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError, OSError):
                closed_kinds["broken"] = closed_kinds.get("broken", 0) + 1
            finally:
                await trio.aclose_forcefully(stream)

        with FdSampler(pid) as fds:
            async with trio.open_nursery() as nursery:
                # One after the other, as fast as the daemon answers each hello.
                for _ in range(args.sessions):
                    session = await hello_session(target.daemon.socket_path)
                    if isinstance(session, str):
                        closed_kinds[session] = closed_kinds.get(session, 0) + 1
                        continue
                    opened += 1
                    nursery.start_soon(hold_partial, *session)
                await trio.sleep(args.partial_hold)
                peak = peak_rss_mib(pid)
                end = time.monotonic()
                for listening in listen:
                    listening.cancel()
                hold.set()
        counters = await target.transport()
        return {
            "sessions": args.sessions,
            "partial_kib": args.partial_kib,
            "hold_s": args.partial_hold,
            "sessions_opened": opened,
            "closed_by_daemon": closed_kinds,
            "rss_before_mib": rss_before,
            "rss_peak_mib": peak,
            "rss_after_mib": await settle_rss(target, args.after),
            "after_s": args.after,
            "fds_peak": fds.peak,
            "stall_ms": target.probe.stall_ms(start, end),
            **counters,
        }
    finally:
        close_target(target)


# ---------------------------------------------------------------------------- 5. session flood


async def attack_sessions(root: Path, args: argparse.Namespace) -> Result:
    target = await open_target(root, "sessions", args)
    try:
        pid = target.daemon.pid
        outcome: dict[str, int] = {}
        streams: list[trio.SocketStream] = []
        start = time.monotonic()
        with FdSampler(pid) as fds:
            for _ in range(args.flood):
                session = await hello_session(target.daemon.socket_path)
                if isinstance(session, str):
                    kind = session
                else:
                    streams.append(session[0])
                    kind = "served"
                outcome[kind] = outcome.get(kind, 0) + 1
            end = time.monotonic()
            for stream in streams:
                await trio.aclose_forcefully(stream)
        return {
            "sessions": args.flood,
            "outcome": outcome,
            "fds_peak": fds.peak,
            "rss_peak_mib": peak_rss_mib(pid),
            "stall_ms": target.probe.stall_ms(start, end),
        }
    finally:
        close_target(target)


# ---------------------------------------------------------------------------- driver

ATTACKS = {
    "preauth": attack_preauth,
    "connects": attack_connects,
    "streams": attack_streams,
    "partial": attack_partial,
    "sessions": attack_sessions,
}


async def bench(args: argparse.Namespace, root: Path) -> Result:
    result: Result = {
        "bench": "hostile",
        "profile": args.profile,
        "daemon_settings": args.set,
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }
    for name in args.only:
        harness.err.print(f"attack: {name}")
        result[name] = await ATTACKS[name](root, args)
        harness.err.print(result[name])
    result["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return result


def print_summary(result: Result) -> None:
    for name in ATTACKS:
        if name in result:
            print(f"{name}:")
            for key, value in result[name].items():
                print(f"  {key}: {value}")


def _counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.hostile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    p.add_argument("--profile", default="lan")
    p.add_argument(
        "--only",
        type=lambda s: [a for a in s.split(",") if a],
        default=list(ATTACKS),
        help=f"attacks to run, comma-separated ({','.join(ATTACKS)})",
    )
    p.add_argument("--conns", type=int, default=200, help="preauth: connections")
    p.add_argument("--frame-mib", type=int, default=8, help="preauth: announced frame (MiB)")
    p.add_argument("--send-timeout", type=float, default=60.0, help="preauth: sending bound")
    p.add_argument("--hold", type=float, default=5.0, help="preauth/connects: hold (s)")
    p.add_argument("--connects", type=int, default=9000, help="connects: connections")
    p.add_argument("--streams", type=_counts, default=[1000, 5000, 20000], help="streams: counts")
    p.add_argument("--phase-timeout", type=float, default=300.0, help="streams: phase bound")
    p.add_argument("--sessions", type=int, default=300, help="partial: sessions")
    p.add_argument("--partial-kib", type=int, default=1024, help="partial: announced frame")
    p.add_argument("--partial-hold", type=float, default=10.0, help="partial: hold (s)")
    p.add_argument("--flood", type=int, default=1500, help="sessions: sessions opened")
    p.add_argument("--after", type=float, default=30.0, help="RSS read this long after")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a daemon setting for every daemon (repeatable), e.g. api.max_streams=20000",
    )
    p.add_argument("--probe", metavar="SOCKET", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.probe:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(probe_main, args.probe)
        return 0
    unknown = set(args.only) - set(ATTACKS)
    if unknown:
        raise SystemExit(f"unknown attack(s): {', '.join(sorted(unknown))}")
    return harness.run(
        "meshd-bench-hostile-",
        lambda root: anyio.run(harness.until_sigterm, lambda: bench(args, root), backend="trio"),
        keep=args.keep,
        as_json=args.json,
        table=print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
