"""The checker: invariants judged from a history alone. Pure — no I/O, no clock.

Each invariant is a function of the recorded events (:mod:`chaos.history`) returning a
:class:`Check`. They are deliberately strict: an invariant that had nothing to judge (no
acknowledged write, no conflict where the scenario staged one) fails too, because a check
that cannot fail proves nothing. ``tests/chaos/test_checker.py`` feeds fabricated histories
with a lost write, a double delivery, a crash and so on, and asserts each is caught.

The invariants:

* ``membership`` — after the heal, every daemon reports the same membership view, in which
  exactly the running daemons are alive, within the scenario's bound;
* ``documents`` — every daemon holds the same registry and state documents (the digest of
  every document's epoch and state vector is equal everywhere);
* ``majority_writes`` — every acknowledged ``majority`` write is present, with its value,
  on every daemon; the majority counter is at least the acknowledged increments and at most
  all attempted ones; nothing appears that was never written;
* ``local_writes`` — every acknowledged ``local`` write is present everywhere, unless its
  host was killed, stopped or restarted after the write (then it may be lost: that is what
  ``local`` means);
* ``exactly_once`` — every acknowledged at-least-once request was handled exactly once
  (its per-message counter in the agent's state is 1), an unacknowledged one at most once;
* ``duplicate_names`` — names registered on both sides of a partition resolve to the same
  entry on every daemon after the heal, the winner runs, every loser stopped with
  ``name_conflict`` naming that winner;
* ``no_crash`` — no daemon exited unless we killed or stopped it (and a stopped one exited
  0); no log holds a traceback;
* ``rejections`` — on every daemon, UDP datagrams in = datagrams handled + datagrams
  rejected with a reason; the junk the collector sent was counted exactly; no rejection
  reason appears that the scenario's faults do not explain;
* ``signals`` — no subscriber received a signal twice, and none that was never published;
* ``expectations`` — scenario-specific facts: who must (not) have been declared dead,
  that a key rotation reached every member.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chaos.faults import partition_groups
from chaos.history import FAIL, OK, Event, observation, of_type

KILL_CODES = (-9, 137, None)  # SIGKILL: Popen reports -9, Docker 128 + 9
STOP_CODES = (0, None)  # a graceful leave exits 0 (None: not our child, unknowable)
PROCESS_ENDS = ("kill", "stop", "restart", "rolling_restart", "kill_all")
UDP_REASONS = frozenset(
    {
        "empty",
        "unknown_mode",
        "plaintext_refused",
        "encrypted_refused",
        "unknown_key",
        "auth_failed",
        "label_mismatch",
        "malformed",
        "oversized",
    }
)

# Rejection counters a fault explains, and the fault actions that do. Anything a daemon
# rejects that is not listed here (or in the scenario's ``expect.rejections``) fails the
# ``rejections`` invariant: it means a peer sent something broken, not that a link failed.
NETWORK_FAULTS = frozenset({"partition", "one_way", "bridge", "isolate", "loss"})
PROCESS_FAULTS = frozenset({"kill", "pause", "stop", "restart", "kill_all"})
DISK_FAULTS = frozenset({"fill_disk"})
EXPLAINED: dict[str, frozenset[str]] = {
    # An anti-entropy answer that arrives after the initiator gave up on the round (it was
    # delayed by a cut link, lost packets or a stopped peer) or for a round the restarted
    # initiator never started.
    "replication/unexpected_round": NETWORK_FAULTS | PROCESS_FAULTS,
    # A peer that opened a stream but did not finish its exchange within the channel's
    # deadline: its packets were lost or cut, or it was stopped half-way.
    "transport/stream_timeout": NETWORK_FAULTS | PROCESS_FAULTS,
    # A connection that ended before its first (or a whole) frame: the dialer gave up on a
    # cut link and closed it, or its connect completed only after the heal, or it died.
    "transport/stream_closed": NETWORK_FAULTS | PROCESS_FAULTS,
    # A connection cut (or its peer stopped) between connecting and naming its channel, or
    # reset half-way through an exchange.
    "transport/stream_header_timeout": NETWORK_FAULTS | PROCESS_FAULTS,
    "transport/stream_broken": NETWORK_FAULTS | PROCESS_FAULTS,
    # A registry document of a restarted node's previous boot epoch, pushed by a peer that
    # had not yet learned the new epoch (docs/replication.md: refused by policy).
    "replication/doc_refused": PROCESS_FAULTS,
}


# The error kinds a write (or increment) may fail with, and the faults that explain each.
# Any other kind, or one of these without its fault, fails ``write_errors``.
WRITE_ERRORS: dict[str, frozenset[str]] = {
    # No majority in time: members cut off, or dead (they count until reaped or removed).
    "timeout": NETWORK_FAULTS | PROCESS_FAULTS,
    # The daemon went away under the client (killed, stopped, restarting), or had not
    # joined its cluster again yet.
    "unreachable": PROCESS_FAULTS,
    "closed": PROCESS_FAULTS,
    # No answer within the harness's bound: the daemon was paused.
    "harness_timeout": frozenset({"pause"}),
    # The store refused the change: its disk was full.
    "overloaded": DISK_FAULTS,
}


def explained(events: Iterable[Event]) -> set[str]:
    """The ``layer/reason`` counters that the faults in this history explain."""
    actions = {e.get("action") for e in of_type(events, "fault")}
    return {reason for reason, by in EXPLAINED.items() if actions & by}


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "summary": self.summary, "details": self.details}


@dataclass(slots=True)
class Verdict:
    scenario: str
    seed: int | None
    checks: list[Check]
    lost_writes: int = 0
    duplicate_deliveries: int = 0
    converge_s: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None
    writes: dict[str, WriteTally] = field(default_factory=dict)  # per durability

    @property
    def lost_majority(self) -> int:
        tally = self.writes.get("majority")
        return tally.lost + tally.applied_lost if tally else 0

    @property
    def lost_local(self) -> int:
        """Acknowledged ``local`` writes gone, allowed (their daemon was ended) or not."""
        tally = self.writes.get("local")
        return tally.lost + tally.lost_excused if tally else 0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "passed": self.ok,
            "lost_writes": self.lost_writes,
            "lost_majority_writes": self.lost_majority,
            "lost_local_writes": self.lost_local,
            "duplicate_deliveries": self.duplicate_deliveries,
            "converge_s": self.converge_s,
            "duration_s": self.duration_s,
            "writes": {d: t.to_json() for d, t in self.writes.items()},
            "stats": self.stats,
            "checks": [c.to_json() for c in self.checks],
        }


# ---------------------------------------------------------------------------- helpers


def _meta(events: list[Event]) -> Event:
    return next(of_type(events, "meta"), {})


def _ops(events: Iterable[Event], op: str) -> list[Event]:
    return [e for e in of_type(events, "op") if e.get("op") == op]


def _missing(name: str, what: str) -> Check:
    return Check(name, False, f"no {what} observation recorded: cannot judge")


def _state(events: list[Event]) -> dict[str, dict[str, Any]]:
    obs = observation(events, "state")
    return obs.get("docs", {}) if obs else {}


def _limit(items: Iterable[Any], n: int = 10) -> list[Any]:
    return list(items)[:n]


# ---------------------------------------------------------------------------- invariants


def check_membership(events: list[Event]) -> tuple[Check, float | None]:
    """One view after every recovery (timed from the heal, resume or start that began it)
    and, at the end, one view on every daemon in which exactly the running ones are alive."""
    name = "membership"
    timed = [
        e
        for e in of_type(events, "observe")
        if e.get("what") == "convergence" and not e.get("interrupted")
    ]
    final = observation(events, "membership")
    if not timed or final is None:
        return _missing(name, "membership"), None
    meta = _meta(events)
    views: dict[str, Any] = final.get("views", {})
    alive = sorted(final.get("alive", []))
    problems: list[str] = []
    elapsed: float | None = None
    for conv in timed:
        after, took, bound = conv.get("after", "heal"), conv.get("elapsed"), conv.get("bound")
        if not conv.get("converged"):
            problems.append(
                f"no single view within {bound} s of the {after} at {conv.get('since')} s"
            )
        elif took is not None and bound is not None and took > bound:
            problems.append(f"one view {took} s after the {after}, bound {bound} s")
        if took is not None:
            elapsed = max(elapsed or 0.0, took)
    if meta.get("expect", {}).get("all_running", True):
        down = sorted(set(meta.get("hosts", alive)) - set(alive))
        if down:
            problems.append(f"daemons not running after the heal: {', '.join(down)}")
    errors = {h: v["error"] for h, v in views.items() if "error" in v}
    if errors:
        problems.append(f"no answer from {errors}")
    distinct = {repr(sorted(v.items())) for h, v in views.items() if h not in errors}
    if len(distinct) > 1:
        problems.append(f"{len(distinct)} different views")
    if set(views) != set(alive):
        problems.append(f"views from {sorted(views)}, running {alive}")
    for host, view in views.items():
        if host in errors:
            continue
        seen_alive = sorted(m for m, (status, _inc) in view.items() if status == "alive")
        if seen_alive != alive:
            problems.append(f"{host} sees alive {seen_alive}, running {alive}")
    details = {
        "recoveries": [
            {k: c.get(k) for k in ("after", "since", "elapsed", "converged")} for c in timed
        ],
        "views": views,
    }
    if problems:
        return Check(name, False, "; ".join(_limit(problems, 4)), details), elapsed
    summary = f"one view, {len(alive)} alive; slowest recovery {elapsed} s"
    return Check(name, True, summary, details), elapsed


def check_documents(events: list[Event]) -> Check:
    name = "documents"
    obs = observation(events, "digests")
    if obs is None:
        return _missing(name, "digests")
    hosts: dict[str, Any] = obs.get("hosts", {})
    alive = set((observation(events, "membership") or {}).get("alive", hosts))
    problems: list[str] = []
    errors = {h: v["error"] for h, v in hosts.items() if "error" in v}
    if errors:
        problems.append(f"no digest from {errors}")
    good = {h: v for h, v in hosts.items() if h not in errors}
    if set(hosts) != alive:
        problems.append(f"digests from {sorted(hosts)}, running {sorted(alive)}")
    if not good:
        problems.append("no digests")
    digests = {v["digest"] for v in good.values()}
    if len(digests) > 1:
        problems.append(f"{len(digests)} different store digests")
        names = set().union(*(v["docs"] for v in good.values()))
        differ = sorted(
            n for n in names if len({repr(v["docs"].get(n)) for v in good.values()}) > 1
        )
        problems.append(f"documents that differ: {', '.join(_limit(differ, 8))}")
    elif good and len({repr(sorted(v["docs"].items())) for v in good.values()}) > 1:
        problems.append("equal store digests but different document lists")
    count = len(next(iter(good.values()))["docs"]) if good else 0
    details = {"elapsed_s": obs.get("elapsed"), "documents": count}
    if problems:
        return Check(name, False, "; ".join(problems), details)
    return Check(name, True, f"{count} documents identical on {len(good)} daemons", details)


def _process_ends(events: list[Event]) -> dict[str, list[float]]:
    """When each host's daemon was ended on purpose (kill, stop, restart)."""
    ends: dict[str, list[float]] = defaultdict(list)
    for e in of_type(events, "fault"):
        if e.get("action") in PROCESS_ENDS:
            args = e.get("args", {})
            for host in args.get("hosts", [args.get("host")]):
                if host:
                    ends[host].append(float(e.get("t", 0.0)))
    return ends


