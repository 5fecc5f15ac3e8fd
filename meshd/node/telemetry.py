"""Metrics collectors: turn the components' plain counters into Prometheus samples."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import trio

from meshd.api.server import ApiServer
from meshd.membership.core import Membership
from meshd.metrics.naming import stat_metric
from meshd.metrics.registry import MetricsRegistry, Sample
from meshd.placement.reminders import Reminders
from meshd.placement.service import Placement
from meshd.registry.registry import Registry
from meshd.replication.core import Replicator
from meshd.replication.driver import ReplicationDriver
from meshd.routing.breaker import BreakerState
from meshd.routing.driver import RoutingDriver
from meshd.state.compaction import Compactor
from meshd.storage.driver import StorageDriver
from meshd.transport.links import PeerLinks
from meshd.transport.stats import TransportStats
from meshd.wire.membership import Status
from meshd_client.protocol.errors import ErrorKind


def _counter(name: str, value: float, help_text: str, **labels: str) -> Sample:
    return Sample(name, value, tuple(labels.items()), "counter", help_text)


def _gauge(name: str, value: float, help_text: str, **labels: str) -> Sample:
    return Sample(name, value, tuple(labels.items()), "gauge", help_text)


def _rejected(layer: str, rejected: dict[str, int]) -> Iterator[Sample]:
    """A layer's rejected input, by reason (one family for every layer)."""
    for reason, n in rejected.items():
        yield _counter(
            "meshd_rejected_total",
            n,
            "Input rejected, by layer and reason.",
            layer=layer,
            reason=reason,
        )


@dataclass(slots=True)
class Sources:
    """Every component whose counters become samples (each read at scrape time)."""

    node_name: str
    started: float  # trio clock
    membership_core: Membership
    transport_stats: TransportStats
    api: ApiServer
    tracing_rejected: dict[str, int]
    replication_core: Replicator
    replication_driver: ReplicationDriver
    replication_links: PeerLinks
    registry: Registry
    compactor: Compactor
    routing_driver: RoutingDriver
    routing_links: PeerLinks
    placement: Placement
    reminders: Reminders
    storage: StorageDriver | None


