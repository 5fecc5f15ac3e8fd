"""Where the hosts of a chaos cluster live: network namespaces here, Docker containers there.

A backend owns three things and nothing else: the hosts (and their addresses), the fault
rules inside each host, and the one meshd daemon per host (start, signal, stop, by pid or by
container). Everything above it — the workload, the fault schedule, the checker — talks to
a :class:`Backend` and never knows which one it has. Both backends load the same nftables
text (:mod:`chaos.faults`) into the host; only the transport of that text differs.

The API socket of every daemon is a file under the run directory (bind-mounted into
containers), so the harness in the root namespace reaches each daemon with the ordinary
client library and never needs to enter a namespace. The controller address (the bridge's
own address, or the Docker network's gateway) is exempt from every fault, so the harness's
metric scrapes and junk packets always arrive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from chaos import disks
from chaos.faults import Faults
from chaos.netns import ChaosError, HostNet

MESHD_PORT = 7946
METRICS_PORT = 9464


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    """How every daemon of the cluster is configured (the same on every host)."""

    profile: str = "local"
    key: str = ""  # base64 gossip key, generated per cluster
    port: int = MESHD_PORT
    metrics_port: int = METRICS_PORT
    log_level: str = "info"
    extra: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra"] = list(self.extra)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DaemonSpec:
        return cls(**{**data, "extra": tuple(data.get("extra", ()))})


@dataclass(slots=True)
class Exit:
    """A daemon process that ended, and whether we ended it (and how)."""

    host: str
    pid: int
    code: int | None  # None: not our child, so its status is unknowable (init reaped it)
    cause: str  # "kill" (SIGKILL by us), "stop" (SIGTERM by us), "crash" (nobody asked)
    at: float = field(default_factory=time.time)


class Backend(Protocol):
    """The operations the chaos harness needs from a place to run isolated hosts."""

    kind: str
    run_dir: Path
    spec: DaemonSpec
    exits: list[Exit]

    @property
    def hosts(self) -> list[str]: ...
    @property
    def faults(self) -> Faults: ...
    @property
    def controller(self) -> str | None: ...

    def addr(self, host: str) -> str: ...
    def socket_path(self, host: str) -> str: ...
    def log_text(self, host: str) -> str: ...

    # faults
    def set_loss(self, host: str, p: float) -> None: ...
    def block(self, src: str, dst: str) -> None: ...
    def unblock(self, src: str, dst: str) -> None: ...
    def partition(self, groups: Sequence[Sequence[str]], bridges: Sequence[str] = ()) -> None: ...
    def heal(self) -> None: ...
    def counters(self, host: str) -> dict[str, int]: ...
    def ruleset(self, host: str) -> str: ...

    # daemons
    def start_daemon(self, host: str) -> int: ...
    def daemon_pid(self, host: str) -> int | None: ...
    def daemon_running(self, host: str) -> bool: ...
    def signal_daemon(self, host: str, sig: int) -> bool: ...
    def stop_daemon(self, host: str, grace: float = 10.0) -> int | None: ...
    def kill_daemon(self, host: str) -> int | None: ...
    def kill_daemons(self, hosts: Sequence[str]) -> dict[str, int | None]: ...
    def poll_exits(self) -> list[Exit]: ...

    # disks
    def mount_disk(self, host: str, size: int) -> None: ...
    def small_disks(self) -> dict[str, int]: ...
    def fill_disk(self, host: str) -> int: ...
    def free_disk(self, host: str) -> int: ...
    def disk_filled(self, host: str) -> bool: ...

    # lifecycle
    def detach(self) -> None: ...
    def close(self) -> None: ...


class DiskFaults:
    """Filling and freeing small disks, for a backend whose small disks are tmpfs mounts on
    the harness's machine at ``data_dir(host)`` (both backends: see :mod:`chaos.disks`)."""

    def small_disks(self) -> dict[str, int]:
        raise NotImplementedError

    def data_dir(self, host: str) -> Path:
        raise NotImplementedError

    def _small_disk(self, host: str) -> Path:
        if host not in self.small_disks():
            raise ChaosError(
                f"{host} has no small disk to fill (give it one when the cluster is made: "
                f"`chaos up --small-disk {host}=16m`, or `[disks]` in a scenario)"
            )
        return self.data_dir(host)

    def fill_disk(self, host: str) -> int:
        try:
            return disks.fill(self._small_disk(host))
        except OSError as exc:
            raise ChaosError(f"filling the disk of {host}: {exc}") from None

    def free_disk(self, host: str) -> int:
        try:
            return disks.free(self._small_disk(host))
        except OSError as exc:
            raise ChaosError(f"freeing the disk of {host}: {exc}") from None

    def disk_filled(self, host: str) -> bool:
        return host in self.small_disks() and disks.filled(self.data_dir(host))