@dataclass(slots=True)
class WriteTally:
    """What happened to the writes of one durability (the verdict's ``writes``)."""

    attempted: int = 0
    acknowledged: int = 0
    lost: int = 0  # acknowledged, and gone from some daemon: a failure
    lost_excused: int = 0  # ``local`` only: gone, but its daemon was ended after the write
    applied_lost: int = 0  # answered "applied here, majority not reached", and gone
    errors: dict[str, int] = field(default_factory=dict)  # unacknowledged, by error kind

    def to_json(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "acknowledged": self.acknowledged,
            "lost": self.lost,
            "lost_excused": self.lost_excused,
            "applied_lost": self.applied_lost,
            "errors": dict(sorted(self.errors.items())),
        }


def _applied(e: Event) -> bool:
    """A write the daemon answered with its own majority verdict (``timeout`` carrying
    acked/needed/total): the change is applied on that daemon and spreads from there."""
    return e.get("error") == "timeout" and "needed" in (e.get("detail") or {})


def _window_events(events: list[Event]) -> list[Event]:
    return sorted(
        (e for e in events if e.get("type") in ("fault", "heal")),
        key=lambda e: float(e.get("t", 0.0)),
    )


def minority_windows(events: list[Event]) -> dict[str, list[tuple[float, float]]]:
    """When each host was cut off from a majority of the cluster by a partition (``isolate``,
    ``partition``, ``bridge``): (from, to) in history seconds. A window opens when the fault
    is in place and closes when its removal began, so a write that lies inside it could not
    have reached a majority by any network path."""
    hosts: list[str] = _meta(events).get("hosts", [])
    need = len(hosts) // 2 + 1
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    since: dict[str, float] = {}
    for e in _window_events(events):
        action = e.get("action") if e.get("type") == "fault" else "heal"
        args = e.get("args", {})
        if action in ("partition", "isolate", "bridge"):
            if action == "isolate":
                named, via = [[args.get("host")]], []
            elif action == "bridge":
                named, via = [args.get("a", []), args.get("b", [])], list(args.get("via", []))
            else:
                named, via = list(args.get("groups", [])), []
            try:
                groups = partition_groups(hosts, named, via) or []
            except ValueError:
                continue
            cut = {h for g in groups for h in g if h not in via and len(g) + len(via) < need}
        elif action in ("heal_network", "heal"):
            cut = set()
        else:
            continue
        began = float(e.get("began", e.get("t")) or 0.0)
        for host in [h for h in since if h not in cut]:
            out[host].append((since.pop(host), began))
        for host in cut - set(since):
            since[host] = float(e.get("t", 0.0))
    for host, t in since.items():
        out[host].append((t, math.inf))
    return out


