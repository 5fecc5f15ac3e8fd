"""The typed, validated configuration model.

Everything the daemon reads from files, environment or flags ends up in these frozen
dataclasses; nothing downstream parses strings. Durations are seconds (floats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class DnsSeed:
    """A seed given as ``dns:NAME[:PORT]``: NAME's SRV records (each gives a host and its
    port), or, when it has none, its A and AAAA records with ``port``. Looked up at join time
    and before every retry, so the list follows DNS (a Kubernetes headless Service)."""

    name: str
    port: int = 7946


Seed = Address | DnsSeed


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class MembershipTuning:
    """SWIM/Lifeguard timing and sizing (memberlist's names, in seconds)."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    # The probe timeout adapts to each peer's measured round trip (srtt + 4 rttvar, as TCP's
    # retransmission timeout), between this floor and ``probe_timeout``. Equal: no adaptation.
    probe_timeout_min: float = 0.1
    indirect_checks: int = 3
    # Relays for a target whose direct path is measured lossy (growing with the loss, all of
    # them from 30 % on), and for the probe that checks someone else's suspicion.
    indirect_checks_max: int = 6
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    # What independent confirmations bring a suspicion down to, × max(1, log10 n) seconds
    # (memberlist: suspicion_mult × probe_interval, the fallback when this is 0). The maximum
    # (an unconfirmed suspicion) stays suspicion_max_timeout_mult × memberlist's minimum.
    suspicion_min_timeout: float = 2.0
    # A member seen unresponsive for s seconds while alive (a late ack, a late refutation)
    # keeps its suspicions open for at least suspicion_stall_mult × s; 0 turns this off.
    suspicion_stall_mult: int = 2
    # Half-life of that observed stall: old evidence fades.
    stall_memory: float = 600.0
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_dead: float = 30.0
    push_pull_interval: float = 30.0
    awareness_max_multiplier: int = 8
    tcp_timeout: float = 10.0
    tcp_fallback_probe: bool = True
    # A refused TCP fallback probe (RST: the host answers but nothing listens at the member's
    # address) is proof the process is gone; declare it dead without waiting out suspicion.
    refused_is_dead: bool = True
    # Probe a member as soon as someone else suspects it, so that independent confirmations
    # (Lifeguard) arrive within one probe timeout instead of one round-robin pass.
    accelerate_confirmations: bool = True
    reconnect_interval: float = 30.0
    reconnect_timeout: float = 24 * 3600.0
    left_reclaim: float = 24 * 3600.0
    join_retry_min: float = 1.0
    join_retry_max: float = 30.0
    leave_timeout: float = 5.0
    udp_packet_size: int = 1400
    max_members: int = 65536

    def validate(self, prefix: str = "membership") -> None:
        positive = (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "push_pull_interval",
            "tcp_timeout",
            "reconnect_interval",
            "join_retry_min",
            "join_retry_max",
            "leave_timeout",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{prefix}.{name}", "must be > 0")
        if self.probe_timeout >= self.probe_interval:
            raise ConfigError(f"{prefix}.probe_timeout", "must be less than probe_interval")
        if not 0 < self.probe_timeout_min <= self.probe_timeout:
            raise ConfigError(f"{prefix}.probe_timeout_min", "must be > 0 and <= probe_timeout")
        if not self.indirect_checks <= self.indirect_checks_max <= 16:
            raise ConfigError(
                f"{prefix}.indirect_checks_max", "must be between indirect_checks and 16"
            )
        for name in ("suspicion_min_timeout", "stall_memory"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", "must be >= 0")
        if not 0 <= self.suspicion_stall_mult <= 64:
            raise ConfigError(f"{prefix}.suspicion_stall_mult", "must be between 0 and 64")
        for name in ("indirect_checks", "gossip_nodes"):
            if not 0 <= getattr(self, name) <= 16:
                raise ConfigError(f"{prefix}.{name}", "must be between 0 and 16")
        if not 1 <= self.suspicion_mult <= 64:
            raise ConfigError(f"{prefix}.suspicion_mult", "must be between 1 and 64")
        if not 1 <= self.suspicion_max_timeout_mult <= 64:
            raise ConfigError(f"{prefix}.suspicion_max_timeout_mult", "must be between 1 and 64")
        if not 1 <= self.retransmit_mult <= 64:
            raise ConfigError(f"{prefix}.retransmit_mult", "must be between 1 and 64")
        if not 1 <= self.awareness_max_multiplier <= 64:
            raise ConfigError(f"{prefix}.awareness_max_multiplier", "must be between 1 and 64")
        if not 512 <= self.udp_packet_size <= 65000:
            raise ConfigError(f"{prefix}.udp_packet_size", "must be between 512 and 65000")
        if self.join_retry_min > self.join_retry_max:
            raise ConfigError(f"{prefix}.join_retry_min", "must not exceed join_retry_max")
        if not 2 <= self.max_members <= 1_000_000:
            raise ConfigError(f"{prefix}.max_members", "must be between 2 and 1000000")
        for name in ("gossip_to_dead", "reconnect_timeout", "left_reclaim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", "must be >= 0")


@dataclass(frozen=True, slots=True)
class PlacementTuning:
    """Agent lifecycle timing (docs/lifecycle.md), in seconds."""

    # How long a view must hold before keep_majority agents start, and how long a silent host
    # must be gone before the majority takes over its keep_majority agents (Akka's default).
    stable_after: float = 20.0
    # How long the members alive here must lack a majority before keep_majority agents stop:
    # rides out a member briefly suspected, far below ``stable_after``.
    stop_after: float = 3.0
    # The keep_majority lease (docs/lifecycle.md#the-lease): a host runs and serves
    # keep_majority agents only while a majority of the reference membership answered one of
    # its pings sent within the last ``lease`` seconds; it pings every member up each
    # ``lease_renew`` seconds while it serves such a kind. The majority takes over a silent
    # host's agents once it has not seen the host alive for ``lease + lease_margin``.
    lease: float = 2.0
    lease_renew: float = 0.4
    # Covers clock rate drift between hosts (monotonic clocks, never compared), the holder's
    # check granularity and in-flight packets at the moment of a cut.
    lease_margin: float = 0.5
    rebalance_batch: int = 8
    rebalance_interval: float = 1.0
    failover_parallelism: int = 16

    def validate(self, prefix: str = "placement") -> None:
        for name in ("stable_after", "stop_after", "rebalance_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{prefix}.{name}", "must be > 0")
        if not 0 < self.lease_renew <= self.lease / 2:
            raise ConfigError(
                f"{prefix}.lease_renew", "must be > 0 and at most half of placement.lease"
            )
        if not self.lease < self.stable_after:
            raise ConfigError(f"{prefix}.lease", "must be less than stable_after")
        if not 0 <= self.lease_margin <= self.lease:
            raise ConfigError(f"{prefix}.lease_margin", "must be between 0 and placement.lease")
        if self.stop_after >= self.stable_after:
            raise ConfigError(
                f"{prefix}.stop_after",
                "must be less than stable_after (stop fast, start slow: otherwise a side "
                "could start agents the other side has not yet stopped)",
            )
        for name in ("rebalance_batch", "failover_parallelism"):
            if not 1 <= getattr(self, name) <= 1024:
                raise ConfigError(f"{prefix}.{name}", "must be between 1 and 1024")


@dataclass(frozen=True, slots=True)
class StorageTuning:
    """The per-node store under ``node.data_dir`` (docs/replication.md#durability)."""

    # False keeps everything in memory only: nothing survives a restart (benchmarks only).
    enabled: bool = True
    # Group commit: a ``local`` write reaches the disk at most this long after it returned.
    # ``majority`` writes and ACKs do not wait for it: they ask for an fsync at once.
    sync_interval: float = 0.01
    # Bytes waiting for the disk before the store gives up on its log and recovers through a
    # snapshot (a disk that stalls must not grow memory without bound).
    max_pending: int = 64 << 20
    # A snapshot is written once the logs since the last one exceed this many bytes and the
    # last snapshot's size: restart time stays bounded by the size of the state.
    snapshot_min_log: int = 16 << 20
    snapshot_check: float = 1.0
    # Documents kept hot in memory as live pycrdt Docs (besides the registry's, always
    # hot); the others are kept encoded, about 1 KB each instead of 5-7 KB, and become hot
    # when read or written locally, the least recently used going back to their encoding.
    hot_documents: int = 1024

    def validate(self, prefix: str = "storage") -> None:
        if not 0 <= self.sync_interval <= 10:
            raise ConfigError(f"{prefix}.sync_interval", "must be between 0 and 10 seconds")
        if not 1 << 20 <= self.max_pending <= 1 << 34:
            raise ConfigError(f"{prefix}.max_pending", "must be between 1 MiB and 16 GiB")
        if not 1 << 16 <= self.snapshot_min_log <= 1 << 36:
            raise ConfigError(f"{prefix}.snapshot_min_log", "must be between 64 KiB and 64 GiB")
        if not self.snapshot_check > 0:
            raise ConfigError(f"{prefix}.snapshot_check", "must be > 0")
        if not 16 <= self.hot_documents <= 10_000_000:
            raise ConfigError(f"{prefix}.hot_documents", "must be between 16 and 10000000")


@dataclass(frozen=True, slots=True)
class ReplicationLimits:
    """Per-message bounds of anti-entropy repair (docs/replication.md#paging)."""

    # Documents per PAGE, SYNC or UPDATES message this node sends (vectors or updates).
    page_docs: int = 1000
    # Bytes of vectors or updates per such message; one larger update travels alone.
    page_bytes: int = 4 << 20
    # The most documents a message from a peer may carry; more is refused as malformed.
    # Keep it at or above every peer's page_docs.
    max_docs_per_message: int = 100_000

    def validate(self, prefix: str = "replication") -> None:
        if not 1 <= self.page_docs <= self.max_docs_per_message:
            raise ConfigError(f"{prefix}.page_docs", "must be between 1 and max_docs_per_message")
        if not 1 << 10 <= self.page_bytes <= 64 << 20:
            raise ConfigError(f"{prefix}.page_bytes", "must be between 1 KiB and 64 MiB")
        if not 1 <= self.max_docs_per_message <= 1_000_000:
            raise ConfigError(f"{prefix}.max_docs_per_message", "must be between 1 and 1000000")


@dataclass(frozen=True, slots=True)
class TransportTuning:
    """Bounds on the TCP listener (docs/protocol.md#tcp-streams)."""

    # Connections served at once; each peer holds up to four (two persistent links each way).
    max_connections: int = 8192
    # Of those, one-exchange connections (membership probes and push-pulls, key rotation).
    max_exchanges: int = 512
    # Connections whose header frame has not authenticated yet (anyone can open one).
    max_unauthenticated: int = 256
    # Bytes all unauthenticated connections together may have announced for their header.
    max_preauth_bytes: int = 64 << 10
    # How long an accepted connection has to send its header frame.
    header_timeout: float = 5.0

    def validate(self, prefix: str = "transport") -> None:
        if not 16 <= self.max_connections <= 1_000_000:
            raise ConfigError(f"{prefix}.max_connections", "must be between 16 and 1000000")
        if not 1 <= self.max_exchanges <= self.max_connections:
            raise ConfigError(
                f"{prefix}.max_exchanges", "must be between 1 and transport.max_connections"
            )
        if not 1 <= self.max_unauthenticated <= self.max_connections:
            raise ConfigError(
                f"{prefix}.max_unauthenticated",
                "must be between 1 and transport.max_connections",
            )
        if not 1024 <= self.max_preauth_bytes <= 1 << 30:
            raise ConfigError(f"{prefix}.max_preauth_bytes", "must be between 1 KiB and 1 GiB")
        if not 0 < self.header_timeout <= 600:
            raise ConfigError(f"{prefix}.header_timeout", "must be between 0 and 10 minutes")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    bind: Address = ("0.0.0.0", 7946)  # noqa: S104 (a cluster daemon listens on the LAN)
    advertise: Address | None = None
    seeds: tuple[Seed, ...] = ()
    # The DNS server ``dns:`` seeds ask (IP:PORT); None: the system's (/etc/resolv.conf).
    dns_resolver: Address | None = None
    tags: dict[str, str] = field(default_factory=dict)
    data_dir: str = "/var/lib/meshd"
    # Rejoin through the peers snapshot (<data_dir>/peers.json) written by the last run: its
    # addresses are tried as seeds, after the configured ones.
    rejoin: bool = True


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    # Base64 keys; the first is the primary (encrypting) key.
    keys: tuple[str, ...] = ()
    keyring_file: str | None = None
    label: str = ""
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class ApiConfig:
    socket: str = "/run/meshd/meshd.sock"
    mode: int = 0o660
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    # Sessions at once (connections past it get ``overloaded`` and are closed).
    max_sessions: int = 1024
    # Open streams (subscriptions, served agents, watches) per session and per daemon.
    max_streams: int = 16384
    max_streams_total: int = 65536
    # How long a frame whose length arrived may take to arrive whole.
    partial_frame_timeout: float = 30.0
    # Bytes all sessions together may hold of frames that have not arrived whole.
    max_buffered: int = 64 << 20

    def validate(self, prefix: str = "api") -> None:
        if not 1 <= self.max_sessions <= 1_000_000:
            raise ConfigError(f"{prefix}.max_sessions", "must be between 1 and 1000000")
        if not 1 <= self.max_streams <= 10_000_000:
            raise ConfigError(f"{prefix}.max_streams", "must be between 1 and 10000000")
        if not self.max_streams <= self.max_streams_total <= 10_000_000:
            raise ConfigError(
                f"{prefix}.max_streams_total", "must be between api.max_streams and 10000000"
            )
        if not 0 < self.partial_frame_timeout <= 3600:
            raise ConfigError(f"{prefix}.partial_frame_timeout", "must be between 0 and 1 hour")
        if not 1 << 20 <= self.max_buffered <= 1 << 36:
            raise ConfigError(f"{prefix}.max_buffered", "must be between 1 MiB and 64 GiB")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = False
    bind: Address = ("127.0.0.1", 9464)


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry spans, exported over OTLP/HTTP (protobuf) when ``endpoint`` is set.
    Without an endpoint nothing is imported or recorded (trace context still passes through
    to agents and other daemons)."""

    endpoint: str = ""  # e.g. http://collector:4318/v1/traces; "" = off
    service_name: str = "meshd"
    # Fraction of new traces recorded (a call that brings a sampled context is recorded).
    sample_ratio: float = 1.0
    # Spans held for export; more are dropped (and counted by the SDK) while the endpoint lags.
    max_queue: int = 2048
    export_timeout: float = 10.0

    def validate(self, prefix: str = "tracing") -> None:
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}.endpoint", "must be an http:// or https:// address")
        if len(self.endpoint) > 1024:
            raise ConfigError(f"{prefix}.endpoint", "must be at most 1024 characters")
        if not 0 < len(self.service_name) <= 128:
            raise ConfigError(f"{prefix}.service_name", "must be 1..128 characters")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError(f"{prefix}.sample_ratio", "must be between 0 and 1")
        if not 1 <= self.max_queue <= 1 << 20:
            raise ConfigError(f"{prefix}.max_queue", "must be between 1 and 1048576")
        if not 0 < self.export_timeout <= 300:
            raise ConfigError(f"{prefix}.export_timeout", "must be between 0 and 300 seconds")


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: Literal["logfmt", "json"] = "logfmt"


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig
    profile: str = "lan"
    membership: MembershipTuning = field(default_factory=MembershipTuning)
    placement: PlacementTuning = field(default_factory=PlacementTuning)
    storage: StorageTuning = field(default_factory=StorageTuning)
    replication: ReplicationLimits = field(default_factory=ReplicationLimits)
    transport: TransportTuning = field(default_factory=TransportTuning)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str | None = None  # path of the TOML file it came from, for SIGHUP reloads
    # Settings a higher layer (environment, flags) overrode, with where each value came from.
    overridden: tuple[str, ...] = ()
