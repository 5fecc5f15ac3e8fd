"""Isolated hosts in Linux network namespaces, with faults as nftables rules.

Why namespaces: a meshd daemon on loopback shares one network stack with every other daemon,
so a fault (loss, a partition) cannot hit one host without hitting all of them. Here every
host gets its own stack: a namespace with loopback, one veth whose other end is plugged into a
bridge in the root namespace, and an address from a private subnet. Daemons in different hosts
talk over the bridge exactly as machines on a LAN switch do (ARP, no routing, no NAT).

Why nftables inside the host: the fault rules live in the host's own namespace, in one table
(``table inet meshd_chaos``) hooked on *input*. The same rule text can later be loaded into a
container with ``nft -f -`` and mean the same thing. Rules are rendered from the desired fault
state and loaded atomically (one ``nft -f`` transaction replaces the whole table), so there is
never a window with half a partition.

Why input only: a drop on the *output* hook makes the sender's ``sendto()`` fail with EPERM, so
the daemon would *see* the fault, which a lossy or partitioned network never tells anyone.
Dropping on the receiver's input is silent for the sender. Consequences:

* ``set_loss(h, p)`` drops a fraction ``p`` of the packets *arriving at* ``h`` (from other
  hosts; loopback is exempt). With the same loss on every host, every packet between two hosts
  is lost with probability ``p`` (it crosses exactly one input hook), and a request/reply round
  trip with probability ``1 - (1 - p)**2``.
* ``block(a, b)`` drops packets from ``a`` on ``b``'s input: ``a`` can no longer reach ``b``;
  ``b`` still reaches ``a`` (a TCP connect from ``b`` to ``a`` still fails, since the SYN-ACK
  is dropped: that is what a one-way fault does to TCP).

Cleanliness: everything created (bridge, veths, namespaces, nft tables, processes, the tmpfs
of a small disk) is listed in a state file under the run directory *before* it is created,
and :meth:`HostNet.close` removes it all, also when the caller raised. After a crash (the
state file is left behind, its lock is free) :meth:`HostNet.cleanup` from a new process
removes what is listed, and :meth:`HostNet.start` does the same before refusing anything
that is not ours. Processes are only ever signalled by pid, and a pid from a crashed run only
if its start time still matches.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from chaos.disks import mount_fstype
from chaos.faults import (
    TABLE,
    Faults,
    parse_counters,
    partition_groups,
    percent_of,
    render_ruleset,
)

DEFAULT_PREFIX = "mshc"
DEFAULT_SUBNET = "10.77.0.0/24"
DEFAULT_RUN_ROOT = Path("/run/meshd-chaos")
INNER_IFNAME = "eth0"
STATE_VERSION = 1
_IFNAMSIZ = 15  # the kernel's limit on interface names (16 with the terminating NUL)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_CMD_TIMEOUT = 30.0


class ChaosError(RuntimeError):
    """A host-layer operation failed; the message includes the failing command's stderr."""


class Conflict(ChaosError):
    """Refusing to start: a name or the subnet is already in use on this machine."""


def unavailable_reason() -> str | None:
    """Why namespaces and nftables cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and nftables need CAP_NET_ADMIN)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install {package}, or `make system-deps`)"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    probe = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
    )
    if probe.returncode != 0:
        return f"nftables does not work here: {probe.stderr.strip()}"
    return None


@dataclass(frozen=True, slots=True)
class Host:
    """One isolated host: a namespace with one interface (``eth0``) on the bridge."""

    name: str  # logical name, e.g. "h1"
    index: int  # 1-based
    netns: str  # namespace name, e.g. "mshc1"
    addr: str  # IPv4 address of eth0 inside the namespace
    prefixlen: int
    veth: str  # root-namespace end of the veth pair, enslaved to the bridge

    @property
    def cidr(self) -> str:
        return f"{self.addr}/{self.prefixlen}"


HostRef = Host | str


@dataclass(slots=True)
class _Tracked:
    proc: subprocess.Popen[Any]
    host: str
    start_time: int | None
    argv: list[str]


def _proc_running(pid: int, start_time: int | None) -> bool:
    """Is ``pid`` still the process that started at ``start_time``, and not a zombie?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and (start_time is None or int(fields[19]) == start_time)


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the pid it identifies
    a process, so a recycled pid is never mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of the full line; the two before ")" + 2 are dropped