def _inside(e: Event, windows: list[tuple[float, float]]) -> bool:
    return any(a <= e.get("t0", -1.0) and e.get("t1", math.inf) <= b for a, b in windows)


def _disk_faults(events: list[Event]) -> set[str]:
    return {
        e.get("args", {}).get("host")
        for e in of_type(events, "fault")
        if e.get("action") in DISK_FAULTS
    }


def check_writes(events: list[Event], durability: str) -> tuple[Check, WriteTally]:
    """Acknowledged writes of ``durability`` present on every daemon (for ``local`` ones
    whose daemon was ended afterwards, a loss is counted but allowed); for ``majority``:
    none acknowledged through a host cut off from a majority, and every write the daemon
    reported applied (a majority ``timeout``) present everywhere too."""
    name = f"{durability}_writes"
    state = _state(events)
    writes = [e for e in _ops(events, "write") if e.get("durability") == durability]
    incrs = [e for e in _ops(events, "incr") if e.get("durability") == durability]
    tally = WriteTally(attempted=len(writes) + len(incrs))
    for e in writes + incrs:
        if e.get("outcome") != OK:
            kind = str(e.get("error"))
            tally.errors[kind] = tally.errors.get(kind, 0) + 1
    if not writes and not incrs:
        return Check(name, False, f"no {durability} writes were attempted: nothing tested"), tally
    if not state:
        return _missing(name, "state"), tally
    ends = _process_ends(events)
    disks = _disk_faults(events)
    lost: list[str] = []
    excused_lost: list[str] = []
    applied_lost: list[str] = []
    cut_off: list[Event] = []
    excused = 0
    problems: list[str] = []
    acked = [e for e in writes if e.get("outcome") == OK]
    tally.acknowledged = len(acked) + sum(1 for e in incrs if e.get("outcome") == OK)
    if not acked and writes:
        problems.append(f"none of {len(writes)} {durability} writes was acknowledged")
    attempted: dict[str, set[str]] = defaultdict(set)
    for e in writes:
        attempted[e["doc"]].add(e["key"])

    def missing_on(e: Event) -> str | None:
        per_host = state.get(e["doc"], {})
        if not per_host:
            return "document not read"
        for host, value in per_host.items():
            if not isinstance(value, dict) or value.get(e["key"]) != e["value"]:
                got = value.get(e["key"]) if isinstance(value, dict) else value
                return f"on {host}: {got}"
        return None

    for e in acked:
        ended = any(t > e["t1"] for t in ends.get(e["host"], []))
        excuse = durability == "local" and ended
        excused += excuse
        where = missing_on(e)
        if where is not None:
            line = f"{e['key']} (acked via {e['host']} at {e['t1']} s) {where}"
            (excused_lost if excuse else lost).append(line)
    if durability == "majority":
        for e in writes:
            if not _applied(e):
                continue
            ended = any(t > e["t1"] for t in ends.get(e["host"], []))
            where = missing_on(e)
            if where is not None and not (e["host"] in disks and ended):
                applied_lost.append(f"{e['key']} (applied on {e['host']} at {e['t1']} s) {where}")
        windows = minority_windows(events)
        n_hosts = len(_meta(events).get("hosts", []))
        cut_off = [e for e in writes + incrs if _inside(e, windows.get(e["host"], []))]
        cut_acked = [
            f"{e['key']} via {e['host']} at {e['t0']}–{e['t1']} s, acked by "
            f"{(e.get('result') or {}).get('acked')}"
            for e in cut_off
            if e.get("outcome") == OK
            # unless members were reaped or removed meanwhile (a smaller cluster)
            and int((e.get("result") or {}).get("total") or n_hosts) >= n_hosts
        ]
        if cut_acked:
            problems.append(
                f"{len(cut_acked)} majority writes acknowledged through a host cut off from "
                f"a majority: {cut_acked[0]}"
            )
    for e in writes:
        if e.get("outcome") == FAIL:
            for host, value in state.get(e["doc"], {}).items():
                if isinstance(value, dict) and e["key"] in value:
                    problems.append(f"{e['key']} was refused ({e.get('error')}) yet is on {host}")
                    break
    for doc, keys in attempted.items():
        for host, value in state.get(doc, {}).items():
            if not isinstance(value, dict):
                continue
            phantom = sorted(
                k for k in value if k not in keys and not (incrs and k == incrs[0]["key"])
            )
            if phantom:
                problems.append(f"{doc} on {host} holds keys never written: {phantom[:5]}")
                break
    lost_incr = 0
    if incrs:
        doc, key = incrs[0]["doc"], incrs[0]["key"]
        ok_n = sum(1 for e in incrs if e.get("outcome") == OK)
        applied_n = sum(1 for e in incrs if _applied(e))
        maybe_n = sum(1 for e in incrs if e.get("outcome") != FAIL)
        if ok_n == 0:
            problems.append(f"none of {len(incrs)} increments was acknowledged")
        for host, value in state.get(doc, {}).items():
            got = value.get(key, 0) if isinstance(value, dict) else None
            if not isinstance(got, int):
                problems.append(f"counter {doc}/{key} on {host} reads {got!r}")
            elif got < ok_n:
                lost_incr = max(lost_incr, ok_n - got)
                lost.append(f"{doc}/{key} on {host} is {got}, {ok_n} increments acknowledged")
            elif got < ok_n + applied_n:
                applied_lost.append(
                    f"{doc}/{key} on {host} is {got}: {ok_n} increments acknowledged and "
                    f"{applied_n} reported applied"
                )
            elif got > maybe_n:
                problems.append(f"{doc}/{key} on {host} is {got}, only {maybe_n} attempted")
    lost_count = len([x for x in lost if "increments acknowledged" not in x]) + lost_incr
    tally.lost = lost_count
    tally.lost_excused = len(excused_lost)
    tally.applied_lost = len(applied_lost)
    details = {
        "acknowledged": len(acked),
        "attempted": len(writes),
        "increments_acknowledged": sum(1 for e in incrs if e.get("outcome") == OK),
        "excused": excused,
        "lost": _limit(lost, 20),
        "lost_excused": _limit(excused_lost, 20),
        "applied_lost": _limit(applied_lost, 20),
        "errors": dict(sorted(tally.errors.items())),
        "cut_off": len(cut_off),
    }
    if applied_lost:
        problems.insert(
            0,
            f"{len(applied_lost)} writes the daemon reported applied (majority timeout) are "
            f"gone: {applied_lost[0]}",
        )
    if lost:
        problems.insert(0, f"{lost_count} acknowledged {durability} writes lost: {lost[0]}")
    if problems:
        return Check(name, False, "; ".join(problems), details), tally
    summary = f"{len(acked)}/{len(writes)} writes acknowledged, all present everywhere"
    if incrs:
        summary += f"; counter ≥ {details['increments_acknowledged']} acknowledged increments"
    if excused:
        summary = (
            f"{len(acked)}/{len(writes)} writes acknowledged; {excused} of them excused (host "
            f"ended afterwards), of which {len(excused_lost)} lost (allowed); every other one "
            "present everywhere"
        )
    applied = sum(1 for e in writes if _applied(e))
    if applied:
        summary += f"; {applied} reported applied (timeout), all present"
    if cut_off:
        summary += f"; {len(cut_off)} through a host cut off from a majority, none acknowledged"
    return Check(name, True, summary, details), tally


