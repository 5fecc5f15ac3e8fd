"""A meshd cluster on a backend: bring it up, inject faults, heal, take it down.

:class:`Cluster` is what the CLI commands and the scenario runner share. Every fault and
process action goes through it, so every one of them is written to the run's history with
its time (the checker needs to know, say, that h3 was killed on purpose before it judges a
missing daemon a crash). The cluster's own facts — backend, daemon settings, which hosts are
paused — live in ``cluster.json`` in the run directory next to the backend's state file, so
``chaos up`` can return and each later command attaches to the running cluster.

All methods are synchronous (they run nft, ip, docker, and wait for processes); the async
harness calls them in a worker thread so its clients keep running meanwhile.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from chaos.backends import Backend, DaemonSpec, NetnsBackend
from chaos.history import History
from chaos.netns import DEFAULT_PREFIX, DEFAULT_RUN_ROOT, DEFAULT_SUBNET, ChaosError
from meshd_client.connection import Connection
from meshd_client.protocol.errors import MeshError

CLUSTER_FILE = "cluster.json"
HISTORY_FILE = "history.jsonl"


def default_run_dir(prefix: str = DEFAULT_PREFIX) -> Path:
    root = Path(os.environ.get("CHAOS_RUN_ROOT", str(DEFAULT_RUN_ROOT)))
    return root / prefix


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


class Cluster:
    def __init__(
        self,
        backend: Backend,
        history: History,
        *,
        paused: Sequence[str] = (),
        key: str | None = None,
    ) -> None:
        self.backend = backend
        self.history = history
        self.paused: set[str] = set(paused)
        self.key = key or backend.spec.key  # the current primary (changes with rotations)
        self.created = history.base  # the history's time base, shared by every command
        # nft counters restart whenever a host's rules are re-rendered: what each rule
        # counted is added up here just before (per host, per rule comment).
        self.fault_counters: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        hosts: int,
        *,
        backend: str = "netns",
        prefix: str = DEFAULT_PREFIX,
        subnet: str = DEFAULT_SUBNET,
        run_dir: Path | None = None,
        spec: DaemonSpec | None = None,
        history: History | None = None,
        docker_net: str | None = None,
        build: bool = True,
        disks: dict[str, int] | None = None,
    ) -> Cluster:
        """Create the hosts and start one daemon per host (not waiting for them). ``disks``
        gives hosts a small data disk (bytes) that the ``fill_disk`` fault can fill."""
        if hosts < 1:
            raise ValueError("at least one host")
        run_dir = run_dir or default_run_dir(prefix)
        spec = spec or DaemonSpec(key=new_key())
        if not spec.key:
            spec = DaemonSpec(**{**spec.to_json(), "key": new_key(), "extra": spec.extra})
        if backend == "netns":
            be: Backend = NetnsBackend.create(
                hosts, spec, prefix=prefix, subnet=subnet, run_dir=run_dir
            )
        elif backend == "docker":
            from chaos.docker import DEFAULT_NET, DockerBackend

            be = DockerBackend(
                run_dir, spec, hosts=hosts, project=prefix, net=docker_net or DEFAULT_NET
            )
        else:
            raise ValueError(f"unknown backend {backend!r} (netns or docker)")
        cluster = cls(be, history or History(run_dir / HISTORY_FILE))
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(run_dir, 0o700)  # the gossip key is in cluster.json
            cluster._save()
            if backend == "docker":
                from chaos.docker import DockerBackend

                assert isinstance(be, DockerBackend)
                for host, size in sorted((disks or {}).items()):
                    be.mount_disk(host, size)  # before the containers exist
                be.up(build=build)
                details: dict[str, object] = {"compose": be.compose, "image": be.image}
            else:
                for host, size in sorted((disks or {}).items()):
                    be.mount_disk(host, size)
                for host in be.hosts:
                    be.start_daemon(host)
                details = {}
            cluster.history.add(
                "fault",
                action="up",
                args={
                    "hosts": be.hosts,
                    "backend": be.kind,
                    "disks": dict(disks or {}),
                    **details,  # docker: the compose CLI and the image that ran
                },
            )
        except BaseException:
            cluster.close()
            raise
        return cluster

    @classmethod
    def attach(cls, run_dir: Path) -> Cluster:
        """The cluster a previous ``chaos up`` left running in ``run_dir``."""
        try:
            data = json.loads((run_dir / CLUSTER_FILE).read_text())
        except FileNotFoundError:
            raise ChaosError(f"no cluster in {run_dir} (run `chaos up` first)") from None
        spec = DaemonSpec.from_json(data["spec"])
        be: Backend
        if data["backend"] == "docker":
            from chaos.docker import DockerBackend

            be = DockerBackend.attach(run_dir, spec)
        else:
            be = NetnsBackend.attach(run_dir, spec)
        created = float(data.get("created", time.time()))
        cluster = cls(
            be,
            History(run_dir / HISTORY_FILE, base=created),
            paused=data.get("paused", []),
            key=data.get("key"),
        )
        cluster.created = created
        return cluster

    def _save(self) -> None:
        data: dict[str, Any] = {
            "backend": self.backend.kind,
            "spec": self.backend.spec.to_json(),
            "hosts": self.backend.hosts,
            "paused": sorted(self.paused),
            "key": self.key,
            "created": self.created,
        }
        path = self.backend.run_dir / CLUSTER_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    @property
    def hosts(self) -> list[str]:
        return self.backend.hosts

    @property
    def run_dir(self) -> Path:
        return self.backend.run_dir

    def socket(self, host: str) -> str:
        return self.backend.socket_path(host)

    def detach(self) -> None:
        """Leave the cluster running (``chaos up`` and every later command end here)."""
        self._save()
        self.history.close()
        self.backend.detach()

    def close(self, *, keep: Path | None = None) -> None:
        """Stop every daemon and remove everything the backend created. With ``keep``,
        the run directory's logs and history are copied there first."""
        self.history.close()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for item in self.run_dir.iterdir():
                if item.is_dir():
                    for f in item.glob("*.log"):
                        shutil.copy2(f, keep / f"{item.name}-{f.name}")
                elif item.name in (HISTORY_FILE, CLUSTER_FILE):
                    shutil.copy2(item, keep / item.name)
        try:
            self.backend.close()
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # ------------------------------------------------------------------ faults

    def _record(self, action: str, began: float | None = None, **args: Any) -> None:
        """A fault record, at the time it took effect (``t``); ``began`` is when applying it
        started, for faults whose rules reach the hosts one after another."""
        extra = {"began": began} if began is not None else {}
        self.history.add("fault", action=action, args=args, **extra)

    def _drain_counters(self, hosts: Sequence[str] | None = None) -> None:
        for host in hosts if hosts is not None else self.hosts:
            try:
                counted = self.backend.counters(host)
            except ChaosError:
                continue  # no table (yet): nothing counted
            mine = self.fault_counters.setdefault(host, {})
            for rule, packets in counted.items():
                mine[rule] = mine.get(rule, 0) + packets

    def counted(self) -> dict[str, dict[str, int]]:
        """Packets per host and rule since the cluster started (arriving, and each fault's
        drops); drains the live counters, so call it only once the faults are over."""
        self._drain_counters()
        return {h: dict(c) for h, c in self.fault_counters.items()}

    def partition(self, groups: Sequence[Sequence[str]]) -> None:
        """Two-way partition into ``groups`` (hosts named nowhere form one more group)."""
        began = self.history.now()
        self._drain_counters()
        self.backend.partition(groups)
        self._record("partition", began, groups=[list(g) for g in groups])

    def one_way(self, src: Sequence[str], dst: Sequence[str]) -> None:
        """Every host of ``src`` can no longer reach any host of ``dst`` (the reverse works)."""
        self._drain_counters(dst)
        for s in src:
            for d in dst:
                self.backend.block(s, d)
        self._record("one_way", src=list(src), dst=list(dst))

    def unblock(self, src: Sequence[str], dst: Sequence[str]) -> None:
        self._drain_counters(dst)
        for s in src:
            for d in dst:
                self.backend.unblock(s, d)
        self._record("unblock", src=list(src), dst=list(dst))

    def bridge(self, a: Sequence[str], b: Sequence[str], via: Sequence[str]) -> None:
        """``a`` and ``b`` cannot reach each other; the ``via`` hosts reach both sides."""
        began = self.history.now()
        self._drain_counters()
        self.backend.partition([list(a), list(b)], bridges=list(via))
        self._record("bridge", began, a=list(a), b=list(b), via=list(via))

    def isolate(self, host: str) -> None:
        began = self.history.now()
        self._drain_counters()
        self.backend.partition([[host]])
        self._record("isolate", began, host=host)

    def loss(self, hosts: Sequence[str], p: float) -> None:
        self._drain_counters(hosts)
        for h in hosts:
            self.backend.set_loss(h, p)
        self._record("loss", hosts=list(hosts), p=p)

    def heal_network(self) -> None:
        began = self.history.now()
        self._drain_counters()
        self.backend.heal()
        self._record("heal_network", began)

    # ------------------------------------------------------------------ processes

    def kill(self, host: str) -> int | None:
        code = self.backend.kill_daemon(host)
        self.paused.discard(host)
        self._save()
        self._record("kill", host=host, code=code)
        return code

    def kill_all(self, hosts: Sequence[str] | None = None) -> dict[str, int | None]:
        """kill -9 every daemon (or those of ``hosts``) at once: no survivor sees another
        die, nothing shuts down in order — a power cut of the whole cluster."""
        targets = list(hosts) if hosts else self.hosts
        codes = self.backend.kill_daemons(targets)
        self.paused.difference_update(targets)
        self._save()
        self._record("kill_all", hosts=targets, codes=codes)
        return codes

    def fill_disk(self, host: str) -> int:
        """Fill ``host``'s small disk (see :mod:`chaos.disks`) until the kernel says ENOSPC."""
        written = self.backend.fill_disk(host)
        self._record("fill_disk", host=host, bytes=written)
        return written

    def free_disk(self, host: str) -> int:
        """Delete what :meth:`fill_disk` wrote; the daemon must recover by itself."""
        freed = self.backend.free_disk(host)
        self._record("free_disk", host=host, bytes=freed)
        return freed

    def pause(self, host: str) -> None:
        if not self.backend.signal_daemon(host, signal.SIGSTOP):
            raise ChaosError(f"meshd on {host} is not running")
        self.paused.add(host)
        self._save()
        self._record("pause", host=host)

    def resume(self, host: str) -> None:
        self.backend.signal_daemon(host, signal.SIGCONT)
        self.paused.discard(host)
        self._save()
        self._record("resume", host=host)

    def stop(self, host: str) -> int | None:
        """Graceful stop: SIGTERM, the daemon announces its leave and exits 0."""
        self.backend.signal_daemon(host, signal.SIGCONT)
        code = self.backend.stop_daemon(host)
        self.paused.discard(host)
        self._save()
        self._record("stop", host=host, code=code)
        return code

    def start(self, host: str) -> int:
        pid = self.backend.start_daemon(host)
        self._record("start", host=host, pid=pid)
        return pid

    def restart(self, host: str) -> int:
        """Stop gracefully (if running) and start again: a fresh process, empty memory."""
        if self.backend.daemon_running(host):
            self.stop(host)
        pid = self.start(host)
        self._record("restart", host=host, pid=pid)
        return pid

    def heal(self) -> None:
        """Remove every network fault, free filled disks, resume paused daemons, start
        stopped ones."""
        began = self.history.now()
        self._drain_counters()
        self.backend.heal()
        for host in self.backend.small_disks():
            if self.backend.disk_filled(host):
                self.free_disk(host)
        for host in self.hosts:
            if self.backend.daemon_running(host):
                self.backend.signal_daemon(host, signal.SIGCONT)
            else:
                self.backend.start_daemon(host)
        self.paused.clear()
        self._save()
        self.history.add("heal", began=began)

    def rotate_key(self, new: str | None = None) -> dict[str, Any]:
        """install, use, remove — the documented rotation, through one daemon's API."""
        return anyio.run(self._rotate_key, new or new_key(), backend="trio")

    async def _rotate_key(self, new: str) -> dict[str, Any]:
        via = next(h for h in self.hosts if self.backend.daemon_running(h))
        return await rotate_key(self, via, new)

    # ------------------------------------------------------------------ waiting

    def wait_ready(self, timeout: float = 60.0) -> float:
        return anyio.run(wait_ready, self, timeout, backend="trio")