def end_process(
    pid: int,
    start_time: int | None,
    grace: float,
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGCONT),
) -> None:
    """End ``pid`` if it is still the process that started at ``start_time``: ``signals``
    (a stopped process needs SIGCONT to act on SIGTERM), SIGKILL after ``grace`` seconds,
    then wait (bounded) until it is gone."""
    for sig in signals:
        if _proc_running(pid, start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while _proc_running(pid, start_time) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _proc_running(pid, start_time):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _proc_running(pid, start_time) and time.monotonic() < deadline:
            time.sleep(0.02)


def _run(
    argv: Sequence[str],
    *,
    input_text: str | None = None,
    check: bool = True,
    timeout: float = _CMD_TIMEOUT,
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.PIPE,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (output captured unless ``stdout`` says where); a ChaosError with its
    stderr when it fails (``check``), cannot start or outlives ``timeout``."""
    try:
        result = subprocess.run(
            list(argv),
            input=input_text,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ChaosError(f"{' '.join(argv)}: {exc}") from None
    if check and result.returncode != 0:
        raise ChaosError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _json_of(argv: Sequence[str]) -> list[dict[str, Any]]:
    out = _run(argv).stdout.strip()
    return json.loads(out) if out else []


def existing_namespaces() -> set[str]:
    return {entry["name"] for entry in _json_of(["ip", "-j", "netns", "list"])}


def existing_links() -> set[str]:
    return {entry["ifname"] for entry in _json_of(["ip", "-j", "link", "show"])}


def root_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """Every IPv4 network the root namespace has an address in or a route to (bar default)."""
    found: list[tuple[ipaddress.IPv4Network, str]] = []
    for link in _json_of(["ip", "-j", "-4", "addr", "show"]):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                iface = ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
                found.append((iface.network, f"address {iface} on {link['ifname']}"))
    for route in _json_of(["ip", "-j", "-4", "route", "show", "table", "all"]):
        dst = route.get("dst", "")
        if not dst or dst == "default":
            continue
        net = ipaddress.IPv4Network(dst, strict=False)
        found.append((net, f"route to {dst} in table {route.get('table', 'main')}"))
    return found


class HostNet:
    """N isolated hosts on one private bridge. Use as a context manager, or start()/close().

    ``hosts`` is a count (hosts ``h1`` … ``hN``) or a list of names. Host ``i`` (1-based) is
    namespace ``<prefix><i>`` with address ``subnet[i + 1]`` (``.2``, ``.3``, … in a /24): the
    first address, ``.1``, is kept for the bridge, which gets it only with ``root_addr=True``
    (when the root namespace must reach the hosts, e.g. to talk to a daemon's TCP RPC port;
    that address is then exempt from every fault, so the harness's own traffic is never lost).
    """

    def __init__(
        self,
        hosts: int | Sequence[str] = 2,
        *,
        prefix: str = DEFAULT_PREFIX,
        subnet: str = DEFAULT_SUBNET,
        bridge: str | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        root_addr: bool = False,
        table: str = TABLE,
    ) -> None:
        names = [f"h{i}" for i in range(1, hosts + 1)] if isinstance(hosts, int) else list(hosts)
        if not names:
            raise ValueError("at least one host")
        if len(set(names)) != len(names):
            raise ValueError("host names must be unique")
        for name in [prefix, table, *names]:
            if not _NAME_RE.match(name):
                raise ValueError(f"{name!r}: use lower-case letters, digits, '-' and '_'")
        # IPv4 only: the fault rules match `ip saddr`.
        net = ipaddress.IPv4Network(subnet, strict=True)
        if len(names) + 3 > net.num_addresses:
            raise ValueError(f"{subnet} is too small for {len(names)} hosts")
        self.prefix = prefix
        self.subnet = net
        self.bridge = bridge or f"{prefix}br0"
        self.table = table
        self.root_addr = root_addr
        self.bridge_addr: str | None = str(net[1]) if root_addr else None
        self.run_dir = Path(run_dir) if run_dir is not None else DEFAULT_RUN_ROOT / prefix
        self.hosts = [
            Host(
                name,
                i,
                f"{prefix}{i}",
                str(net[i + 1]),
                net.prefixlen,
                f"{prefix}{i}v",
            )
            for i, name in enumerate(names, start=1)
        ]
        for link in [self.bridge, *(h.veth for h in self.hosts)]:
            if len(link) > _IFNAMSIZ:
                raise ValueError(f"interface name {link!r} is longer than {_IFNAMSIZ} characters")
        self._by_name = {h.name: h for h in self.hosts}
        self.faults = Faults()
        self._tracked: list[_Tracked] = []
        self._state: dict[str, Any] = {}
        self._lock: IO[str] | None = None
        self._started = False

    @classmethod
    def attach(cls, run_dir: str | os.PathLike[str], *, wait: float = 30.0) -> HostNet:
        """Take over a running HostNet from its state file (a later ``chaos`` command).

        The hosts, addresses, current faults and processes come from the state file that
        :meth:`start` (in another process, long gone) wrote. The run directory's lock is
        held until :meth:`detach` or :meth:`close`, so two commands never interleave their
        rule updates. Processes listed there are signalled by pid, and only while their
        start time still matches.
        """
        path = Path(run_dir) / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ChaosError(f"no cluster at {run_dir} (no state file; run `chaos up`)") from None
        except (OSError, ValueError) as exc:
            raise ChaosError(f"unreadable state file {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ChaosError(f"{path}: unknown state file version")
        net = cls(
            [h["name"] for h in data["hosts"]],
            prefix=data["prefix"],
            subnet=data["subnet"],
            bridge=data["bridge"],
            run_dir=run_dir,
            root_addr=data.get("bridge_addr") is not None,
            table=data.get("table", TABLE),
        )
        net._acquire_lock(wait=wait)
        try:
            net._state = net._read_state()
        except BaseException:
            net._release_lock()
            raise
        net.faults = Faults.from_json(net._state.get("faults"))
        net._started = True
        return net

    def detach(self) -> None:
        """Leave everything running and listed in the state file; release the lock. The
        processes we started keep running (their own sessions); a later :meth:`attach` or
        :meth:`cleanup` finds them by pid and start time."""
        self._tracked = []
        if self._state:
            self._save_state()
        self._started = False
        self._release_lock()

    # ------------------------------------------------------------------ paths & lookup

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "lock"

    def host(self, ref: HostRef) -> Host:
        if isinstance(ref, Host):
            return ref
        try:
            return self._by_name[ref]
        except KeyError:
            raise KeyError(f"no host {ref!r} (hosts: {', '.join(self._by_name)})") from None

    def addr(self, ref: HostRef) -> str:
        return self.host(ref).addr

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> HostNet:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> HostNet:
        """Create the bridge, the namespaces and the veths; refuse if anything clashes."""
        if self._started:
            raise ChaosError("already started")
        reason = unavailable_reason()
        if reason is not None:
            raise ChaosError(reason)
        self._acquire_lock()
        try:
            if self.state_path.exists():
                # Our own leftovers from a run that crashed (its lock is free, we hold it now).
                self.cleanup()
            self._check_conflicts()
            self._state = {
                "version": STATE_VERSION,
                "owner_pid": os.getpid(),
                "prefix": self.prefix,
                "subnet": str(self.subnet),
                "bridge": self.bridge,
                "bridge_addr": self.bridge_addr,
                "table": self.table,
                "hosts": [asdict(h) for h in self.hosts],
                "links": [],
                "namespaces": [],
                "tables": [],
                "processes": [],
                "mounts": [],
                "faults": self.faults.to_json(),
            }
            self._started = True
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def close(self, grace: float = 3.0) -> None:
        """End every process we started, then remove everything we created. Idempotent."""
        errors: list[str] = []
        try:
            self._end_tracked(grace)
        except Exception as exc:
            errors.append(f"ending processes: {exc}")
        try:
            if self._lock is not None or self.state_path.exists():
                self.cleanup()
        except Exception as exc:
            errors.append(str(exc))
        finally:
            self._started = False
            self._release_lock()
        if errors:
            raise ChaosError("; ".join(errors))

    def cleanup(self) -> list[str]:
        """Remove everything the state file lists (ours, from this or a crashed run).

        Safe to call from a fresh process after a crash: ``HostNet(prefix=...).cleanup()``.
        Refuses while another live HostNet holds the run directory's lock. Returns what it
        removed.
        """
        own_lock = self._lock is not None
        if not own_lock:
            if not self.state_path.exists():
                return []
            self._acquire_lock()
        removed: list[str] = []
        errors: list[str] = []
        try:
            state = self._read_state()
            removed += self._kill_listed(state.get("processes", []))
            for mount in state.get("mounts", []):
                if self._unmount(mount["path"], errors):
                    removed.append(f"tmpfs {mount['path']}")
            namespaces = existing_namespaces()
            for netns, table in state.get("tables", []):
                if netns in namespaces:
                    res = _run(
                        ["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", table],
                        check=False,
                    )
                    if res.returncode == 0:
                        removed.append(f"nft table inet {table} in {netns}")
            links = existing_links()
            bridge = state.get("bridge")
            listed_links = state.get("links", [])
            # veths first (a stray process could keep a namespace, and so a veth, alive),
            # then the namespaces, then the bridge once nothing is plugged into it.
            for link in [n for n in listed_links if n != bridge]:
                if link in links:
                    res = _run(["ip", "link", "del", link], check=False)
                    if res.returncode == 0:
                        removed.append(f"link {link}")
                    elif link in existing_links():
                        errors.append(f"ip link del {link}: {res.stderr.strip()}")
            for netns in state.get("namespaces", []):
                if netns in namespaces:
                    res = _run(["ip", "netns", "del", netns], check=False)
                    if res.returncode == 0:
                        removed.append(f"netns {netns}")
                    else:
                        errors.append(f"ip netns del {netns}: {res.stderr.strip()}")
            if bridge in listed_links and bridge in links:
                res = _run(["ip", "link", "del", bridge], check=False)
                if res.returncode == 0:
                    removed.append(f"link {bridge}")
                else:
                    errors.append(f"ip link del {bridge}: {res.stderr.strip()}")
            if errors:
                raise ChaosError("cleanup incomplete: " + "; ".join(errors))
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
            self._state = {}
        finally:
            if not own_lock:
                self._release_lock()
        return removed

    # ------------------------------------------------------------------ processes

    def popen(
        self, host: HostRef, argv: Sequence[str], *, tag: str | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host`` (``ip netns exec``, which execs: the pid is argv's).

        Defaults: stdin from /dev/null and a new session, so a Ctrl-C in the terminal reaches
        the harness (which then ends its processes in order) instead of every daemon at once.
        The process is tracked by pid (and start time, in the state file) until it is reaped;
        ``tag`` names it in the state file so that a later process can find it
        (:meth:`listed`).
        """
        self._require_started()
        h = self.host(host)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        full = ["ip", "netns", "exec", h.netns, *argv]
        proc: subprocess.Popen[Any] = subprocess.Popen(full, **kw)
        tracked = _Tracked(proc, h.name, _proc_start_time(proc.pid), list(argv))
        self._tracked.append(tracked)
        entry: dict[str, Any] = {
            "pid": proc.pid,
            "start_time": tracked.start_time,
            "host": h.name,
            "argv": full,
        }
        if tag is not None:
            entry["tag"] = tag
        self._state["processes"].append(entry)
        self._save_state()
        return proc

    def run(
        self,
        host: HostRef,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        timeout: float = 30.0,
        **kw: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in ``host`` to completion, like :func:`subprocess.run` (output captured
        unless redirected); tracked while it runs, killed on timeout."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        proc = self.popen(host, argv, **kw)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, grace=0)
            raise
        self._forget(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        return [t.proc for t in self._tracked]

    def signal(self, proc: subprocess.Popen[Any], sig: int) -> bool:
        """Send ``sig`` to one of our processes, by pid, if it has not exited. An unreaped
        child's pid cannot be recycled, so this never hits a stranger."""
        if not any(t.proc is proc for t in self._tracked):
            raise ChaosError(f"pid {proc.pid} was not started by this HostNet")
        if proc.poll() is not None:
            return False
        proc.send_signal(sig)
        return True

    def stop(self, proc: subprocess.Popen[Any], grace: float = 3.0) -> int | None:
        """SIGTERM (and SIGCONT, in case it was stopped), SIGKILL after ``grace``; reap."""
        self._end([t for t in self._tracked if t.proc is proc], grace)
        return proc.returncode

    def listed(self, tag: str | None = None) -> list[dict[str, Any]]:
        """Processes in the state file (optionally only those tagged ``tag``), whether
        started by this object or by an earlier process that attached to the same run."""
        return [
            dict(p) for p in self._state.get("processes", []) if tag is None or p.get("tag") == tag
        ]

    def running(self, pid: int) -> bool:
        """Is our listed process ``pid`` still running (not exited, not a zombie)?"""
        tracked = self._tracked_by_pid(pid)
        if tracked is not None:
            return tracked.proc.poll() is None
        entry = self._entry(pid)
        return entry is not None and _proc_running(pid, entry.get("start_time"))

    def signal_pid(self, pid: int, sig: int) -> bool:
        """Send ``sig`` to a listed process by pid, if it is still the process we started
        (start time checked, so a recycled pid is never hit). False if it is gone."""
        tracked = self._tracked_by_pid(pid)
        if tracked is not None:
            return self.signal(tracked.proc, sig)
        entry = self._entry(pid)
        if entry is None:
            raise ChaosError(f"pid {pid} is not one of ours (not in {self.state_path})")
        if not _proc_running(pid, entry.get("start_time")):
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def end_pid(self, pid: int, grace: float = 3.0) -> int | None:
        """End a listed process: SIGTERM (+ SIGCONT), SIGKILL after ``grace``; forget it.
        Returns its exit status when we are its parent (else None: init reaps it)."""
        tracked = self._tracked_by_pid(pid)
        if tracked is not None:
            return self.stop(tracked.proc, grace)
        entry = self._entry(pid)
        if entry is None:
            return None
        end_process(pid, entry.get("start_time"), grace)
        self.forget_pid(pid)
        return None

    def forget_pid(self, pid: int) -> int | None:
        """Drop an exited process from the state file; its exit status if we reaped it."""
        tracked = self._tracked_by_pid(pid)
        code: int | None = None
        if tracked is not None:
            code = tracked.proc.poll()
            if code is None:
                raise ChaosError(f"pid {pid} is still running")
            self._forget(tracked.proc)
            return code
        if self._state:
            self._state["processes"] = [p for p in self._state["processes"] if p["pid"] != pid]
            self._save_state()
        return code

    def _tracked_by_pid(self, pid: int) -> _Tracked | None:
        return next((t for t in self._tracked if t.proc.pid == pid), None)

    def _entry(self, pid: int) -> dict[str, Any] | None:
        return next((p for p in self._state.get("processes", []) if p["pid"] == pid), None)

    def exec_argv(self, host: HostRef, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside ``host``."""
        return ["ip", "netns", "exec", self.host(host).netns, *argv]

    # ------------------------------------------------------------------ mounts

    def mount_tmpfs(self, host: HostRef, path: str | os.PathLike[str], size: int) -> str:
        """Mount a tmpfs of ``size`` bytes at ``path`` (made if missing, mode 0700) for
        ``host``'s use; listed in the state file first, unmounted by close and cleanup.
        Processes started afterwards (``ip netns exec`` inherits the root's mounts) see it."""
        self._require_started()
        h = self.host(host)
        target = os.path.realpath(path)
        if any(m["path"] == target for m in self.mounts()):
            raise ChaosError(f"{target} is already mounted by this run")
        os.makedirs(target, mode=0o700, exist_ok=True)
        self._record("mounts", {"path": target, "host": h.name, "size": size})
        _run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", f"chaos-{self.prefix}", target]
        )
        return target

    def mounts(self) -> list[dict[str, Any]]:
        """The mounts this run made (from the state file): path, host, size."""
        return [dict(m) for m in self._state.get("mounts", [])]

    def unmount(self, path: str | os.PathLike[str]) -> None:
        target = os.path.realpath(path)
        errors: list[str] = []
        self._unmount(target, errors)
        if errors:
            raise ChaosError("; ".join(errors))
        self._state["mounts"] = [m for m in self._state.get("mounts", []) if m["path"] != target]
        self._save_state()

    @staticmethod
    def _unmount(path: str, errors: list[str]) -> bool:
        """Unmount our tmpfs at ``path`` if it is still there (lazily if something holds
        it); True if it was mounted."""
        if mount_fstype(path) != "tmpfs":
            return False
        res = _run(["umount", path], check=False)
        if res.returncode != 0:
            res = _run(["umount", "--lazy", path], check=False)
        if res.returncode != 0:
            errors.append(f"umount {path}: {res.stderr.strip()}")
            return False
        return True

    # ------------------------------------------------------------------ faults

    def set_loss(self, host: HostRef, p: float) -> None:
        """Drop a fraction ``p`` (0–1, in whole percent) of packets arriving at ``host``."""
        percent = percent_of(p)
        h = self.host(host)
        if percent:
            self.faults.loss[h.name] = percent
        else:
            self.faults.loss.pop(h.name, None)
        self._apply([h])

    def block(self, src: HostRef, dst: HostRef) -> None:
        """One-way: packets from ``src`` no longer reach ``dst`` (dropped on dst's input)."""
        s, d = self.host(src), self.host(dst)
        if s == d:
            raise ValueError("a host cannot block itself")
        self.faults.blocks.add((s.name, d.name))
        self._apply([d])

    def unblock(self, src: HostRef, dst: HostRef) -> None:
        s, d = self.host(src), self.host(dst)
        self.faults.blocks.discard((s.name, d.name))
        self._apply([d])

    def partition(
        self, groups: Sequence[Iterable[HostRef]], *, bridges: Sequence[HostRef] = ()
    ) -> None:
        """Split the hosts into groups that cannot reach each other (both ways). Hosts not
        named in any group (and not bridges) form one more group together. ``bridges``
        reach every group and are reached by all: a node that sees both sides. Replaces
        any earlier partition."""
        named = [[self.host(r).name for r in g] for g in groups]
        via = [self.host(r).name for r in bridges]
        full = partition_groups([h.name for h in self.hosts], named, via)
        self.faults.groups = full
        self.faults.bridges = via if full is not None else []
        self._apply(self.hosts)

    def heal(self) -> None:
        """Remove every fault: flush our table in every host (the table itself stays)."""
        self._require_started()
        self.faults = Faults()
        for h in self.hosts:
            _run(["ip", "netns", "exec", h.netns, "nft", "flush", "table", "inet", self.table])
        self._state["faults"] = self.faults.to_json()
        self._save_state()

    def ruleset(self, host: HostRef) -> str:
        """What nft actually has loaded in ``host`` (for logs and debugging)."""
        h = self.host(host)
        return _run(
            ["ip", "netns", "exec", h.netns, "nft", "list", "table", "inet", self.table]
        ).stdout

    def counters(self, host: HostRef) -> dict[str, int]:
        """Packets counted per rule comment in ``host``'s table: ``arriving`` (everything
        from other hosts that reached the fault rules) and one entry per fault rule (what
        it dropped). Counters restart whenever the host's rules are re-rendered."""
        h = self.host(host)
        out = _run(
            ["ip", "netns", "exec", h.netns, "nft", "-j", "list", "table", "inet", self.table]
        ).stdout
        return parse_counters(out)

    # ------------------------------------------------------------------ internals

    def _require_started(self) -> None:
        if not self._started:
            raise ChaosError("HostNet is not started")

    def _apply(self, hosts: Iterable[Host]) -> None:
        self._require_started()
        addr_of = {h.name: h.addr for h in self.hosts}
        exempt = [self.bridge_addr] if self.bridge_addr else []
        for h in hosts:
            script = render_ruleset(
                self.faults.rules_for(h.name, addr_of), table=self.table, exempt=exempt
            )
            _run(["ip", "netns", "exec", h.netns, "nft", "-f", "-"], input_text=script)
        self._state["faults"] = self.faults.to_json()
        self._save_state()

    def _create(self) -> None:
        plen = self.subnet.prefixlen
        self._record("links", self.bridge)
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        if self.bridge_addr:
            _run(["ip", "addr", "add", f"{self.bridge_addr}/{plen}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        exempt = [self.bridge_addr] if self.bridge_addr else []
        for h in self.hosts:
            self._record("namespaces", h.netns)
            _run(["ip", "netns", "add", h.netns])
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            self._record("links", h.veth)
            veth_pair = ["type", "veth", "peer", "name", INNER_IFNAME, "netns", h.netns]
            _run(["ip", "link", "add", h.veth, *veth_pair])
            _run(["ip", "link", "set", h.veth, "master", self.bridge])
            _run(["ip", "link", "set", h.veth, "up"])
            _run(["ip", "-n", h.netns, "addr", "add", h.cidr, "dev", INNER_IFNAME])
            _run(["ip", "-n", h.netns, "link", "set", INNER_IFNAME, "up"])
            self._record("tables", [h.netns, self.table])
            script = render_ruleset([], table=self.table, exempt=exempt)
            _run(["ip", "netns", "exec", h.netns, "nft", "-f", "-"], input_text=script)

    def _check_conflicts(self) -> None:
        problems: list[str] = []
        namespaces = existing_namespaces()
        problems += [
            f"network namespace {h.netns} exists" for h in self.hosts if h.netns in namespaces
        ]
        links = existing_links()
        problems += [
            f"link {name} exists"
            for name in [self.bridge, *(h.veth for h in self.hosts)]
            if name in links
        ]
        problems += [
            f"subnet {self.subnet} overlaps {net} ({where})"
            for net, where in root_networks()
            if net.overlaps(self.subnet)
        ]
        if problems:
            raise Conflict(
                "refusing to start: "
                + "; ".join(problems)
                + f" (not listed in {self.state_path}, so not ours: choose another prefix or "
                "subnet)"
            )

    def _record(self, key: str, item: Any) -> None:
        """Write down what we are about to create *before* creating it, so that a crash in
        between still leaves it listed for cleanup()."""
        self._state.setdefault(key, []).append(item)
        self._save_state()

    def _save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=1))
        os.replace(tmp, self.state_path)

    def _read_state(self) -> dict[str, Any]:
        if self._state:
            return self._state
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ChaosError(f"unreadable state file {self.state_path}: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ChaosError(f"{self.state_path}: unknown state file version")
        return data

    def _acquire_lock(self, wait: float = 0.0) -> None:
        if self._lock is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.lock_path, "a+")  # noqa: SIM115 (held for the HostNet's lifetime)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                lock.close()
                raise Conflict(f"{self.run_dir} is in use by pid {holder}") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is None:
            return
        if not self.state_path.exists():
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
        self._lock.close()
        self._lock = None

    def _forget(self, proc: subprocess.Popen[Any]) -> None:
        self._tracked = [t for t in self._tracked if t.proc is not proc]
        if self._state:
            self._state["processes"] = [p for p in self._state["processes"] if p["pid"] != proc.pid]
            self._save_state()

    def _end(self, victims: list[_Tracked], grace: float) -> None:
        for t in victims:
            if t.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    t.proc.send_signal(signal.SIGTERM)
                    t.proc.send_signal(signal.SIGCONT)  # a stopped process must run to exit
        deadline = time.monotonic() + grace
        for t in victims:
            try:
                t.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    t.proc.kill()
                t.proc.wait(10)
        for t in victims:
            self._forget(t.proc)

    def _end_tracked(self, grace: float) -> None:
        self._end(list(self._tracked), grace)

    def _kill_listed(self, listed: list[dict[str, Any]]) -> list[str]:
        """SIGKILL processes a crashed run left behind: only where pid *and* start time match."""
        ended: list[str] = []
        for entry in listed:
            pid, start = int(entry["pid"]), entry.get("start_time")
            if start is None or _proc_start_time(pid) != start:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                ended.append(f"pid {pid}")
            deadline = time.monotonic() + 5.0
            while _proc_start_time(pid) == start and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.02)
        return ended
