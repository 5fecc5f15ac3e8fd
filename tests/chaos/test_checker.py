"""The checker must be able to fail: fabricated histories with one defect each.

A baseline history (everything fine) passes every invariant; then each test breaks exactly
one thing — a lost majority write, a request handled twice, a crash, a datagram nobody
accounted for, a loser never told it lost, ... — and asserts that the right invariant, and
only it, fails. A checker that passed all of these would prove nothing about meshd.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from chaos.checker import Verdict, check
from chaos.history import History, load

HOSTS = ["h1", "h2", "h3"]
Events = list[dict[str, Any]]


def _view() -> dict[str, list[Any]]:
    return {h: ["alive", 1] for h in HOSTS}


def _counters(udp_in: int, handled: int, junk: int) -> dict[str, Any]:
    rejected = {
        "transport/unknown_mode": junk,
        "transport/malformed": junk,
        "transport/plaintext_refused": junk,
    }
    return {"udp_in": udp_in, "handled_in": handled, "rejected": rejected}


def good() -> Events:
    """A small run in which nothing went wrong (times in seconds since the start)."""
    majority_doc = {
        "m1": {"seq": 1, "host": "h1"},
        "m2": {"seq": 2, "host": "h2"},
        "incr": 2,
    }
    local_doc = {"l3": {"seq": 3, "host": "h3"}, "l4": {"seq": 4, "host": "h2"}}
    agent_doc = {"handled": ["r1", "r2"], "count": 2}
    events: Events = [
        {
            "type": "meta",
            "scenario": "fabricated",
            "seed": 7,
            "hosts": HOSTS,
            "workload": True,
            "expect": {
                "conflicts": ["dup"],
                "dead": ["h3"],
                "never_dead": [],
                "keys_rotated": False,
                "rejections": [],
                "all_running": True,
            },
        },
        {
            "type": "fault",
            "t": 1.0,
            "action": "partition",
            "args": {"groups": [["h1"], ["h2", "h3"]]},
        },
        {"type": "fault", "t": 5.0, "action": "heal_network", "args": {}},
    ]
    ops: Events = [
        {
            "op": "write",
            "host": "h1",
            "id": "w1",
            "doc": "chaos-majority",
            "key": "m1",
            "value": {"seq": 1, "host": "h1"},
            "durability": "majority",
            "outcome": "ok",
        },
        {
            "op": "write",
            "host": "h2",
            "id": "w2",
            "doc": "chaos-majority",
            "key": "m2",
            "value": {"seq": 2, "host": "h2"},
            "durability": "majority",
            "outcome": "ok",
        },
        {
            "op": "write",
            "host": "h1",
            "id": "w5",
            "doc": "chaos-majority",
            "key": "m5",
            "value": {"seq": 5, "host": "h1"},
            "durability": "majority",
            "outcome": "unknown",
            "error": "timeout",
        },
        {
            "op": "incr",
            "host": "h1",
            "id": "w6",
            "doc": "chaos-majority",
            "key": "incr",
            "value": 1,
            "durability": "majority",
            "outcome": "ok",
        },
        {
            "op": "incr",
            "host": "h2",
            "id": "w7",
            "doc": "chaos-majority",
            "key": "incr",
            "value": 1,
            "durability": "majority",
            "outcome": "unknown",
            "error": "timeout",
        },
        {
            "op": "write",
            "host": "h3",
            "id": "w3",
            "doc": "chaos-local",
            "key": "l3",
            "value": {"seq": 3, "host": "h3"},
            "durability": "local",
            "outcome": "ok",
        },
        {
            "op": "write",
            "host": "h2",
            "id": "w4",
            "doc": "chaos-local",
            "key": "l4",
            "value": {"seq": 4, "host": "h2"},
            "durability": "local",
            "outcome": "ok",
        },
        {"op": "request", "host": "h1", "id": "r1", "agent": "counter/c1", "outcome": "ok"},
        {"op": "request", "host": "h2", "id": "r2", "agent": "counter/c1", "outcome": "ok"},
        {
            "op": "request",
            "host": "h3",
            "id": "r3",
            "agent": "counter/c1",
            "outcome": "unknown",
            "error": "timeout",
        },
        {"op": "publish", "host": "h1", "id": "s1", "outcome": "ok"},
        {"op": "register", "host": "h1", "id": "dup@h1", "name": "dup", "outcome": "ok"},
        {"op": "register", "host": "h3", "id": "dup@h3", "name": "dup", "outcome": "ok"},
    ]
    for i, op in enumerate(ops):
        events.append({"type": "op", "t0": 2.0 + i * 0.1, "t1": 2.05 + i * 0.1, **op})
    events += [
        {"type": "signal", "t": 2.5, "host": h, "id": "s1", "topic": "chaos.sig"} for h in HOSTS
    ]
    events += [
        {"type": "member", "t": 3.0, "observer": h, "kind": "dead", "member": "h3"}
        for h in ("h1", "h2")
    ]
    winner = {"node": "h1", "entry_id": "h1/1/1"}
    events += [
        {"type": "heal", "t": 6.0},
        {
            "type": "observe",
            "what": "convergence",
            "after": "heal",
            "since": 6.0,
            "converged": True,
            "interrupted": False,
            "elapsed": 1.5,
            "bound": 30,
            "views": {h: _view() for h in HOSTS},
            "alive": HOSTS,
        },
        {
            "type": "observe",
            "what": "membership",
            "views": {h: _view() for h in HOSTS},
            "alive": HOSTS,
        },
        {
            "type": "observe",
            "what": "digests",
            "converged": True,
            "elapsed": 0.5,
            "hosts": {h: {"digest": "ab", "docs": {"state/x": [0, "01"]}} for h in HOSTS},
        },
        {
            "type": "observe",
            "what": "duplicates",
            "settled": True,
            "elapsed": 0.5,
            "lookups": {"dup": {h: winner for h in HOSTS}},
            "agents": {
                "dup": {
                    "h1": {
                        "running": True,
                        "stop_reason": None,
                        "entry_id": "h1/1/1",
                        "winner": None,
                    },
                    "h3": {
                        "running": False,
                        "stop_reason": "name_conflict",
                        "entry_id": "h3/1/1",
                        "winner": winner,
                    },
                }
            },
        },
        {
            "type": "observe",
            "what": "state",
            "docs": {
                "chaos-majority": {h: copy.deepcopy(majority_doc) for h in HOSTS},
                "chaos-local": {h: copy.deepcopy(local_doc) for h in HOSTS},
                "agent:counter/c1": {h: copy.deepcopy(agent_doc) for h in HOSTS},
            },
        },
        {
            "type": "observe",
            "what": "rejections",
            "injected": {"unknown_mode": 5, "malformed": 5, "plaintext_refused": 5},
            "hosts": {
                h: {"before": _counters(100, 100, 0), "after": _counters(130, 115, 5)}
                for h in HOSTS
            },
        },
        {
            "type": "observe",
            "what": "processes",
            "running": dict.fromkeys(HOSTS, True),
            "exits": [],
            "logs": {h: {"tracebacks": 0, "errors": [], "error_count": 0} for h in HOSTS},
        },
    ]
    return events


def obs(events: Events, what: str) -> dict[str, Any]:
    return next(e for e in events if e.get("type") == "observe" and e.get("what") == what)


def op(events: Events, id_: str) -> dict[str, Any]:
    return next(e for e in events if e.get("type") == "op" and e.get("id") == id_)


def failing(verdict: Verdict) -> list[str]:
    return [c.name for c in verdict.checks if not c.ok]


def test_the_baseline_history_passes_every_invariant() -> None:
    verdict = check(good())
    assert failing(verdict) == [], [c.summary for c in verdict.checks if not c.ok]
    names = [c.name for c in verdict.checks]
    assert names == [
        "membership",
        "documents",
        "majority_writes",
        "local_writes",
        "exactly_once",
        "duplicate_names",
        "no_crash",
        "rejections",
        "signals",
        "expectations",
    ]
    assert verdict.ok and verdict.lost_writes == 0 and verdict.duplicate_deliveries == 0
    assert verdict.converge_s == 1.5


def lose_majority_write(e: Events) -> None:
    del obs(e, "state")["docs"]["chaos-majority"]["h2"]["m2"]


def wrong_value(e: Events) -> None:
    obs(e, "state")["docs"]["chaos-majority"]["h3"]["m1"] = {"seq": 99, "host": "h1"}


def lose_increment(e: Events) -> None:
    for doc in obs(e, "state")["docs"]["chaos-majority"].values():
        doc["incr"] = 0


def invent_increments(e: Events) -> None:
    for doc in obs(e, "state")["docs"]["chaos-majority"].values():
        doc["incr"] = 3  # one acknowledged, one unknown: at most 2 can have happened


def phantom_write(e: Events) -> None:
    obs(e, "state")["docs"]["chaos-majority"]["h1"]["m77"] = {"seq": 77}


def lose_local_write(e: Events) -> None:
    for doc in obs(e, "state")["docs"]["chaos-local"].values():
        del doc["l3"]


def double_delivery(e: Events) -> None:
    for doc in obs(e, "state")["docs"]["agent:counter/c1"].values():
        doc["handled"].append("r2")
        doc["count"] = 3


def unknown_request_twice(e: Events) -> None:
    for doc in obs(e, "state")["docs"]["agent:counter/c1"].values():
        doc["handled"] += ["r3", "r3"]
        doc["count"] = 4


def request_never_handled(e: Events) -> None:
    for doc in obs(e, "state")["docs"]["agent:counter/c1"].values():
        doc["handled"] = ["r1"]
        doc["count"] = 1


def count_disagrees(e: Events) -> None:
    for doc in obs(e, "state")["docs"]["agent:counter/c1"].values():
        doc["count"] = 5


def views_differ(e: Events) -> None:
    obs(e, "membership")["views"]["h2"]["h3"] = ["suspect", 2]


def never_converged(e: Events) -> None:
    c = obs(e, "convergence")
    c["converged"] = False
    c["elapsed"] = 30.0


def converged_too_late(e: Events) -> None:
    obs(e, "convergence")["elapsed"] = 31.0


def daemon_down(e: Events) -> None:
    m = obs(e, "membership")
    m["alive"] = ["h1", "h2"]
    del m["views"]["h3"]
    for v in m["views"].values():
        v["h3"] = ["dead", 1]


def documents_differ(e: Events) -> None:
    obs(e, "digests")["hosts"]["h3"] = {"digest": "cd", "docs": {"state/x": [0, "02"]}}


def crash(e: Events) -> None:
    p = obs(e, "processes")
    p["exits"] = [{"host": "h2", "pid": 42, "code": 1, "cause": "crash"}]


def traceback_in_log(e: Events) -> None:
    obs(e, "processes")["logs"]["h1"]["tracebacks"] = 1


def unclean_stop(e: Events) -> None:
    obs(e, "processes")["exits"] = [{"host": "h2", "pid": 42, "code": 1, "cause": "stop"}]


def unexplained_datagram(e: Events) -> None:
    obs(e, "rejections")["hosts"]["h2"]["after"]["udp_in"] += 1


def junk_not_counted(e: Events) -> None:
    obs(e, "rejections")["hosts"]["h1"]["after"]["rejected"]["transport/malformed"] = 4
    obs(e, "rejections")["hosts"]["h1"]["after"]["handled_in"] += 1  # keep the identity


def unexplained_reason(e: Events) -> None:
    after = obs(e, "rejections")["hosts"]["h3"]["after"]
    after["rejected"]["replication/bad_update"] = 1


def signal_twice(e: Events) -> None:
    e.append({"type": "signal", "t": 2.6, "host": "h2", "id": "s1", "topic": "chaos.sig"})


def signal_invented(e: Events) -> None:
    e.append({"type": "signal", "t": 2.6, "host": "h2", "id": "s9", "topic": "chaos.sig"})


def names_resolve_differently(e: Events) -> None:
    obs(e, "duplicates")["lookups"]["dup"]["h2"] = {"node": "h3", "entry_id": "h3/1/1"}


def loser_not_told(e: Events) -> None:
    obs(e, "duplicates")["agents"]["dup"]["h3"].update(running=True, stop_reason=None)


def conflict_never_happened(e: Events) -> None:
    op(e, "dup@h3")["outcome"] = "fail"
    del obs(e, "duplicates")["agents"]["dup"]["h3"]


def death_not_seen(e: Events) -> None:
    e[:] = [x for x in e if not (x["type"] == "member" and x["observer"] == "h2")]


def false_death(e: Events) -> None:
    next(x for x in e if x["type"] == "meta")["expect"]["never_dead"] = ["h1"]
    e.append({"type": "member", "t": 3.0, "observer": "h2", "kind": "dead", "member": "h1"})


def nothing_acknowledged(e: Events) -> None:
    for x in e:
        if x["type"] == "op" and x["op"] == "request":
            x["outcome"] = "unknown"


@pytest.mark.parametrize(
    ("defect", "invariant"),
    [
        (lose_majority_write, "majority_writes"),
        (wrong_value, "majority_writes"),
        (lose_increment, "majority_writes"),
        (invent_increments, "majority_writes"),
        (phantom_write, "majority_writes"),
        (lose_local_write, "local_writes"),
        (double_delivery, "exactly_once"),
        (unknown_request_twice, "exactly_once"),
        (request_never_handled, "exactly_once"),
        (count_disagrees, "exactly_once"),
        (nothing_acknowledged, "exactly_once"),
        (views_differ, "membership"),
        (never_converged, "membership"),
        (converged_too_late, "membership"),
        (documents_differ, "documents"),
        (crash, "no_crash"),
        (traceback_in_log, "no_crash"),
        (unclean_stop, "no_crash"),
        (unexplained_datagram, "rejections"),
        (junk_not_counted, "rejections"),
        (unexplained_reason, "rejections"),
        (signal_twice, "signals"),
        (signal_invented, "signals"),
        (names_resolve_differently, "duplicate_names"),
        (loser_not_told, "duplicate_names"),
        (conflict_never_happened, "duplicate_names"),
        (death_not_seen, "expectations"),
        (false_death, "expectations"),
    ],
)
def test_each_defect_is_caught_by_its_invariant(
    defect: Callable[[Events], None], invariant: str
) -> None:
    events = good()
    defect(events)
    verdict = check(events)
    assert not verdict.ok
    assert failing(verdict) == [invariant]


def test_lost_and_duplicate_counts_reach_the_json_verdict() -> None:
    events = good()
    lose_majority_write(events)
    double_delivery(events)
    verdict = check(events)
    data = verdict.to_json()
    assert data["passed"] is False
    assert data["lost_writes"] == 1
    assert data["duplicate_deliveries"] == 1


def test_local_write_of_a_restarted_host_may_be_lost() -> None:
    events = good()
    lose_local_write(events)
    events.append({"type": "fault", "t": 4.0, "action": "restart", "args": {"host": "h3"}})
    verdict = check(events)
    assert "local_writes" not in failing(verdict)
    local = next(c for c in verdict.checks if c.name == "local_writes")
    assert local.details["excused"] == 1


def test_a_daemon_that_is_down_fails_membership_and_no_crash() -> None:
    events = good()
    daemon_down(events)
    obs(events, "processes")["running"]["h3"] = False
    assert set(failing(check(events))) >= {"membership", "no_crash"}


@pytest.mark.parametrize(
    "reason",
    [
        "replication/unexpected_round",
        "transport/stream_timeout",
        "transport/stream_closed",
        "transport/stream_header_timeout",
        "transport/stream_broken",
    ],
)
def test_rejections_a_fault_explains_are_allowed_only_with_that_fault(reason: str) -> None:
    events = good()
    obs(events, "rejections")["hosts"]["h1"]["after"]["rejected"][reason] = 2
    assert "rejections" not in failing(check(events))  # a partition happened
    without = [e for e in events if e.get("type") != "fault"]
    assert "rejections" in failing(check(without))


def test_histories_round_trip_through_the_file(tmp_path: Any) -> None:
    path = tmp_path / "history.jsonl"
    with History(path) as history:
        for event in good():
            history.add(event.pop("type"), **event)
    with open(path, "a") as f:
        f.write('{"type": "op", "torn')  # a crash mid-line
    assert check(load(path)).ok
