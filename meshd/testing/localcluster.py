"""A cluster of real meshd processes on loopback, for tests, the demo and benchmarks.

Every daemon is a separate ``python -m meshd run`` process with its own port, API socket and
log file under one root directory. Only processes started here are ever signalled, by pid.
Talking to a daemon goes through the real client library and the real Unix socket.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from meshd_client.connection import Connection
from meshd_client.protocol.errors import MeshError


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP right now (the daemon binds both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError("no free port found")


@dataclass
class Daemon:
    name: str
    port: int
    socket_path: str
    log_path: Path
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                stdin=subprocess.DEVNULL,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        async with Connection.open(
            self.socket_path, client="localcluster", timeout=timeout
        ) as conn:
            return await conn.call(op, args, timeout=timeout)

    async def statuses(self, timeout: float = 5.0) -> dict[str, str]:
        members = await self.call("members", timeout=timeout)
        return {m["name"]: m["status"] for m in members}


@dataclass
class LocalCluster:
    root: Path
    profile: str = "local"
    key: str | None = None
    insecure: bool = False
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.key is None and not self.insecure:
            self.key = base64.b64encode(os.urandom(32)).decode()

    def add(
        self,
        name: str,
        *,
        seeds: Iterable[str] = (),
        tags: Mapping[str, str] | None = None,
        extra: Sequence[str] = (),
        start: bool = True,
        port: int | None = None,
    ) -> Daemon:
        port = port or free_port()
        sock = str(self.root / f"{name}.sock")
        argv = [
            sys.executable,
            "-m",
            "meshd",
            "run",
            "--name",
            name,
            "--bind",
            f"127.0.0.1:{port}",
            "--socket",
            sock,
            "--data-dir",
            str(self.root / f"{name}.data"),
            "--profile",
            self.profile,
            "--log-format",
            "logfmt",
            *(f"--seed={s}" for s in seeds),
            *(f"--tag={k}={v}" for k, v in (tags or {}).items()),
            *self.extra_args,
            *extra,
        ]
        argv += ["--insecure"] if self.insecure else [f"--key={self.key}"]
        env = dict(os.environ if self.env is None else self.env)
        env.pop("NOTIFY_SOCKET", None)
        env.setdefault("PYTHONUNBUFFERED", "1")
        daemon = Daemon(name, port, sock, self.root / f"{name}.log", argv, env)
        self.daemons[name] = daemon
        if start:
            daemon.spawn()
        return daemon

    def start_many(self, count: int, prefix: str = "n") -> list[Daemon]:
        """``count`` daemons; the first is everyone's seed."""
        first = self.add(f"{prefix}1")
        return [first] + [self.add(f"{prefix}{i}", seeds=[first.addr]) for i in range(2, count + 1)]

    def __getitem__(self, name: str) -> Daemon:
        return self.daemons[name]

    def running(self) -> list[Daemon]:
        return [d for d in self.daemons.values() if d.running()]

    async def wait_ready(
        self, daemons: Iterable[Daemon] | None = None, timeout: float = 20.0
    ) -> None:
        """Until every daemon answers on its socket and reports it has joined."""
        pending = list(daemons if daemons is not None else self.daemons.values())
        with anyio.fail_after(timeout):
            while pending:
                daemon = pending[0]
                if daemon.proc is not None and daemon.proc.poll() is not None:
                    raise RuntimeError(
                        f"{daemon.name} exited with {daemon.proc.returncode}:\n"
                        f"{daemon.log_text()[-2000:]}"
                    )
                try:
                    info = await daemon.call("info", timeout=2.0)
                    if info.get("joined"):
                        pending.pop(0)
                        continue
                except MeshError:
                    pass
                await anyio.sleep(0.05)

    async def wait_answering(self, daemon: Daemon, timeout: float = 20.0) -> dict[str, Any]:
        """Until ``daemon`` answers on its socket (joined or not); returns its info."""
        with anyio.fail_after(timeout):
            while True:
                if daemon.proc is not None and daemon.proc.poll() is not None:
                    raise RuntimeError(f"{daemon.name} exited with {daemon.proc.returncode}")
                try:
                    info: dict[str, Any] = await daemon.call("info", timeout=2.0)
                    return info
                except MeshError:
                    await anyio.sleep(0.05)

    async def wait_converged(
        self, names: Iterable[str] | None = None, timeout: float = 30.0
    ) -> None:
        """Until every running daemon in ``names`` sees exactly ``names`` as alive."""
        expected = set(names) if names is not None else {d.name for d in self.running()}
        with anyio.fail_after(timeout):
            while not await self.converged(expected):
                await anyio.sleep(0.1)

    async def converged(self, expected: set[str]) -> bool:
        for name in expected:
            try:
                statuses = await self.daemons[name].statuses(timeout=2.0)
            except MeshError:
                return False
            if {n for n, s in statuses.items() if s == "alive"} != expected:
                return False
        return True

    async def wait_status(
        self,
        observers: Iterable[str],
        member: str,
        status: str,
        timeout: float = 60.0,
        poll: float = 0.05,
    ) -> dict[str, float]:
        """Until every observer sees ``member`` with ``status``. Returns the monotonic time at
        which each observer was first seen doing so."""
        waiting = set(observers)
        seen: dict[str, float] = {}
        with anyio.fail_after(timeout):
            while waiting:
                for name in list(waiting):
                    try:
                        statuses = await self.daemons[name].statuses(timeout=2.0)
                    except MeshError:
                        continue
                    if statuses.get(member) == status:
                        seen[name] = time.monotonic()
                        waiting.discard(name)
                if waiting:
                    await anyio.sleep(poll)
        return seen

    def stop_all(self, grace: float = 5.0) -> dict[str, int | None]:
        """SIGTERM every daemon still running, SIGKILL those that do not exit in time."""
        codes: dict[str, int | None] = {}
        for daemon in self.daemons.values():
            daemon.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for daemon in self.daemons.values():
            code = daemon.wait(max(0.0, deadline - time.monotonic()))
            if code is None and daemon.running():
                daemon.kill()
                code = daemon.wait(5.0)
            codes[daemon.name] = code
        return codes

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop_all()