async def call(
    cluster: Cluster, host: str, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    """One API call to ``host``'s daemon over its Unix socket."""
    async with Connection.open(cluster.socket(host), client="chaos", timeout=timeout) as conn:
        return await conn.call(op, args, timeout=timeout)


async def wait_ready(cluster: Cluster, timeout: float = 60.0) -> float:
    """Until every daemon answers and sees every host alive; returns the seconds it took."""
    start = time.monotonic()
    expected = set(cluster.hosts)
    with anyio.fail_after(timeout):
        while True:
            ok = True
            for host in cluster.hosts:
                if not cluster.backend.daemon_running(host):
                    raise ChaosError(
                        f"meshd on {host} exited:\n{cluster.backend.log_text(host)[-2000:]}"
                    )
                try:
                    members = await call(cluster, host, "members", timeout=2.0)
                except MeshError:
                    ok = False
                    break
                if {m["name"] for m in members if m["status"] == "alive"} != expected:
                    ok = False
                    break
            if ok:
                return time.monotonic() - start
            await anyio.sleep(0.2)


async def wait_majority(cluster: Cluster, timeout: float = 90.0, kind: str = "counter") -> float:
    """Until every daemon says keep_majority agents may run on its side (``placement``'s
    ``majority``): placement starts them only after a stable majority view, so a workload
    that starts earlier would only measure that wait. Returns the seconds it took."""
    start = time.monotonic()
    with anyio.fail_after(timeout):
        while True:
            answers = []
            for host in cluster.hosts:
                try:
                    where = await call(
                        cluster, host, "placement", {"kind": kind, "name": f"{kind}/probe"}, 2.0
                    )
                    answers.append(bool(where.get("majority")))
                except MeshError:
                    answers.append(False)
            if all(answers):
                return time.monotonic() - start
            await anyio.sleep(0.25)


async def rotate_key(cluster: Cluster, via: str, new: str) -> dict[str, Any]:
    """Rotate the gossip key on every member the documented way — install NEW, use NEW,
    remove the old primary — through ``via``'s daemon, recording how many members
    acknowledged each step (the checker wants every step on every member)."""
    steps: dict[str, Any] = {}
    old = cluster.key
    for op, key in (("install", new), ("use", new), ("remove", old)):
        result = await call(cluster, via, "keys", {"op": op, "key": key}, timeout=15)
        steps[op] = {
            "members": result["members"],
            "acknowledged": result["acknowledged"],
            "failed": {m: r.get("error") for m, r in result["results"].items() if not r.get("ok")},
        }
    cluster.key = new
    cluster._save()
    out = {"via": via, "steps": steps}
    cluster.history.add("fault", action="rotate_key", args=out)
    return out