def check_write_errors(events: list[Event]) -> Check | None:
    """Every write that was not acknowledged failed with an error kind the scenario's faults
    explain (WRITE_ERRORS): ``overloaded`` only with a full disk, ``timeout`` only with a
    partition or a dead member, ``unreachable`` only when a daemon went away, ..."""
    name = "write_errors"
    ops = [e for e in of_type(events, "op") if e.get("op") in ("write", "incr")]
    if not ops:
        return None
    actions = {e.get("action") for e in of_type(events, "fault")}
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for e in ops:
        if e.get("outcome") != OK:
            kinds[str(e.get("durability"))][str(e.get("error"))] += 1
    seen = Counter[str]()
    for per in kinds.values():
        seen.update(per)
    unexplained = sorted(k for k in seen if not actions & WRITE_ERRORS.get(k, frozenset()))
    details = {"errors": {d: dict(sorted(c.items())) for d, c in sorted(kinds.items())}}
    if unexplained:
        first = {
            k: next(e for e in ops if e.get("outcome") != OK and str(e.get("error")) == k)
            for k in unexplained
        }
        return Check(
            name,
            False,
            "errors no fault explains: "
            + ", ".join(
                f"{k}={seen[k]} (first: {first[k].get('id')} via {first[k].get('host')})"
                for k in unexplained
            ),
            details,
        )
    if not seen:
        return Check(name, True, "every write acknowledged", details)
    text = "; ".join(
        f"{d}: " + ", ".join(f"{k} {n}" for k, n in sorted(c.items()))
        for d, c in sorted(kinds.items())
    )
    return Check(name, True, f"every error explained by a fault ({text})", details)