def meshd_argv(
    spec: DaemonSpec,
    host: str,
    addr: str,
    sock: str,
    keyring: str,
    seeds: list[str],
    data_dir: str,
) -> list[str]:
    """The daemon's command line (shared by both backends; containers get it from compose)."""
    return [
        sys.executable,
        "-m",
        "meshd",
        "run",
        "--name",
        host,
        "--bind",
        f"{addr}:{spec.port}",
        "--socket",
        sock,
        "--profile",
        spec.profile,
        "--log-format",
        "logfmt",
        "--log-level",
        spec.log_level,
        f"--key={spec.key}",
        "--keyring-file",
        keyring,
        "--data-dir",
        data_dir,
        "--metrics-bind",
        f"{addr}:{spec.metrics_port}",
        *(f"--seed={s}" for s in seeds),
        *spec.extra,
    ]


class NetnsBackend(DiskFaults):
    """Hosts as Linux network namespaces on a bridge (:class:`chaos.netns.HostNet`).

    The daemons are started detached (their own sessions, listed in the state file with
    their start times), so ``chaos up`` can return and later commands — other processes —
    signal them by pid. While this object is their parent (the ``chaos run`` harness), their
    exit statuses are known exactly; after an attach they are not, and only "is it still
    running" can be judged.
    """

    kind = "netns"

    def __init__(self, net: HostNet, spec: DaemonSpec) -> None:
        self.net = net
        self.spec = spec
        self.run_dir = net.run_dir
        self.exits: list[Exit] = []
        self._ended: set[int] = set()  # pids we ended on purpose (and already recorded)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        hosts: int | Sequence[str],
        spec: DaemonSpec,
        *,
        prefix: str,
        subnet: str,
        run_dir: Path,
    ) -> NetnsBackend:
        net = HostNet(hosts, prefix=prefix, subnet=subnet, run_dir=run_dir, root_addr=True)
        net.start()
        return cls(net, spec)

    @classmethod
    def attach(cls, run_dir: Path, spec: DaemonSpec) -> NetnsBackend:
        return cls(HostNet.attach(run_dir), spec)

    # ------------------------------------------------------------------ hosts

    @property
    def hosts(self) -> list[str]:
        return [h.name for h in self.net.hosts]

    @property
    def faults(self) -> Faults:
        return self.net.faults

    @property
    def controller(self) -> str | None:
        return self.net.bridge_addr

    def addr(self, host: str) -> str:
        return self.net.addr(host)

    def host_dir(self, host: str) -> Path:
        return self.run_dir / host

    def socket_path(self, host: str) -> str:
        return str(self.host_dir(host) / "meshd.sock")

    def log_path(self, host: str) -> Path:
        return self.host_dir(host) / "meshd.log"

    def data_dir(self, host: str) -> Path:
        return self.host_dir(host) / "data"

    def log_text(self, host: str) -> str:
        try:
            return self.log_path(host).read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ faults

    def set_loss(self, host: str, p: float) -> None:
        self.net.set_loss(host, p)

    def block(self, src: str, dst: str) -> None:
        self.net.block(src, dst)

    def unblock(self, src: str, dst: str) -> None:
        self.net.unblock(src, dst)

    def partition(self, groups: Sequence[Sequence[str]], bridges: Sequence[str] = ()) -> None:
        self.net.partition(groups, bridges=bridges)

    def heal(self) -> None:
        self.net.heal()

    def counters(self, host: str) -> dict[str, int]:
        return self.net.counters(host)

    def ruleset(self, host: str) -> str:
        return self.net.ruleset(host)

    # ------------------------------------------------------------------ daemons

    def _tag(self, host: str) -> str:
        return f"meshd:{host}"

    def start_daemon(self, host: str) -> int:
        if self.daemon_running(host):
            raise ChaosError(f"meshd on {host} is already running")
        self._reap(host)
        d = self.host_dir(host)
        d.mkdir(parents=True, exist_ok=True)
        with_seeds = [f"{self.net.addr(h)}:{self.spec.port}" for h in self.hosts if h != host]
        argv = meshd_argv(
            self.spec,
            host,
            self.net.addr(host),
            self.socket_path(host),
            str(d / "keyring.json"),
            with_seeds[:3],
            str(self.data_dir(host)),
        )
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path(host), "ab") as log:
            log.write(f"--- chaos: starting meshd on {host} at {time.ctime()} ---\n".encode())
            log.flush()
            proc = self.net.popen(
                host, argv, tag=self._tag(host), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        return int(proc.pid)

    def daemon_pid(self, host: str) -> int | None:
        for entry in reversed(self.net.listed(self._tag(host))):
            if self.net.running(entry["pid"]):
                return int(entry["pid"])
        return None

    def daemon_running(self, host: str) -> bool:
        return self.daemon_pid(host) is not None

    def signal_daemon(self, host: str, sig: int) -> bool:
        pid = self.daemon_pid(host)
        return pid is not None and self.net.signal_pid(pid, sig)

    def stop_daemon(self, host: str, grace: float = 10.0) -> int | None:
        """Graceful: SIGTERM (the daemon leaves the cluster), SIGKILL after ``grace``."""
        pid = self.daemon_pid(host)
        if pid is None:
            self._reap(host)
            return None
        self._ended.add(pid)
        code = self.net.end_pid(pid, grace)
        self.exits.append(Exit(host, pid, code, "stop"))
        return code

    def kill_daemon(self, host: str) -> int | None:
        """SIGKILL, like a power cut of the process; waits until it is gone."""
        return self.kill_daemons([host])[host]

    def kill_daemons(self, hosts: Sequence[str]) -> dict[str, int | None]:
        """SIGKILL every daemon of ``hosts`` in one pass — none outlives another by more than
        the time a signal takes — then wait until all are gone (a power cut of them all)."""
        pids = {h: self.daemon_pid(h) for h in hosts}
        for pid in pids.values():
            if pid is not None:
                self._ended.add(pid)
                self.net.signal_pid(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        codes: dict[str, int | None] = {}
        for host, pid in pids.items():
            if pid is None:
                codes[host] = None
                continue
            while self.net.running(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            codes[host] = self.net.forget_pid(pid) if not self.net.running(pid) else None
            self.exits.append(Exit(host, pid, codes[host], "kill"))
        return codes

    def _reap(self, host: str) -> None:
        """Forget exited daemons of ``host``; an exit nobody asked for is a crash."""
        for entry in self.net.listed(self._tag(host)):
            pid = int(entry["pid"])
            if self.net.running(pid):
                continue
            code = self.net.forget_pid(pid)
            if pid not in self._ended:
                self.exits.append(Exit(host, pid, code, "crash"))

    def poll_exits(self) -> list[Exit]:
        for host in self.hosts:
            self._reap(host)
        return list(self.exits)

    # ------------------------------------------------------------------ disks

    def mount_disk(self, host: str, size: int) -> None:
        """A tmpfs of ``size`` bytes as ``host``'s data directory (before its daemon starts:
        see :mod:`chaos.disks`)."""
        if self.daemon_running(host):
            raise ChaosError(f"meshd on {host} is running: a small disk is mounted before start")
        self.net.mount_tmpfs(host, self.data_dir(host), size)

    def small_disks(self) -> dict[str, int]:
        return {m["host"]: int(m["size"]) for m in self.net.mounts()}

    # ------------------------------------------------------------------ lifecycle

    def detach(self) -> None:
        self.net.detach()

    def close(self) -> None:
        """Stop every daemon gracefully (in parallel), then remove everything."""
        for host in self.hosts:
            pid = self.daemon_pid(host)
            if pid is not None:
                self._ended.add(pid)
                self.net.signal_pid(pid, signal.SIGTERM)
                self.net.signal_pid(pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while any(self.daemon_running(h) for h in self.hosts) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.net.close()
