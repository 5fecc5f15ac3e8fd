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
            "args": {"groups": [["h1", "h2"], ["h3"]]},
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
            "what": "storage",
            "hosts": {
                h: {"enabled": True, "healthy": True, "failure": None, "failures": {}}
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
        "write_errors",
        "exactly_once",
        "duplicate_names",
        "no_crash",
        "storage",
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


# ---------------------------------------------------------------------------- durability


def add_write(e: Events, id_: str, host: str, t0: float, t1: float, **fields: Any) -> Events:
    """Append a write op (recorded like the workload's) to ``e``; returns ``e``."""
    fields.setdefault("durability", "majority")
    fields.setdefault("outcome", "ok")
    doc = "chaos-majority" if fields["durability"] == "majority" else "chaos-local"
    e.append(
        {
            "type": "op",
            "op": "write",
            "host": host,
            "id": id_,
            "t0": t0,
            "t1": t1,
            "doc": doc,
            "key": id_,
            "value": {"seq": 0, "host": host},
            **fields,
        }
    )
    return e


def holds(e: Events, doc: str, key: str, value: Any, hosts: list[str] = HOSTS) -> None:
    for h in hosts:
        obs(e, "state")["docs"][doc][h][key] = value


def kill_all(e: Events, t: float = 5.5) -> None:
    e.append({"type": "fault", "t": t, "action": "kill_all", "args": {"hosts": HOSTS}})
    obs(e, "processes")["exits"] = [
        {"host": h, "pid": 40 + i, "code": -9, "cause": "kill"} for i, h in enumerate(HOSTS)
    ]


def check_named(verdict: Verdict, name: str) -> Any:
    return next(c for c in verdict.checks if c.name == name)


def test_a_lost_majority_write_fails_even_after_every_daemon_was_killed() -> None:
    events = good()
    kill_all(events)
    lose_majority_write(events)
    verdict = check(events)
    assert failing(verdict) == ["majority_writes"]
    assert verdict.lost_majority == 1 and verdict.to_json()["lost_majority_writes"] == 1
    assert verdict.writes["majority"].lost == 1


def test_a_lost_local_write_after_a_power_loss_is_reported_not_failed() -> None:
    events = good()
    kill_all(events)  # after both local writes were acknowledged
    lose_local_write(events)
    verdict = check(events)
    assert verdict.ok, failing(verdict)
    local = check_named(verdict, "local_writes")
    assert local.details["excused"] == 2 and len(local.details["lost_excused"]) == 1
    assert verdict.writes["local"].lost == 0 and verdict.writes["local"].lost_excused == 1
    data = verdict.to_json()
    assert data["lost_local_writes"] == 1 and data["lost_writes"] == 0
    assert data["writes"]["local"]["lost_excused"] == 1


def test_a_lost_local_write_whose_daemon_never_died_still_fails() -> None:
    events = good()
    kill_all(events, t=1.5)  # before the writes: they had every chance to spread
    lose_local_write(events)
    verdict = check(events)
    assert failing(verdict) == ["local_writes"]
    assert verdict.writes["local"].lost == 1


def isolate_h3(e: Events, at: float = 6.2, heal_began: float = 8.0) -> None:
    e.append(
        {"type": "fault", "t": at, "began": at - 0.1, "action": "isolate", "args": {"host": "h3"}}
    )
    e.append(
        {
            "type": "fault",
            "t": heal_began + 0.1,
            "began": heal_began,
            "action": "heal_network",
            "args": {},
        }
    )


def test_an_acknowledged_majority_write_on_an_isolated_minority_fails() -> None:
    events = good()
    isolate_h3(events)
    add_write(
        events, "m9", "h3", 6.5, 6.6, result={"acked": ["h3", "h1", "h2"], "needed": 2, "total": 3}
    )
    holds(events, "chaos-majority", "m9", {"seq": 0, "host": "h3"})
    verdict = check(events)
    assert failing(verdict) == ["majority_writes"]
    assert "cut off from a majority" in check_named(verdict, "majority_writes").summary


def test_writes_on_the_majority_side_or_across_the_heal_are_fine() -> None:
    events = good()
    isolate_h3(events)
    for id_, host, t0, t1 in (
        ("m9", "h1", 6.5, 6.6),  # the majority side
        ("m10", "h3", 5.0, 6.3),  # started before the cut was in place
        ("m11", "h3", 7.9, 8.2),  # answered after the heal began
        ("m12", "h3", 8.5, 8.6),  # after the heal
    ):
        add_write(events, id_, host, t0, t1)
        holds(events, "chaos-majority", id_, {"seq": 0, "host": host})
    assert check(events).ok


def test_a_smaller_cluster_after_a_removal_may_acknowledge_on_its_own() -> None:
    events = good()
    isolate_h3(events)
    add_write(events, "m9", "h3", 6.5, 6.6, result={"acked": ["h3"], "needed": 1, "total": 1})
    holds(events, "chaos-majority", "m9", {"seq": 0, "host": "h3"})
    assert check(events).ok


def timed_out(e: Events, id_: str = "m9", host: str = "h3") -> None:
    """A majority write the daemon answered with ``timeout``: applied there, not acked."""
    add_write(
        e,
        id_,
        host,
        6.5,
        11.5,
        outcome="unknown",
        error="timeout",
        detail={"acked": [host], "needed": 2, "total": 3},
    )


def test_a_write_the_daemon_reported_applied_must_reach_everyone() -> None:
    events = good()
    isolate_h3(events)
    timed_out(events)
    holds(events, "chaos-majority", "m9", {"seq": 0, "host": "h3"}, hosts=["h3"])
    verdict = check(events)
    assert failing(verdict) == ["majority_writes"]
    assert verdict.writes["majority"].applied_lost == 1 and verdict.lost_majority == 1
    holds(events, "chaos-majority", "m9", {"seq": 0, "host": "h3"})
    verdict = check(events)
    assert verdict.ok and "1 reported applied" in check_named(verdict, "majority_writes").summary


def test_write_errors_need_a_fault_that_explains_them() -> None:
    events = good()
    timed_out(events, host="h1")
    holds(events, "chaos-majority", "m9", {"seq": 0, "host": "h1"})
    assert check(events).ok  # the partition explains a majority timeout
    without = [e for e in events if e.get("type") != "fault"]
    assert "write_errors" in failing(check(without))
    events = good()
    add_write(events, "m9", "h1", 6.5, 6.6, outcome="fail", error="invalid")
    assert failing(check(events)) == ["write_errors"]


def disk_full(e: Events, *, host: str = "h2", noticed: float | None = 6.3) -> None:
    """h2's disk filled at 6.2 s and freed at 9 s; the watcher's record; two writes through
    h2 refused meanwhile."""
    e.append({"type": "fault", "t": 6.2, "action": "fill_disk", "args": {"host": host}})
    e.append({"type": "fault", "t": 9.0, "action": "free_disk", "args": {"host": host}})
    e.append(
        {
            "type": "observe",
            "what": "disk",
            "host": host,
            "since": 6.2,
            "noticed": noticed,
            "freed": 9.1,
            "recovered": 12.0,
            "bound": 45.0,
            "polls": 24,
            "failures": {"disk_full": 23} if noticed is not None else {},
            "reads": {"ok": 23},
            "members": {"ok": 23},
        }
    )
    for id_, durability in (("m9", "majority"), ("l9", "local")):
        add_write(
            e, id_, host, 7.0, 7.01, durability=durability, outcome="fail", error="overloaded"
        )


def test_a_full_disk_refuses_writes_keeps_serving_and_recovers() -> None:
    events = good()
    disk_full(events)
    verdict = check(events)
    assert verdict.ok, [c.summary for c in verdict.checks if not c.ok]
    storage = check_named(verdict, "storage")
    assert storage.details["disks"]["h2"]["refused"] == 2
    assert verdict.writes["majority"].errors == {"overloaded": 1, "timeout": 2}  # + incr


def test_overloaded_errors_are_explained_by_a_disk_fault_only() -> None:
    events = good()
    add_write(events, "m9", "h2", 7.0, 7.01, outcome="fail", error="overloaded")
    verdict = check(events)
    assert failing(verdict) == ["write_errors"]
    assert "overloaded=1" in check_named(verdict, "write_errors").summary


@pytest.mark.parametrize(
    ("defect", "found"),
    [
        (lambda e: op(e, "m9").update(outcome="ok", error=None), "acknowledged while"),
        (lambda e: op(e, "m9").update(outcome="unknown", error="timeout"), "instead of"),
        (lambda e: obs(e, "disk").update(reads={"ok": 3, "timeout": 1}), "reads failed"),
        (lambda e: obs(e, "disk").update(members={"ok": 3, "closed": 1}), "membership calls"),
        (lambda e: obs(e, "disk").update(recovered=None), "not healthy again"),
        (lambda e: obs(e, "disk").update(failures={"io_error": 3}), "not disk_full"),
        (
            lambda e: obs(e, "storage")["hosts"]["h2"].update(healthy=False, failure="disk_full"),
            "not healthy at the end",
        ),
    ],
)
def test_each_disk_full_defect_fails_storage(defect: Callable[[Events], None], found: str) -> None:
    events = good()
    disk_full(events)
    if found == "acknowledged while":
        holds(events, "chaos-majority", "m9", {"seq": 0, "host": "h2"})
    defect(events)
    verdict = check(events)
    assert "storage" in failing(verdict)
    assert found in check_named(verdict, "storage").summary


def test_a_disk_that_never_failed_tested_nothing() -> None:
    events = good()
    disk_full(events, noticed=None)
    assert failing(check(events)) == ["storage"]


def test_a_refused_write_must_not_appear() -> None:
    events = good()
    disk_full(events)
    holds(events, "chaos-majority", "m9", {"seq": 0, "host": "h2"})
    assert failing(check(events)) == ["majority_writes"]