def check_storage(events: list[Event]) -> Check:
    """Every store healthy at the end; for every filled disk: the daemon noticed, refused
    every write while full (``overloaded``), kept answering reads and membership calls,
    and trusted its disk again within the bound once the space came back."""
    name = "storage"
    final = observation(events, "storage")
    if final is None:
        return _missing(name, "storage")
    problems: list[str] = []
    facts: list[str] = []
    hosts: dict[str, Any] = final.get("hosts", {})
    sick = {
        h: v.get("error") or v.get("failure")
        for h, v in sorted(hosts.items())
        if "error" in v or (v.get("enabled", True) and not v.get("healthy"))
    }
    if sick:
        problems.append(f"stores not healthy at the end: {sick}")
    elif hosts:
        facts.append(f"{len(hosts)} stores healthy at the end")
    else:
        problems.append("no store was asked")
    disks = {
        e["host"]: e
        for e in of_type(events, "observe")
        if e.get("what") == "disk" and e.get("host")
    }
    frees = defaultdict(list)
    for e in of_type(events, "fault"):
        if e.get("action") == "free_disk":
            frees[e["args"]["host"]].append(float(e["t"]))
    writes = [e for e in of_type(events, "op") if e.get("op") in ("write", "incr")]
    details: dict[str, Any] = {"final": hosts, "disks": {}}
    for host in sorted(h for h in _disk_faults(events) if h):
        obs = disks.get(host)
        if obs is None:
            # Filled by hand (`chaos fill-disk`): only `chaos run` watches a full disk; the
            # store's health at the end is all there is to judge.
            facts.append(f"{host}: disk filled by hand, not watched")
            continue
        noticed, freed, recovered = obs.get("noticed"), obs.get("freed"), obs.get("recovered")
        free_t = min(
            (t for t in frees.get(host, []) if noticed is None or t >= noticed), default=None
        )
        reads = dict(obs.get("reads", {}))
        calls = dict(obs.get("members", {}))
        full = [
            e
            for e in writes
            if e.get("host") == host
            and noticed is not None
            and e.get("t0", -1.0) >= noticed
            and e.get("t1", math.inf) <= (free_t if free_t is not None else math.inf)
        ]
        refused = sum(
            1 for e in full if e.get("outcome") == FAIL and e.get("error") == "overloaded"
        )
        details["disks"][host] = {
            "noticed": noticed,
            "freed": freed,
            "recovered": recovered,
            "recovery_s": round(recovered - freed, 3) if recovered and freed else None,
            "failures": obs.get("failures"),
            "reads": reads,
            "members": calls,
            "writes_while_full": len(full),
            "refused": refused,
        }
        if noticed is None:
            problems.append(f"{host}: its disk was filled, but its store never reported a failure")
            continue
        if "disk_full" not in obs.get("failures", {}):
            problems.append(f"{host}: the store failed with {obs.get('failures')}, not disk_full")
        if set(reads) - {"ok", "not_found"}:
            problems.append(f"{host}: reads failed while its disk was full: {reads}")
        if set(calls) - {"ok"}:
            problems.append(f"{host}: membership calls failed while its disk was full: {calls}")
        if recovered is None:
            problems.append(
                f"{host}: its store was not healthy again within {obs.get('bound')} s of the "
                "space coming back"
            )
        acked = [e for e in full if e.get("outcome") == OK]
        if acked:
            problems.append(
                f"{host}: {len(acked)} writes acknowledged while its disk was full: "
                f"{acked[0].get('id')} at {acked[0].get('t1')} s"
            )
        other = Counter(str(e.get("error")) for e in full if e.get("outcome") != OK)
        other.pop("overloaded", None)
        if other:
            problems.append(f"{host}: writes failed with {dict(other)} instead of overloaded")
        if _meta(events).get("workload", True) and not full:
            problems.append(f"{host}: no write went through it while its disk was full")
        if recovered is not None and freed is not None:
            facts.append(
                f"{host}: full after {round(noticed - obs.get('since', noticed), 2)} s, "
                f"{refused}/{len(full)} writes refused (overloaded), "
                f"{reads.get('ok', 0) + reads.get('not_found', 0)} reads answered, healthy "
                f"{round(recovered - freed, 1)} s after the space came back"
            )
    if problems:
        return Check(name, False, "; ".join(_limit(problems, 4)), details)
    return Check(name, True, "; ".join(facts), details)


