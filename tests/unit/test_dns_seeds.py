"""``dns:`` seeds: how the configuration reads them, and the membership core's rule that
seeds which follow DNS are looked up again before every join attempt (sans-IO, no sockets)."""

from __future__ import annotations

import pytest
from membership_helpers import LAN, Node, addr_for, make_core, tuning

from meshd.config.loader import build_config
from meshd.config.model import ConfigError, DnsSeed
from meshd.membership.events import ResolveSeeds

SEED = addr_for("s1")
BASE = {"node.name": "a", "security.insecure": True}


def seeds_of(*items: str) -> tuple[object, ...]:
    return build_config(None, {}, {"node.seeds": list(items), **BASE}).node.seeds


def test_dns_seeds_in_the_configuration() -> None:
    assert seeds_of("dns:meshd.default.svc.cluster.local") == (
        DnsSeed("meshd.default.svc.cluster.local", 7946),
    )
    assert seeds_of("dns:seeds.test:8000", "10.0.0.1") == (
        DnsSeed("seeds.test", 8000),
        ("10.0.0.1", 7946),
    )
    # SRV names have labels starting with an underscore.
    assert seeds_of("dns:_gossip._udp.meshd.ns.svc") == (DnsSeed("_gossip._udp.meshd.ns.svc"),)
    env = {"MESHD_NODE_SEEDS": "dns:a.test,b.test:9", "MESHD_NODE_DNS_RESOLVER": "127.0.0.1:53"}
    config = build_config(None, env, BASE)
    assert config.node.seeds == (DnsSeed("a.test"), ("b.test", 9))
    assert config.node.dns_resolver == ("127.0.0.1", 53)
    assert build_config(None, {}, BASE).node.dns_resolver is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("node.seeds", "dns:"),
        ("node.seeds", "dns:bad name.test"),
        ("node.seeds", "dns:-bad.test"),
        ("node.seeds", "dns:seeds.test:0"),
        ("node.seeds", "dns:seeds.test:http"),
        ("node.seeds", "dns:10.0.0.300"),
        ("node.dns_resolver", "resolver.test:53"),  # the resolver itself: an IP address
        ("node.dns_resolver", "127.0.0.1:0"),
    ],
)
def test_bad_dns_settings_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(None, {}, {key: value, **BASE})
    assert caught.value.key == key


def resolving(seeds: tuple[tuple[str, int], ...] = (), **tune: float) -> Node:
    core = make_core(
        start=False, tune=tuning(reconnect_interval=1000.0, push_pull_interval=1000.0, **tune)
    )
    core.resolves_seeds = True
    core.set_seeds(seeds)
    core.start(0.0, seeds)
    return Node(core)


def lookups(node: Node, since: float = float("-inf")) -> list[tuple[float, ResolveSeeds]]:
    return [(at, out) for at, out in node.log if isinstance(out, ResolveSeeds) and at >= since]


def answer(node: Node, now: float, seeds: list[tuple[str, int]]) -> None:
    node.now = now
    node.core.seeds_resolved(now, seeds)
    node.collect(now)


def test_seeds_resolved_at_start_are_tried_without_a_second_lookup() -> None:
    node = resolving((SEED,))
    assert lookups(node) == []
    assert [req.addr for _, req, _ in node.push_pulls(join=True)] == [SEED]


def test_every_join_retry_looks_the_seeds_up_first() -> None:
    node = resolving()  # nothing resolved at start
    assert [out.purpose for _, out in lookups(node)] == ["join"]
    assert not node.core.joined and node.push_pulls() == []
    # Nothing resolves: a failed attempt, retried with backoff, each retry a new lookup.
    for i in range(4):
        answer(node, node.now, [])
        assert node.core.stats.join_failures == i + 1
        mark = node.now
        while len(lookups(node)) == i + 1:
            node.step()
        cap = min(LAN.join_retry_max, LAN.join_retry_min * 1.5**i)
        assert cap / 2 <= node.now - mark <= cap
        assert node.push_pulls() == []
    # The name resolves at last: the join goes to what it resolved to, at once.
    answer(node, node.now, [SEED, node.core.addr])
    [(at, req, msg)] = node.push_pulls(join=True)
    assert (at, req.addr, msg.join) == (node.now, SEED, True)
    # That seed refuses: the retry looks the name up again before dialling anyone.
    node.result(node.now, req.token, None, "refused")
    while len(lookups(node)) == 5:
        node.step()
    assert len(node.push_pulls(join=True)) == 1


def test_one_lookup_at_a_time_and_a_stale_answer_is_ignored() -> None:
    node = resolving()
    node.core.join(0.5)  # a reload asks for a join while the lookup is out
    assert len(lookups(node)) == 1
    answer(node, 0.6, [SEED])
    answer(node, 0.7, [addr_for("s2")])  # no lookup was asked for: ignored
    assert [req.addr for _, req, _ in node.push_pulls(join=True)] == [SEED]
    assert node.core.seeds == (SEED,)


def test_a_name_that_resolves_to_this_node_alone_makes_it_the_first_member() -> None:
    node = resolving()
    answer(node, 0.0, [node.core.addr])
    assert node.core.joined
    assert node.push_pulls() == [] and node.core.stats.join_failures == 0


def test_a_joined_node_dials_every_resolved_address_no_member_has() -> None:
    core = make_core(start=False, tune=tuning(reconnect_interval=5.0))
    core.resolves_seeds = True
    core.start(0.0, ())
    node = Node(core)
    answer(node, 0.0, [node.core.addr])  # the first member
    node.learn(0.1, ["b"])  # then b joins it (and answers its probes)
    node.answering = {"b"}
    before = len(lookups(node))
    node.run(12.0)  # a lookup every reconnect_interval (jittered), joined or not alone
    reconnects = [out for _, out in lookups(node)[before:] if out.purpose == "reconnect"]
    assert len(reconnects) == 1
    mark = node.now
    # The name now lists b (a member already: not dialled), this node, and c, which
    # formed a cluster of its own at the same time: c is dialled, and the two merge.
    answer(node, mark, [addr_for("b"), node.core.addr, addr_for("c")])
    dialled = [req.addr for _, req, msg in node.push_pulls(since=mark) if msg.join]
    assert dialled == [addr_for("c")]
    # The next tick asks again; while that lookup is out, later ticks ask for no other.
    node.run(40.0)
    assert len(lookups(node)[before:]) == 2
    answer(node, 40.0, [])
    node.run(50.0)
    assert len(lookups(node)[before:]) == 3
