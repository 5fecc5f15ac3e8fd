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

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chaos.history import FAIL, OK, Event, observation, of_type

KILL_CODES = (-9, 137, None)  # SIGKILL: Popen reports -9, Docker 128 + 9
STOP_CODES = (0, None)  # a graceful leave exits 0 (None: not our child, unknowable)
PROCESS_ENDS = ("kill", "stop", "restart", "rolling_restart")
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
PROCESS_FAULTS = frozenset({"kill", "pause", "stop", "restart"})
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

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "passed": self.ok,
            "lost_writes": self.lost_writes,
            "duplicate_deliveries": self.duplicate_deliveries,
            "converge_s": self.converge_s,
            "duration_s": self.duration_s,
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


def check_writes(events: list[Event], durability: str) -> tuple[Check, int]:
    """Acknowledged writes of ``durability`` present on every daemon; returns lost count."""
    name = f"{durability}_writes"
    state = _state(events)
    writes = [e for e in _ops(events, "write") if e.get("durability") == durability]
    incrs = [e for e in _ops(events, "incr") if e.get("durability") == durability]
    if not writes and not incrs:
        return Check(name, False, f"no {durability} writes were attempted: nothing tested"), 0
    if not state:
        return _missing(name, "state"), 0
    ends = _process_ends(events)
    lost: list[str] = []
    excused = 0
    problems: list[str] = []
    acked = [e for e in writes if e.get("outcome") == OK]
    if not acked and writes:
        problems.append(f"none of {len(writes)} {durability} writes was acknowledged")
    attempted: dict[str, set[str]] = defaultdict(set)
    for e in writes:
        attempted[e["doc"]].add(e["key"])
    for e in acked:
        if durability == "local" and any(t > e["t1"] for t in ends.get(e["host"], [])):
            excused += 1  # its host lost its memory before the write (maybe) spread
            continue
        per_host = state.get(e["doc"], {})
        if not per_host:
            lost.append(f"{e['doc']}/{e['key']} (document not read)")
            continue
        for host, value in per_host.items():
            if not isinstance(value, dict) or value.get(e["key"]) != e["value"]:
                got = value.get(e["key"]) if isinstance(value, dict) else value
                lost.append(f"{e['key']} (acked via {e['host']} at {e['t1']} s) on {host}: {got}")
                break
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
            elif got > maybe_n:
                problems.append(f"{doc}/{key} on {host} is {got}, only {maybe_n} attempted")
    lost_count = len([x for x in lost if "increments acknowledged" not in x]) + lost_incr
    details = {
        "acknowledged": len(acked),
        "attempted": len(writes),
        "increments_acknowledged": sum(1 for e in incrs if e.get("outcome") == OK),
        "excused": excused,
        "lost": _limit(lost, 20),
    }
    if lost:
        problems.insert(0, f"{lost_count} acknowledged {durability} writes lost: {lost[0]}")
    if problems:
        return Check(name, False, "; ".join(problems), details), lost_count
    summary = f"{len(acked)}/{len(writes)} writes acknowledged, all present everywhere"
    if incrs:
        summary += f"; counter ≥ {details['increments_acknowledged']} acknowledged increments"
    if excused:
        summary += f" ({excused} excused: host restarted)"
    return Check(name, True, summary, details), lost_count


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
    if workload:
        majority, n = check_writes(events, "majority")
        checks.append(majority)
        lost += n
        local, n = check_writes(events, "local")
        checks.append(local)
        lost += n
        once, n_lost, n_dup = check_exactly_once(events)
        checks.append(once)
        lost += n_lost
        dups += n_dup
    names = check_duplicate_names(events)
    if names is not None:
        checks.append(names)
    checks.append(check_no_crash(events))
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
    )