def check_exactly_once(events: list[Event]) -> tuple[Check, int, int]:
    """Returns (check, lost requests, duplicate deliveries)."""
    name = "exactly_once"
    requests = _ops(events, "request")
    if not requests:
        return Check(name, False, "no at-least-once requests were made: nothing tested"), 0, 0
    state = _state(events)
    by_agent: dict[str, list[Event]] = defaultdict(list)
    for e in requests:
        by_agent[e["agent"]].append(e)
    lost: list[str] = []
    dups: list[str] = []
    problems: list[str] = []
    duplicate_count = 0
    acked_total = sum(1 for e in requests if e.get("outcome") == OK)
    for agent, reqs in sorted(by_agent.items()):
        per_host = state.get(f"agent:{agent}")
        if not per_host:
            problems.append(f"state of {agent} not read")
            continue
        values = list(per_host.values())
        if any(not isinstance(v, dict) or "$error" in v for v in values):
            problems.append(f"state of {agent} unreadable on some daemon: {per_host}")
            continue
        if any(v != values[0] for v in values):
            problems.append(f"state of {agent} differs between daemons")
        value = values[0]
        log = value.get("handled")
        if not isinstance(log, list):
            problems.append(f"{agent}: no handled list in its state ({value})")
            continue
        times = Counter(log)
        ids = {e["id"] for e in reqs}
        for e in reqs:
            n = times.get(e["id"], 0)
            if e.get("outcome") == OK and n == 0:
                lost.append(f"{e['id']} to {agent} (acked at {e['t1']} s) was never handled")
            if n > 1:
                dups.append(f"{e['id']} to {agent} took effect {n} times ({e.get('outcome')})")
                duplicate_count += n - 1
        phantom = sorted(set(times) - ids)
        if phantom:
            problems.append(f"{agent} handled ids nobody sent: {phantom[:5]}")
        if value.get("count") != len(log):
            problems.append(f"{agent}: count {value.get('count')} != {len(log)} handled")
    if acked_total == 0:
        problems.append(f"none of {len(requests)} requests was acknowledged")
    details = {
        "requests": len(requests),
        "acknowledged": acked_total,
        "lost": _limit(lost, 20),
        "duplicates": _limit(dups, 20),
    }
    if lost:
        problems.insert(0, f"{len(lost)} acknowledged requests handled zero times: {lost[0]}")
    if dups:
        problems.insert(0, f"{len(dups)} requests handled more than once: {dups[0]}")
    if problems:
        return Check(name, False, "; ".join(problems), details), len(lost), duplicate_count
    summary = f"{acked_total}/{len(requests)} acknowledged, each handled exactly once"
    return Check(name, True, summary, details), 0, 0


def check_duplicate_names(events: list[Event]) -> Check | None:
    name = "duplicate_names"
    registrations = _ops(events, "register")
    expected = set(_meta(events).get("expect", {}).get("conflicts", []))
    if not registrations and not expected:
        return None
    obs = observation(events, "duplicates")
    if obs is None:
        return _missing(name, "duplicate-name")
    lookups: dict[str, dict[str, Any]] = obs.get("lookups", {})
    agents: dict[str, dict[str, Any]] = obs.get("agents", {})
    problems: list[str] = []
    resolved: dict[str, Any] = {}
    names = sorted({e["name"] for e in registrations} | expected)
    for n in names:
        ok_regs = [e for e in registrations if e["name"] == n and e.get("outcome") == OK]
        if n in expected and len(ok_regs) < 2:
            problems.append(
                f"{n}: the scenario staged a conflict but {len(ok_regs)} registration(s) "
                "succeeded, so nothing was tested"
            )
        seen = lookups.get(n, {})
        answers = {repr(v) for v in seen.values()}
        if not seen or len(answers) != 1:
            problems.append(f"{n}: daemons resolve it differently: {seen}")
            continue
        winner = next(iter(seen.values()))
        if "error" in winner:
            problems.append(f"{n}: does not resolve after the heal ({winner['error']})")
            continue
        resolved[n] = winner
        ours = agents.get(n, {})
        winners = [h for h, a in ours.items() if a.get("entry_id") == winner["entry_id"]]
        if ok_regs and not winners:
            problems.append(f"{n}: resolves to {winner}, which none of our agents registered")
        for host, a in ours.items():
            if a.get("entry_id") == winner["entry_id"]:
                if not a.get("running"):
                    problems.append(f"{n}: the winner on {host} stopped ({a.get('stop_reason')})")
                continue
            if a.get("stop_reason") != "name_conflict":
                problems.append(
                    f"{n}: the loser on {host} was not notified "
                    f"(running={a.get('running')}, stop_reason={a.get('stop_reason')})"
                )
            elif (a.get("winner") or {}).get("entry_id") != winner["entry_id"]:
                problems.append(f"{n}: the loser on {host} was told {a.get('winner')}")
    details = {"resolved": resolved, "agents": agents}
    if problems:
        return Check(name, False, "; ".join(_limit(problems, 4)), details)
    return Check(
        name, True, f"{len(names)} name(s) resolved the same everywhere, losers notified", details
    )


