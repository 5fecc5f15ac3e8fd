"""The composition root: builds every component from a Config and runs them in one nursery.

Nothing else in the daemon creates sockets, tasks or long-lived objects on its own; each
component receives what it needs here. Shutdown is structured: a leave (SIGTERM, SIGINT or
``meshctl leave``) announces itself, waits for the announcement to spread, then cancels the
nursery, which closes every socket.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import trio

from meshd import __version__
from meshd.api.server import ApiServer
from meshd.config.model import Config, ConfigError
from meshd.logs import configure_logging, kv
from meshd.membership.core import Membership
from meshd.membership.driver import MembershipDriver
from meshd.membership.snapshot import (
    PEERS_FILE,
    Peer,
    PeersSnapshot,
    SnapshotError,
    read_peers,
    rejoin_seeds,
)
from meshd.metrics.registry import MetricsRegistry
from meshd.metrics.server import serve_metrics
from meshd.node import (
    agent_ops,
    control,
    data_ops,
    lifecycle_ops,
    storage_ops,
    telemetry,
    tracing,
)
from meshd.node.discovery import SeedLookup
from meshd.node.keys import KeyService
from meshd.node.liveness import EPOCH_TAG, MembershipLiveness
from meshd.node.policy import ClusterPolicy
from meshd.node.tracing import Tracer
from meshd.placement.reminder_driver import ReminderDriver
from meshd.placement.reminders import Reminders
from meshd.placement.service import Placement
from meshd.registry.model import Entry
from meshd.registry.registry import DOC_PREFIX as REGISTRY_PREFIX
from meshd.registry.registry import Registry
from meshd.replication.core import DocEvent, ReplicationTuning, Replicator
from meshd.replication.driver import ReplicationDriver
from meshd.replication.replica import Replica
from meshd.routing.driver import RoutingDriver
from meshd.security.envelope import Envelope
from meshd.security.keyring import Keyring, KeyringError, parse_key
from meshd.state.compaction import CompactionTuning, Compactor, Rebase, rebase
from meshd.state.service import DOC_PREFIX as STATE_PREFIX
from meshd.state.service import StateService
from meshd.storage.driver import StorageDriver
from meshd.storage.files import OsFiles
from meshd.storage.store import Store
from meshd.systemd.notify import Notifier
from meshd.transport.links import PeerLinks
from meshd.transport.stats import TransportStats
from meshd.transport.streams import Channel, StreamServer
from meshd.transport.udp import PacketEndpoint
from meshd.wire.validate import Address

LEAVE_DRAIN_TIMEOUT = 15.0  # seconds a graceful leave spends moving agents away first
SNAPSHOT_AT_EXIT_TIMEOUT = 10.0  # seconds a graceful stop may spend on a snapshot

log = logging.getLogger("meshd.node")


@dataclass(slots=True)
class Sockets:
    udp: trio.socket.SocketType
    tcp: trio.socket.SocketType
    port: int


def load_keyring(config: Config) -> Keyring | None:
    """The keyring file wins once it exists (it holds rotations made at run time)."""
    sec = config.security
    if sec.insecure:
        return None
    try:
        if sec.keyring_file and os.path.exists(sec.keyring_file):
            return Keyring.load(sec.keyring_file)
        keyring = Keyring(parse_key(k) for k in sec.keys)
    except (KeyringError, OSError) as exc:
        raise ConfigError("security.keys", str(exc)) from None
    if sec.keyring_file:
        keyring.save(sec.keyring_file)
    return keyring


async def bind_sockets(host: str, port: int, attempts: int = 20) -> Sockets:
    """UDP and TCP on the same port (port 0: pick one free for both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError | None = None
    for _ in range(attempts if port == 0 else 1):
        udp = trio.socket.socket(family, socket.SOCK_DGRAM)
        tcp = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            await udp.bind((host, port))
            chosen = udp.getsockname()[1]
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await tcp.bind((host, chosen))
            tcp.listen(256)
            return Sockets(udp, tcp, chosen)
        except OSError as exc:
            udp.close()
            tcp.close()
            last = exc
    assert last is not None
    raise OSError(last.errno, f"cannot bind {host}:{port} (node.bind): {last.strerror}")


def advertise_address(config: Config, bound_port: int, seeds: list[Address]) -> Address:
    """Where others should reach us: the configured advertise address, else the bind address,
    else (bound to a wildcard) the local address of the route towards a seed."""
    node = config.node
    if node.advertise is not None:
        host, port = node.advertise
        return (host, port or bound_port)
    host = node.bind[0]
    if host not in ("0.0.0.0", "::"):  # noqa: S104
        return (host, bound_port)
    for seed in seeds:
        family = socket.AF_INET6 if ":" in seed[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(seed)  # UDP connect sends nothing; it only picks a route
                return (probe.getsockname()[0], bound_port)
            except OSError:
                continue
    try:
        return (socket.gethostbyname(socket.gethostname()), bound_port)
    except OSError:
        return ("127.0.0.1", bound_port)


def make_data_dir(path: str) -> None:
    """Create the data directory, and any missing parent, with mode 0700 (whatever the
    umask); an existing directory is left as it is. Raises ConfigError naming the key."""
    missing: list[str] = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o700)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise ConfigError("node.data_dir", f"{directory} is not a directory") from None
        except OSError as exc:
            raise ConfigError(
                "node.data_dir", f"cannot create {directory}: {exc.strerror or exc}"
            ) from None


def remembered_peers(path: str, me: str) -> list[Peer]:
    """The peers snapshot at ``path``, this node left out. A missing file means none; one
    that cannot be read or parsed is logged and ignored: it must never stop the daemon."""
    try:
        peers = read_peers(path)
    except (OSError, SnapshotError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning("ignoring the peers snapshot", extra=kv(file=path, error=reason))
        return []
    return [p for p in peers or () if p.name != me]


@dataclass(slots=True)
class Prepared:
    """What the machine gives a daemon before any component is built: its data directory,
    its bound sockets, its seeds (resolved, and remembered from the last run) and the address
    it advertises."""

    sockets: Sockets
    addr: Address
    seeds: list[Address]  # resolved now, then the remembered ones
    unresolved: list[str]  # configured seeds that gave no address yet
    seed_lookup: SeedLookup
    remembered: list[Peer]
    rejoin: list[Address]  # remembered addresses, tried after the seeds
    peers_file: str


async def prepare(config: Config) -> Prepared:
    """Create the data directory, read the peers snapshot, bind UDP and TCP, resolve the
    seeds and choose the advertised address."""
    make_data_dir(config.node.data_dir)
    peers_file = os.path.join(config.node.data_dir, PEERS_FILE)
    remembered = remembered_peers(peers_file, config.node.name) if config.node.rejoin else []
    rejoin = rejoin_seeds(remembered, random.Random())
    sockets = await bind_sockets(*config.node.bind)
    try:
        lookup = SeedLookup(config.node.seeds, config.node.dns_resolver)
        seeds, unresolved = await lookup.resolve()
        seeds += rejoin
        addr = advertise_address(config, sockets.port, seeds)
    except BaseException:
        sockets.udp.close()
        sockets.tcp.close()
        raise
    return Prepared(sockets, addr, seeds, unresolved, lookup, remembered, rejoin, peers_file)


class _Activations:
    """Routing's view of placement (:class:`~meshd.routing.ports.Activator`). The router is
    built before placement, which needs it; this hands routing's questions to the node's
    placement when they are asked."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def ensure_active(self, name: str, kind: str | None, deadline: float) -> Entry:
        return await self._node.placement.ensure_active(name, kind, deadline)

    def may_run(self, kind: str) -> bool:
        return self._node.placement.may_run(kind)

    async def activate_local(self, name: str, kind: str, deadline: float) -> Entry:
        return await self._node.placement.activate_local(name, kind, deadline)


class Node:
    """One meshd daemon."""

    def __init__(
        self,
        config: Config,
        prepared: Prepared,
        keyring: Keyring | None,
        *,
        reload: Callable[[], Config] | None = None,
        env: Mapping[str, str] | None = None,
        handle_signals: bool = True,
    ) -> None:
        """Build every component, in dependency order; nothing runs until :meth:`run`. Use
        :meth:`open` (it prepares the machine first)."""
        self.config = config
        self._reload = reload
        self.env = dict(os.environ if env is None else env)
        self.handle_signals = handle_signals
        self.notifier = Notifier.from_env(self.env, logger=log)
        self.started_wall = time.time()
        self.started_monotonic = trio.current_time()
        self.transport_stats = TransportStats()
        self.metrics = MetricsRegistry(logger=logging.getLogger("meshd.metrics"))
        self.keyring = keyring
        self.envelope = Envelope(self.keyring, config.security.label)
        self._stop = trio.Event()
        self.left_cleanly = False
        # Spans and OTLP export, only with [tracing] endpoint (None: off, nothing imported).
        self.tracer: Tracer | None = tracing.start(config.tracing, config.node.name)
        # API requests whose trace context was malformed (ignored), by reason.
        self.tracing_rejected: dict[str, int] = {}
        # The boot epoch: a restarted daemon's registry document supersedes its old one.
        self.epoch = int(time.time() * 1000)
        self.prepared = prepared
        self.rejoin = prepared.rejoin  # remembered addresses, tried after the seeds
        self.seed_lookup = prepared.seed_lookup
        self.port = prepared.sockets.port
        packets = PacketEndpoint(
            prepared.sockets.udp,
            self.envelope,
            self.transport_stats,
            config.membership.udp_packet_size,
            logging.getLogger("meshd.transport"),
        )
        self.membership_core = Membership(
            name=config.node.name,
            addr=prepared.addr,
            tuning=config.membership,
            rng=random.Random(),
            now=trio.current_time(),
            tags={**config.node.tags, EPOCH_TAG: str(self.epoch)},
            packet_budget=packets.payload_budget,
        )
        self.membership_driver = MembershipDriver(
            self.membership_core,
            packets,
            self.envelope,
            self.transport_stats,
            logging.getLogger("meshd.membership"),
        )
        self.peers = PeersSnapshot(
            prepared.peers_file,
            self.membership_core.members,
            config.node.name,
            logging.getLogger("meshd.membership"),
            remembered=prepared.remembered,
            forget_after=config.membership.reconnect_timeout,
        )
        self.membership_driver.listeners.append(self.peers.on_member_event)
        self.keys = KeyService(
            self.keyring,
            config.security.keyring_file,
            self.envelope,
            self.transport_stats,
            self.membership_core.members,
            config.node.name,
            logging.getLogger("meshd.keys"),
        )
        self.storage: StorageDriver | None = None  # storage.enabled: built with the data layer
        self._build_data_layer()
        transport = config.transport
        self.streams = StreamServer(
            self.envelope,
            self.transport_stats,
            logging.getLogger("meshd.transport"),
            header_timeout=transport.header_timeout,
            max_connections=transport.max_connections,
            max_exchanges=transport.max_exchanges,
            max_unauthenticated=transport.max_unauthenticated,
            max_preauth_bytes=transport.max_preauth_bytes,
        )
        self.streams.register(Channel.MEMBERSHIP, self.membership_driver.serve_stream)
        self.streams.register(Channel.KEYRING, self.keys.serve_stream)
        self.streams.register(Channel.REPLICATION, self.replication_links.serve, persistent=True)
        self.streams.register(Channel.ROUTING, self.routing_links.serve, persistent=True)
        self.api = ApiServer(
            config.api.socket,
            config.node.name,
            logging.getLogger("meshd.api"),
            mode=config.api.mode,
            allow_uids=config.api.allow_uids,
            allow_gids=config.api.allow_gids,
            max_sessions=config.api.max_sessions,
            max_streams=config.api.max_streams,
            max_streams_total=config.api.max_streams_total,
            partial_frame_timeout=config.api.partial_frame_timeout,
            max_buffered=config.api.max_buffered,
        )
        control.DaemonOps(
            control.DaemonView(
                config=config,
                membership=self.membership_core,
                keyring=self.keyring,
                transport=self.transport_stats,
                routing=self.routing_driver.stats,
                documents=lambda: len(self.replication_core.store),
                storage=self.storage,
                tracing=self.tracer is not None,
                tracing_rejected=self.tracing_rejected,
                started=self.started_monotonic,
                wall_time=self.wall_time,
            ),
            self.api,
            self.request_leave,
        ).register()
        control.MemberOps(self.membership_driver, self.wall_time).register(self.api)
        control.KeyOps(self.keys).register(self.api)
        data_ops.RegistryOps(self.registry, self.replication_driver.wait).register(self.api)
        data_ops.StateOps(
            self.state, self.replication_driver.store, self.tracer, self.tracing_rejected
        ).register(self.api)
        agent_ops.AgentOps(
            self.routing_driver, self.registry, self.placement, self.tracer, self.tracing_rejected
        ).register(self.api)
        lifecycle_ops.PlacementOps(
            config.node.name, self.placement, self.routing_driver, self.membership_core
        ).register(self.api)
        lifecycle_ops.ReminderOps(self.reminders).register(self.api)
        storage_ops.StorageOps(
            self.storage,
            self.replication_driver.store,
            lambda: self.replication_driver.acks_held,
            config.storage.sync_interval,
        ).register(self.api)
        telemetry.register(
            self.metrics,
            telemetry.Sources(
                node_name=config.node.name,
                started=self.started_monotonic,
                membership_core=self.membership_core,
                transport_stats=self.transport_stats,
                api=self.api,
                tracing_rejected=self.tracing_rejected,
                replication_core=self.replication_core,
                replication_driver=self.replication_driver,
                replication_links=self.replication_links,
                registry=self.registry,
                compactor=self.compactor,
                routing_driver=self.routing_driver,
                routing_links=self.routing_links,
                placement=self.placement,
                reminders=self.reminders,
                storage=self.storage,
            ),
        )

    @classmethod
    async def open(
        cls,
        config: Config,
        *,
        reload: Callable[[], Config] | None = None,
        env: Mapping[str, str] | None = None,
        handle_signals: bool = True,
    ) -> Node:
        """Check the keys, prepare the machine (:func:`prepare`), and build the daemon."""
        if config.security.insecure:
            log.warning(
                "RUNNING WITHOUT ENCRYPTION: gossip is neither encrypted nor authenticated "
                "(--insecure); anyone who can reach this port can join and inject state"
            )
        keyring = load_keyring(config)  # a bad key fails before anything is bound
        prepared = await prepare(config)
        try:
            return cls(
                config, prepared, keyring, reload=reload, env=env, handle_signals=handle_signals
            )
        except BaseException:
            prepared.sockets.udp.close()
            prepared.sockets.tcp.close()
            raise

    @property
    def node_name(self) -> str:
        """This daemon's member name (``node.name``)."""
        return self.config.node.name

    def wall_time(self, monotonic: float) -> float:
        """Convert a core timestamp (trio clock) to Unix time, for display."""
        return time.time() - (trio.current_time() - monotonic)

    def request_leave(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> int:
        config = self.config
        sockets = self.prepared.sockets
        seeds, unresolved = self.prepared.seeds, self.prepared.unresolved
        addr = self.prepared.addr
        peers_file, remembered = self.prepared.peers_file, self.prepared.remembered
        await self._recover()
        log.info(
            "meshd starting",
            extra=kv(
                node=config.node.name,
                version=__version__,
                addr=f"{addr[0]}:{addr[1]}",
                profile=config.profile,
                encrypted=self.keyring is not None,
                socket=config.api.socket,
            ),
        )
        if self.rejoin:
            log.info(
                "rejoining through the peers snapshot",
                extra=kv(file=peers_file, remembered=len(remembered), tried=len(self.rejoin)),
            )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    trio.serve_listeners, self.streams.handle, [trio.SocketListener(sockets.tcp)]
                )
                await nursery.start(self.membership_driver.run)
                await nursery.start(self.peers.run)
                if self.storage is not None:
                    await nursery.start(self.storage.run)
                await nursery.start(self.replication_links.run)
                await nursery.start(self.replication_driver.run)
                await nursery.start(self.routing_links.run)
                await nursery.start(self.routing_driver.run)
                await nursery.start(self.placement.run)
                await nursery.start(self.reminder_driver.run)
                self.registry.open_own()
                self._follow_dns()
                self.membership_core.start(trio.current_time(), seeds)
                await self.membership_driver.flush()
                self.policy.members_changed()
                nursery.start_soon(self._registry_upkeep)
                await nursery.start(self.api.serve)
                if config.metrics.enabled:
                    port = await nursery.start(serve_metrics, self.metrics, *config.metrics.bind)
                    log.info("metrics endpoint", extra=kv(addr=f"{config.metrics.bind[0]}:{port}"))
                if unresolved and not self.seed_lookup.follows_dns:
                    nursery.start_soon(self._resolve_later)
                if self.handle_signals:
                    nursery.start_soon(self._signals)
                nursery.start_soon(self._announce_ready)
                nursery.start_soon(self.notifier.run_watchdog, self._healthy)
                task_status.started(self)
                # Everything built at start-up lives as long as the daemon: keep it out of
                # the collector's way, and collect young objects less often (fewer pauses
                # on the request path; measured full collections took 13-18 ms).
                gc.collect()
                gc.freeze()
                gc.set_threshold(5000, 20, 20)
                await self._stop.wait()
                await self._leave()
                if self.storage is not None:
                    await self._snapshot_before_exit(self.storage)
                if self.storage is not None and not await self.storage.drain():
                    log.error(
                        "storage: not everything reached the disk before exit",
                        extra=kv(error=self.storage.last_error or "timeout"),
                    )
                nursery.cancel_scope.cancel()
        finally:
            sockets.udp.close()
            if self.storage is not None:
                self.storage.store.close()
            if self.tracer is not None:
                self.tracer.shutdown()  # exports what is queued, within tracing.export_timeout
        return 0

    async def _snapshot_before_exit(self, storage: StorageDriver) -> None:
        """A graceful stop whose logs hold more changes than there are documents writes a
        snapshot first (bounded), so the next start reads each document once."""
        if storage.store.log_records <= len(self.replication_core.store) or not storage.writable:
            return
        with trio.move_on_after(SNAPSHOT_AT_EXIT_TIMEOUT):
            await storage.snapshot()

    async def _recover(self) -> None:
        """Read this node's store back before anything is heard from a peer: a restarted
        daemon serves what it held at once, and anti-entropy merges what it missed."""
        if self.storage is None:
            log.warning(
                "STORAGE DISABLED (storage.enabled = false): state lives in memory only and "
                "nothing survives a restart"
            )
            return
        store = self.storage.store
        started = time.perf_counter()
        recovered = await trio.to_thread.run_sync(store.recover)
        loaded = self.replication_driver.load(
            (name, history.epoch, history.updates) for name, history in recovered.docs.items()
        )
        if recovered.torn is not None:
            log.warning(
                "store: cut a torn tail (an unfinished write)", extra=kv(tail=recovered.torn)
            )
        log.info(
            "store recovered",
            extra=kv(
                directory=store.directory,
                documents=loaded,
                refused=len(recovered.docs) - loaded,
                snapshot=recovered.snapshot or "none",
                logs=len(recovered.logs),
                bytes=recovered.bytes_read,
                seconds=round(time.perf_counter() - started, 3),
            ),
        )

    def _build_data_layer(self) -> None:
        """Replication, the registry and shared state, wired to membership."""
        name = self.node_name
        self.replication_core = Replicator(
            node=name,
            tuning=ReplicationTuning(
                page_docs=self.config.replication.page_docs,
                page_bytes=self.config.replication.page_bytes,
                max_docs_per_message=self.config.replication.max_docs_per_message,
                hot_documents=self.config.storage.hot_documents,
            ),
            rng=random.Random(),
            now=trio.current_time(),
            accept=self._accept_doc,
            on_replaced=self._on_replaced,
        )
        tuning = self.config.storage
        if tuning.enabled:
            store = Store(
                OsFiles(),
                os.path.join(self.config.node.data_dir, "store"),
                max_pending=tuning.max_pending,
                snapshot_min_log=tuning.snapshot_min_log,
            )
            self.storage = StorageDriver(
                store,
                tuning,
                logging.getLogger("meshd.storage"),
                names=lambda: [r.name for r in self.replication_core.store],
                encode=self._encode_doc,
                count=lambda: len(self.replication_core.store),
            )
        self.replication_driver = ReplicationDriver(
            self.replication_core, logging.getLogger("meshd.replication"), self.storage
        )
        self.replication_links = PeerLinks(
            Channel.REPLICATION,
            name,
            self.envelope,
            self.transport_stats,
            self._peer_address,
            self.replication_driver.receive,
            logging.getLogger("meshd.links"),
        )
        self.replication_driver.attach(self.replication_links)
        self.registry = Registry(
            node=name,
            epoch=self.epoch,
            docs=self.replication_driver,
            liveness=MembershipLiveness(self.membership_core),
            wall_ms=lambda: int(time.time() * 1000),
        )
        self.replication_core.on_open = self.registry.on_open
        self.replication_core.on_drop = self.registry.on_drop
        self.state = StateService(self.replication_driver)
        self.compactor = Compactor(
            self.replication_driver, CompactionTuning(), self._coordinates, STATE_PREFIX
        )
        self.replication_driver.doc_listeners.append(self._on_doc_event)
        self.replication_driver.report_listeners.append(
            lambda report: self.compactor.on_report(report, trio.current_time())
        )
        self._rebases: dict[str, Rebase] = {}
        self.routing_driver = RoutingDriver(
            node=name,
            registry=self.registry,
            docs=self.replication_driver,
            membership=self.membership_core,
            log=logging.getLogger("meshd.routing"),
            activator=_Activations(self),
            tracer=self.tracer,
        )
        self.routing_links = PeerLinks(
            Channel.ROUTING,
            name,
            self.envelope,
            self.transport_stats,
            self._peer_address,
            self.routing_driver.receive,
            logging.getLogger("meshd.links"),
            on_connect=self.routing_driver.link_status,
            on_disconnect=self.routing_driver.link_lost,
        )
        self.routing_driver.attach_links(self.routing_links)
        self.replication_driver.doc_listeners.append(self.routing_driver.on_doc_event)
        self.placement = Placement(
            node=name,
            membership=self.membership_core,
            registry=self.registry,
            docs=self.replication_driver,
            host=self.routing_driver,
            tuning=self.config.placement,
            log=logging.getLogger("meshd.placement"),
            catch_up=self.replication_driver.catch_up,
            renew_lease=self.membership_driver.renew_lease,
            failover_span=self.tracer.failover_span if self.tracer is not None else None,
        )
        self.replication_driver.doc_listeners.append(self.placement.on_doc_event)
        self.reminders = Reminders(self.replication_driver, lambda: list(self.routing_driver.local))
        self.reminder_driver = ReminderDriver(
            self.reminders, self.routing_driver.call, logging.getLogger("meshd.reminders")
        )
        self.policy = ClusterPolicy(
            node_name=name,
            membership=self.membership_core,
            replication=self.replication_driver,
            links=(self.replication_links, self.routing_links),
            routing=self.routing_driver,
            registry=self.registry,
            placement=self.placement,
            clock=trio.current_time,
            rng=random.Random(),
            log=log,
        )
        self.registry.listeners.append(self.policy.on_registry_event)
        self.membership_driver.listeners.append(self.policy.on_member_event)

    def _encode_doc(self, name: str) -> tuple[int, bytes] | None:
        replica = self.replication_core.store.get(name)
        return None if replica is None else (replica.epoch, replica.full_update())

    def _coordinates(self) -> bool:
        """The live member with the lowest name coordinates compaction."""
        up = [m.name for m in self.membership_core.members() if m.status.up]
        return min(up) == self.node_name

    def _on_replaced(self, old: Replica, new: Replica) -> None:
        if new.name.startswith(STATE_PREFIX):
            found = rebase(old, new)
            if found is not None:
                self._rebases[new.name] = found

    def _on_doc_event(self, event: DocEvent) -> None:
        now = trio.current_time()
        self.compactor.on_doc_event(event, now)
        found = self._rebases.pop(event.name, None) if event.kind == "replaced" else None
        if found is not None:
            # Writes that raced a compaction: re-apply them to the new epoch.
            replica = self.replication_core.store.get(event.name)
            epoch = replica.epoch if replica is not None else 0
            self.compactor.stats.rebases += 1
            log.info(
                "rebasing writes onto a compacted document",
                extra=kv(
                    doc=event.name,
                    sets=len(found.sets),
                    deletes=len(found.deletes),
                    counters=len(found.slots),
                ),
            )
            self.replication_driver.write(now, event.name, found.apply, epoch=epoch)

    def _accept_doc(self, name: str, epoch: int) -> bool:
        if name.startswith(REGISTRY_PREFIX):
            return self.registry.accept(name, epoch)
        return name.startswith(STATE_PREFIX)

    def _peer_address(self, peer: str) -> Address | None:
        member = self.membership_core.member(peer)
        if member is None or not member.status.up:
            return None
        return member.addr

    async def _registry_upkeep(self) -> None:
        while True:
            await trio.sleep(5)
            now = trio.current_time()
            self.policy.members_changed()  # joined, reaped: catch what no event announced
            self.registry.tick(now)
            self.compactor.tick(now)

    async def _announce_ready(self) -> None:
        await self.membership_driver.joined.wait()
        self.policy.members_changed()  # the table is the cluster's now: majorities can be counted
        members = self.membership_core.alive_count
        self.notifier.ready(f"joined; {members} members alive")
        log.info("ready", extra=kv(members=members))

    def _healthy(self) -> bool:
        # The watchdog task runs on the same event loop, so a blocked loop already stops the
        # pings; also require the membership timers to be firing.
        stale_after = 5 * self.membership_core.awareness.scale(
            self.config.membership.probe_interval
        )
        return trio.current_time() - self.membership_driver.last_tick < stale_after

    async def _leave(self) -> None:
        self.notifier.stopping()
        # Before anything else: members that leave from now on (a whole cluster stopping)
        # stay in the snapshot, so that they find each other again when they come back.
        await self.peers.close()
        # Hand the placed agents over first, one by one with their state, as `meshctl
        # drain` does (bounded: whatever has not moved fails over once the leave is heard).
        moving = self.placement.start_drain()
        if moving:
            log.info("draining before leaving", extra=kv(agents=moving))
            with trio.move_on_after(LEAVE_DRAIN_TIMEOUT):
                while self.placement.moves_pending():
                    await trio.sleep(0.05)
        log.info("leaving the cluster")
        # Peers re-activate this host's agents as soon as they hear of the leave, without
        # waiting out a partition's stable_after: so from now on none of them runs here.
        self.routing_driver.leaving = True
        spread = await self.membership_driver.leave()
        self.left_cleanly = True
        log.info("left", extra=kv(confirmed_spread=spread))

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("signal received", extra=kv(signal=signal.Signals(signum).name))
                    self._stop.set()

    async def _lookup_seeds(self) -> list[Address]:
        """The membership driver's seed resolver: the seeds as they resolve now, then the
        remembered peers."""
        resolved, _ = await self.seed_lookup.resolve()
        return resolved + self.rejoin

    def _follow_dns(self) -> None:
        """With dns: seeds, the core looks them up again before every join attempt."""
        follows = self.seed_lookup.follows_dns
        self.membership_core.resolves_seeds = follows
        self.membership_driver.seed_resolver = self._lookup_seeds if follows else None

    async def _resolve_later(self) -> None:
        """Seeds given by host name that did not resolve at start (a container not up yet);
        dns: seeds need none of this: they are looked up before every join attempt."""
        lookup = self.seed_lookup
        while lookup is self.seed_lookup:
            await trio.sleep(self.config.membership.join_retry_max)
            if lookup is not self.seed_lookup:
                return  # reloaded with other seeds
            resolved, failed = await lookup.resolve()
            if resolved:
                self.membership_core.set_seeds(resolved + self.rejoin)
                self.membership_core.join(trio.current_time())
                await self.membership_driver.flush()
            if not failed:
                return

    async def reload(self) -> list[str]:
        """SIGHUP: re-read the configuration and apply what can change at run time."""
        if self._reload is None:
            return []
        self.notifier.reloading()
        try:
            new = self._reload()
        except (ConfigError, OSError) as exc:
            log.error("reload failed; keeping the running configuration", extra=kv(error=str(exc)))
            self.notifier.ready()
            return []
        applied: list[str] = []
        old = self.config
        if (new.log.level, new.log.format) != (old.log.level, old.log.format):
            configure_logging(new.log.level, new.log.format)
            applied.append("log")
        if new.node.tags != old.node.tags:
            await self.membership_driver.set_tags(dict(new.node.tags))
            applied.append("node.tags")
        if (new.node.seeds, new.node.dns_resolver) != (old.node.seeds, old.node.dns_resolver):
            self.seed_lookup = SeedLookup(new.node.seeds, new.node.dns_resolver)
            self._follow_dns()
            seeds, _ = await self.seed_lookup.resolve()
            self.membership_core.set_seeds(seeds + self.rejoin)
            applied.append("node.seeds")
        needs_restart = [
            name
            for name, a, b in (
                ("node.name", old.node.name, new.node.name),
                ("node.bind", old.node.bind, new.node.bind),
                ("node.advertise", old.node.advertise, new.node.advertise),
                ("node.data_dir", old.node.data_dir, new.node.data_dir),
                ("node.rejoin", old.node.rejoin, new.node.rejoin),
                ("membership", old.membership, new.membership),
                ("security", old.security, new.security),
                ("api", old.api, new.api),
                ("transport", old.transport, new.transport),
                ("metrics", old.metrics, new.metrics),
            )
            if a != b
        ]
        self.config = replace(
            old,
            log=new.log,
            node=replace(
                old.node,
                tags=new.node.tags,
                seeds=new.node.seeds,
                dns_resolver=new.node.dns_resolver,
            ),
        )
        log.info(
            "configuration reloaded",
            extra=kv(
                applied=",".join(applied) or "nothing",
                needs_restart=",".join(needs_restart) or "nothing",
            ),
        )
        self.notifier.ready()
        return applied