def register(metrics: MetricsRegistry, node: Sources) -> None:
    def membership() -> Iterator[Sample]:
        core = node.membership_core
        counts = dict.fromkeys(Status, 0)
        for m in core.members():
            counts[m.status] += 1
        for status, n in counts.items():
            yield _gauge("meshd_members", n, "Members by status.", status=status.name.lower())
        yield _gauge("meshd_incarnation", core.incarnation, "This node's incarnation.")
        yield _gauge(
            "meshd_awareness_score",
            core.awareness.score,
            "Lifeguard local health score (0 is healthy).",
        )
        yield _gauge(
            "meshd_broadcast_queue",
            core.broadcast_backlog(),
            "Gossip items waiting to be transmitted.",
        )
        stats = core.stats
        for f in fields(stats):
            value = getattr(stats, f.name)
            if isinstance(value, int):
                yield _counter(
                    stat_metric("meshd_membership", f.name),
                    value,
                    f"Membership core counter: {f.name.replace('_', ' ')}.",
                )
        yield from _rejected("membership", stats.rejected)

    def transport() -> Iterator[Sample]:
        stats = node.transport_stats
        for f in fields(stats):
            value = getattr(stats, f.name)
            if isinstance(value, int):
                yield _counter(
                    stat_metric("meshd_transport", f.name),
                    value,
                    f"Transport counter: {f.name.replace('_', ' ')}.",
                )
        yield from _rejected("transport", stats.rejected)

    def api() -> Iterator[Sample]:
        stats = node.api.stats
        yield _counter("meshd_api_connections_total", stats.connections, "API connections.")
        yield _gauge("meshd_api_sessions", stats.active_sessions, "Open API sessions.")
        yield _counter("meshd_api_requests_total", stats.requests, "API requests.")
        # Every kind from the start (at 0), so a rate sees the first error of a kind too.
        for kind in sorted({*(k.value for k in ErrorKind), *stats.errors_by_kind}):
            yield _counter(
                "meshd_api_errors_total",
                stats.errors_by_kind.get(kind, 0),
                "API errors by kind.",
                kind=kind,
            )
        for op, histogram in sorted(stats.latency.items()):
            yield from histogram.samples(
                "meshd_api_request_duration_seconds",
                "Seconds from an API request's arrival to its answer, by op (not streams).",
                (("op", op),),
            )
        yield from _rejected("api", stats.rejected)
        # Malformed trace context in API requests (ignored: the request went on untraced).
        yield from _rejected("tracing", node.tracing_rejected)

    def process() -> Iterator[Sample]:
        yield _gauge(
            "meshd_uptime_seconds",
            trio.current_time() - node.started,
            "Seconds since the daemon started.",
        )
        try:
            with open("/proc/self/statm", encoding="ascii") as statm:
                rss_pages = int(statm.read().split()[1])
            import resource

            yield _gauge(
                "meshd_resident_memory_bytes",
                rss_pages * resource.getpagesize(),
                "Resident set size.",
            )
        except (OSError, ValueError, IndexError):
            pass

    def replication() -> Iterator[Sample]:
        core = node.replication_core
        registry_docs = core.store.kinds.get("reg", 0)
        yield _gauge("meshd_documents", registry_docs, "Replicated documents.", kind="registry")
        yield _gauge(
            "meshd_documents",
            len(core.store) - registry_docs,
            "Replicated documents.",
            kind="state",
        )
        yield _gauge(
            "meshd_registry_entries", len(node.registry), "Agent names that resolve (live winners)."
        )
        stats = core.stats
        for f in fields(stats):
            value = getattr(stats, f.name)
            if isinstance(value, int):
                yield _counter(
                    stat_metric("meshd_replication", f.name),
                    value,
                    f"Replication counter: {f.name.replace('_', ' ')}.",
                )
        yield from _rejected("replication", stats.rejected)
        yield from node.replication_driver.majority_wait.samples(
            "meshd_replication_majority_wait_seconds",
            "Seconds a majority write waited for a majority of the cluster to hold it.",
        )
        reg = node.registry.stats
        for f in fields(reg):
            yield _counter(
                stat_metric("meshd_registry", f.name),
                getattr(reg, f.name),
                f"Registry counter: {f.name.replace('_', ' ')}.",
            )
        compaction = node.compactor.stats
        for f in fields(compaction):
            yield _counter(
                stat_metric("meshd_compaction", f.name),
                getattr(compaction, f.name),
                f"State compaction counter: {f.name.replace('_', ' ')}.",
            )
        for channel, links in (
            ("replication", node.replication_links),
            ("routing", node.routing_links),
        ):
            for f in fields(links.stats):
                yield _counter(
                    stat_metric("meshd_links", f.name),
                    getattr(links.stats, f.name),
                    f"Peer link counter: {f.name.replace('_', ' ')}.",
                    channel=channel,
                )

    def agents() -> Iterator[Sample]:
        for prefix, stats, what in (
            ("meshd_routing", node.routing_driver.stats, "Routing"),
            ("meshd_placement", node.placement.stats, "Placement"),
        ):
            for f in fields(stats):
                value = getattr(stats, f.name)
                if isinstance(value, int):
                    yield _counter(
                        stat_metric(prefix, f.name),
                        value,
                        f"{what} counter: {f.name.replace('_', ' ')}.",
                    )
        states = dict.fromkeys(BreakerState, 0)
        for breaker in node.routing_driver.breakers.values():
            states[breaker.state] += 1
        for state, n in states.items():
            yield _gauge(
                "meshd_routing_breakers",
                n,
                "Circuit breakers (one per host called) by state.",
                state=state.value,
            )
        yield _gauge(
            "meshd_placement_majority",
            1 if node.placement.quorum.has_majority else 0,
            "1 if keep_majority agents may run on this side (it holds a majority).",
        )
        yield _gauge(
            "meshd_placement_lease",
            1 if node.placement.lease.check(trio.current_time()) else 0,
            "1 while this host holds its keep_majority lease (a majority answered lately).",
        )
        yield _counter(
            "meshd_reminders_fired_total",
            node.reminders.fired,
            "Reminders fired on this host (for agents it owned when they came due).",
        )
        yield _gauge(
            "meshd_agents_local",
            len(node.registry.entries(node=node.node_name)),
            "Agents registered on this host.",
        )

    def storage() -> Iterator[Sample]:
        driver = node.storage
        if driver is None:
            return
        store = driver.store
        yield _gauge("meshd_storage_healthy", 1 if store.healthy else 0, "1 if the log is trusted.")
        yield _gauge("meshd_storage_log_bytes", store.log_bytes, "Bytes logged since the snapshot.")
        yield _gauge("meshd_storage_snapshot_bytes", store.snapshot_bytes, "Newest snapshot size.")
        yield _gauge("meshd_storage_pending_bytes", store.pending_bytes, "Bytes waiting for disk.")
        yield _gauge(
            "meshd_storage_acks_held", node.replication_driver.acks_held, "ACKs awaiting fsync."
        )
        yield _counter("meshd_storage_commits_total", store.stats.commits, "Group commits.")
        yield _counter("meshd_storage_snapshots_total", store.stats.snapshots, "Snapshots written.")
        yield _counter(
            "meshd_storage_appended_bytes_total", store.stats.appended_bytes, "Bytes appended."
        )
        yield _counter(
            "meshd_storage_dropped_records_total",
            store.stats.dropped_records,
            "Changes not logged while the store was failing (the recovery snapshot covers them).",
        )
        for kind in ("disk_full", "io_error", "read_only", "permission", "backlog", "internal"):
            yield _counter(
                "meshd_storage_errors_total",
                store.stats.failures.get(kind, 0),
                "Storage write failures by kind.",
                kind=kind,
            )
        fsync = driver.fsync
        counts = fsync.counts or [0] * (len(fsync.bounds) + 1)
        running = 0
        help_text = "Latency of one group commit (write + fsync), seconds."
        for bound, count in zip(fsync.bounds, counts, strict=False):
            running += count
            yield Sample(
                "meshd_storage_fsync_seconds_bucket",
                running,
                (("le", repr(bound)),),
                "histogram",
                help_text,
            )
        yield Sample("meshd_storage_fsync_seconds_bucket", fsync.n, (("le", "+Inf"),), "histogram")
        yield Sample("meshd_storage_fsync_seconds_sum", fsync.total, (), "histogram")
        yield Sample("meshd_storage_fsync_seconds_count", fsync.n, (), "histogram")

    for collector in (membership, transport, api, process, replication, agents, storage):
        metrics.register(collector)