def check_no_crash(events: list[Event]) -> Check:
    name = "no_crash"
    obs = observation(events, "processes")
    if obs is None:
        return _missing(name, "process")
    problems: list[str] = []
    exits = obs.get("exits", [])
    for e in exits:
        cause, code = e.get("cause"), e.get("code")
        if cause == "crash":
            problems.append(f"meshd on {e['host']} (pid {e['pid']}) exited by itself, code {code}")
        elif cause == "kill" and code not in KILL_CODES:
            problems.append(f"{e['host']}: killed, yet exit status {code}")
        elif cause == "stop" and code not in STOP_CODES:
            problems.append(f"{e['host']}: graceful stop exited {code} (pid {e['pid']})")
    if _meta(events).get("expect", {}).get("all_running", True):
        down = sorted(h for h, up in obs.get("running", {}).items() if not up)
        if down:
            problems.append(f"not running at the end: {', '.join(down)}")
    logs = obs.get("logs", {})
    traced = {h: v["tracebacks"] for h, v in logs.items() if v.get("tracebacks")}
    if traced:
        problems.append(f"tracebacks in the logs: {traced}")
    details = {
        "exits": exits,
        "error_lines": {h: v.get("error_count", 0) for h, v in logs.items()},
        "first_errors": {h: v.get("errors", [])[:3] for h, v in logs.items() if v.get("errors")},
    }
    if problems:
        return Check(name, False, "; ".join(_limit(problems, 4)), details)
    ended = Counter(e.get("cause") for e in exits)
    summary = "no crash" + (f" ({dict(ended)} on purpose)" if ended else "")
    return Check(name, True, summary, details)


def _udp_rejected(counters: dict[str, Any]) -> int:
    return sum(
        n
        for key, n in counters.get("rejected", {}).items()
        if key.startswith("transport/") and key.split("/", 1)[1] in UDP_REASONS
    )


def check_rejections(events: list[Event], allowed: Iterable[str]) -> Check:
    name = "rejections"
    obs = observation(events, "rejections")
    if obs is None:
        return _missing(name, "rejection-counter")
    injected: dict[str, int] = obs.get("injected", {})
    allow = set(allowed) | {f"transport/{r}" for r in injected}
    problems: list[str] = []
    reasons: Counter[str] = Counter()
    hosts: dict[str, Any] = obs.get("hosts", {})
    if not hosts:
        problems.append("no daemon was scraped")
    for host, pair in sorted(hosts.items()):
        before, after = pair.get("before") or {}, pair.get("after") or {}
        if "error" in before or "error" in after or not after:
            problems.append(
                f"{host}: metrics unavailable ({before.get('error') or after.get('error')})"
            )
            continue
        for label, counters in (("before", before), ("after", after)):
            handled, rejected = counters["handled_in"], _udp_rejected(counters)
            if counters["udp_in"] != handled + rejected:
                problems.append(
                    f"{host} ({label} junk): {counters['udp_in']} datagrams in, {handled} "
                    f"handled + {rejected} rejected: "
                    f"{counters['udp_in'] - handled - rejected} unexplained"
                )
        for reason, sent in injected.items():
            key = f"transport/{reason}"
            got = after["rejected"].get(key, 0) - before["rejected"].get(key, 0)
            if got != sent:
                problems.append(f"{host}: sent {sent} junk datagrams ({reason}), {got} counted")
        reasons.update(after.get("rejected", {}))
    unexplained = sorted(r for r in reasons if r not in allow)
    if unexplained:
        problems.append(
            "rejections no fault explains: " + ", ".join(f"{r}={reasons[r]}" for r in unexplained)
        )
    details = {"reasons": dict(reasons), "allowed": sorted(allow), "injected": injected}
    if problems:
        return Check(name, False, "; ".join(_limit(problems, 4)), details)
    junk = sum(injected.values())
    return Check(
        name,
        True,
        f"every datagram handled or counted; {junk} junk per daemon counted exactly; "
        f"{len(reasons)} reason(s), all explained",
        details,
    )


def check_signals(events: list[Event]) -> tuple[Check | None, int]:
    name = "signals"
    published = _ops(events, "publish")
    received = list(of_type(events, "signal"))
    if not published and not received:
        return None, 0
    ids = {e["id"] for e in published}
    counts = Counter((e["host"], e["id"]) for e in received)
    twice = {k: n for k, n in counts.items() if n > 1}
    phantom = sorted({i for _, i in counts if i not in ids})
    acked = sum(1 for e in published if e.get("outcome") == OK)
    problems: list[str] = []
    if twice:
        problems.append(f"{len(twice)} signals received more than once: {_limit(twice.items(), 3)}")
    if phantom:
        problems.append(f"signals received that nobody published: {phantom[:5]}")
    if acked and not received:
        problems.append(f"{acked} signals published, none received anywhere")
    extra = sum(n - 1 for n in twice.values())
    details = {"published": len(published), "acknowledged": acked, "receipts": len(received)}
    if problems:
        return Check(name, False, "; ".join(problems), details), extra
    return Check(
        name,
        True,
        f"{len(received)} receipts of {acked} signals, none twice, none invented",
        details,
    ), 0


def check_expectations(events: list[Event]) -> Check | None:
    name = "expectations"
    meta = _meta(events)
    expect = meta.get("expect", {})
    hosts: list[str] = meta.get("hosts", [])
    problems: list[str] = []
    facts: list[str] = []
    deaths: dict[str, set[str]] = defaultdict(set)  # member -> observers that declared it
    for e in of_type(events, "member"):
        if e.get("kind") == "dead" and e.get("member"):
            deaths[e["member"]].add(e["observer"])
    victims = set(expect.get("dead", []))
    for member in expect.get("dead", []):
        others = set(hosts) - victims  # the survivors (other victims cannot tell)
        missing = sorted(others - deaths.get(member, set()))
        if missing:
            problems.append(f"{member} should have been declared dead; not by {missing}")
        else:
            facts.append(f"{member} declared dead by all {len(others)} survivors")
    never = expect.get("never_dead", [])
    problems.extend(
        f"{member} was declared dead by {sorted(deaths[member])}, which it never was"
        for member in (hosts if never == ["*"] else never)
        if deaths.get(member)
    )
    if never:
        facts.append("no false death verdicts")
    if expect.get("keys_rotated"):
        rotations = [e for e in of_type(events, "fault") if e.get("action") == "rotate_key"]
        if not rotations:
            problems.append("a key rotation was expected, none happened")
        for r in rotations:
            for step, res in r.get("args", {}).get("steps", {}).items():
                if (
                    not res
                    or res.get("acknowledged") != res.get("members")
                    or res.get("members") != len(hosts)
                ):
                    problems.append(f"key {step} reached {res} of {len(hosts)} members")
        keys = (observation(events, "keys") or {}).get("members", {})
        primaries = {v.get("primary") for v in keys.values() if isinstance(v, dict)}
        rings = {tuple(v.get("keys") or ()) for v in keys.values() if isinstance(v, dict)}
        if set(keys) != set(hosts) or len(primaries) != 1 or len(rings) != 1:
            problems.append(f"keyrings differ after the rotation: {keys}")
        elif any(len(r) != 1 for r in rings):
            problems.append(f"the old key is still installed: {keys}")
        else:
            facts.append(f"{len(rotations)} rotation(s) reached all {len(hosts)} members")
    if not expect.get("dead") and not never and not expect.get("keys_rotated"):
        return None
    if problems:
        return Check(
            name,
            False,
            "; ".join(_limit(problems, 4)),
            {"deaths": {k: sorted(v) for k, v in deaths.items()}},
        )
    return Check(
        name, True, "; ".join(facts), {"deaths": {k: sorted(v) for k, v in deaths.items()}}
    )


# ---------------------------------------------------------------------------- all


def op_stats(events: list[Event]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for e in of_type(events, "op"):
        key = e["op"] if e["op"] != "write" else f"write_{e.get('durability')}"
        per = stats.setdefault(key, {})
        per[e.get("outcome")] = per.get(e.get("outcome"), 0) + 1
    stats["handler_runs"] = sum(1 for _ in of_type(events, "handled"))
    nft = observation(events, "nft")
    if nft is not None:
        # What the fault rules did (counters restart whenever a host's rules change).
        arriving = dropped = 0
        for counters in nft.get("hosts", {}).values():
            for rule, packets in counters.items():
                if rule == "arriving":
                    arriving += packets
                else:
                    dropped += packets
        stats["packets_dropped_by_faults"] = dropped
        stats["packets_arriving"] = arriving
    stats["faults"] = [
        f"{e['t']:.1f}s {e.get('action')}"
        for e in of_type(events, "fault")
        if e.get("action") != "up"
    ]
    return stats


def check(events: list[Event], *, allowed_rejections: Iterable[str] | None = None) -> Verdict:
    """Judge a history. ``allowed_rejections`` (``layer/reason``) overrides the meta record's."""
    meta = _meta(events)
    expect = meta.get("expect", {})
    allowed = set(
        allowed_rejections if allowed_rejections is not None else expect.get("rejections", [])
    ) | explained(events)
    checks: list[Check] = []
    membership, converge_s = check_membership(events)
    checks.append(membership)
    checks.append(check_documents(events))
    lost = 0
    dups = 0
    workload = meta.get("workload", True)
    tallies: dict[str, WriteTally] = {}
    if workload:
        for durability in ("majority", "local"):
            writes, tally = check_writes(events, durability)
            checks.append(writes)
            tallies[durability] = tally
            lost += tally.lost + tally.applied_lost
        errors = check_write_errors(events)
        if errors is not None:
            checks.append(errors)
        once, n_lost, n_dup = check_exactly_once(events)
        checks.append(once)
        lost += n_lost
        dups += n_dup
    names = check_duplicate_names(events)
    if names is not None:
        checks.append(names)
    checks.append(check_no_crash(events))
    checks.append(check_storage(events))
    checks.append(check_rejections(events, allowed))
    signals, n_sig = check_signals(events)
    if signals is not None:
        checks.append(signals)
        dups += n_sig
    expectations = check_expectations(events)
    if expectations is not None:
        checks.append(expectations)
    return Verdict(
        scenario=str(meta.get("scenario", "manual")),
        seed=meta.get("seed"),
        checks=checks,
        lost_writes=lost,
        duplicate_deliveries=dups,
        converge_s=converge_s,
        stats=op_stats(events),
        writes=tallies,
    )
