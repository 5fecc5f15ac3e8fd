"""The fault model and its nftables text: pure, so checked here without root or a kernel.

The real effect of this text on packets is tested in test_netns.py (as root); here we pin
down *which* rules each fault produces, since both backends load exactly this text.
"""

from __future__ import annotations

import json

import pytest

from chaos.faults import (
    Faults,
    drop_from_rule,
    loss_rule,
    parse_counters,
    parse_groups,
    partition_groups,
    percent_of,
    render_ruleset,
)

ADDR = {f"h{i}": f"10.0.0.{i + 1}" for i in range(1, 6)}
HOSTS = list(ADDR)


def test_partition_drops_every_other_group_both_ways() -> None:
    f = Faults(groups=partition_groups(HOSTS, [["h1", "h2"]]))
    assert f.groups == [["h1", "h2"], ["h3", "h4", "h5"]]
    assert f.rules_for("h1", ADDR) == [
        drop_from_rule(["10.0.0.4", "10.0.0.5", "10.0.0.6"], "partition: h1 | others")
    ]
    assert f.rules_for("h4", ADDR) == [
        drop_from_rule(["10.0.0.2", "10.0.0.3"], "partition: h4 | others")
    ]


def test_bridge_host_reaches_and_is_reached_by_both_sides() -> None:
    groups = partition_groups(HOSTS, [["h1", "h2"], ["h4", "h5"]], ["h3"])
    f = Faults(groups=groups, bridges=["h3"])
    assert f.rules_for("h3", ADDR) == []  # the bridge drops nothing
    # and nobody drops the bridge: h1 drops only the far side
    assert f.rules_for("h1", ADDR) == [
        drop_from_rule(["10.0.0.5", "10.0.0.6"], "partition: h1 | others")
    ]
    assert f.rules_for("h5", ADDR) == [
        drop_from_rule(["10.0.0.2", "10.0.0.3"], "partition: h5 | others")
    ]
    assert f.describe() == ["partition h1,h2 | h4,h5 (bridge h3)"]


def test_one_way_block_is_enforced_on_the_receiver_only() -> None:
    f = Faults(blocks={("h1", "h2")})
    assert f.rules_for("h2", ADDR) == [drop_from_rule(["10.0.0.2"], "block h1 -> h2")]
    assert f.rules_for("h1", ADDR) == []


def test_loss_rule_and_whole_percent() -> None:
    assert loss_rule(20) == 'numgen random mod 100 < 20 counter drop comment "loss 20%"'
    assert loss_rule(100) == 'counter drop comment "loss 100%"'
    assert percent_of(0.2) == 20
    with pytest.raises(ValueError, match="whole percent"):
        percent_of(0.205)
    with pytest.raises(ValueError, match="between 0 and 1"):
        percent_of(1.5)


def test_partition_groups_validation() -> None:
    with pytest.raises(ValueError, match="more than one group"):
        partition_groups(HOSTS, [["h1"], ["h1", "h2"]])
    with pytest.raises(ValueError, match="unknown hosts"):
        partition_groups(HOSTS, [["h9"]])
    with pytest.raises(ValueError, match="also a bridge"):
        partition_groups(HOSTS, [["h1"], ["h2"]], ["h1"])
    assert partition_groups(HOSTS, [HOSTS]) is None  # one group is no partition


def test_parse_groups() -> None:
    assert parse_groups("h1,h2 | h3,h4,h5") == [["h1", "h2"], ["h3", "h4", "h5"]]
    assert parse_groups("h1|h2") == [["h1"], ["h2"]]
    with pytest.raises(ValueError, match="expected groups"):
        parse_groups("h1,h2")
    with pytest.raises(ValueError, match="expected groups"):
        parse_groups("h1 | ")


def test_faults_round_trip_through_the_state_file() -> None:
    f = Faults(
        loss={"h1": 20},
        blocks={("h1", "h2")},
        groups=[["h1"], ["h2", "h3"]],
        bridges=[],
    )
    again = Faults.from_json(json.loads(json.dumps(f.to_json())))
    assert again == f
    assert Faults.from_json(None).empty


def test_rendered_script_accepts_controller_before_faults_and_counts() -> None:
    f = Faults(loss={"h2": 20}, groups=partition_groups(HOSTS, [["h2"]]))
    script = render_ruleset(f.rules_for("h2", ADDR), exempt=["10.0.0.1"])
    lines = script.splitlines()
    controller = lines.index("\t\tip saddr 10.0.0.1 accept")
    arriving = lines.index('\t\tcounter comment "arriving"')
    first_drop = next(i for i, line in enumerate(lines) if "drop" in line)
    assert controller < arriving < first_drop


def test_parse_counters_sums_by_comment() -> None:
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "meshd_chaos"}},
            {"rule": {"comment": "arriving", "expr": [{"counter": {"packets": 7, "bytes": 1}}]}},
            {
                "rule": {
                    "comment": "loss 20%",
                    "expr": [
                        {"match": {}},
                        {"counter": {"packets": 2, "bytes": 1}},
                        {"drop": None},
                    ],
                }
            },
            {"rule": {"expr": [{"accept": None}]}},
        ]
    }
    assert parse_counters(json.dumps(listing)) == {"arriving": 7, "loss 20%": 2}


def test_one_way_link_loss_is_enforced_on_the_receiver_only() -> None:
    f = Faults(link_loss={("h1", "h2"): 30})
    assert f.rules_for("h2", ADDR) == [
        'ip saddr 10.0.0.2 numgen random mod 100 < 30 counter drop comment "loss h1 -> h2 30%"'
    ]
    assert f.rules_for("h1", ADDR) == []
    assert f.describe() == ["loss h1 -> h2 30%"]
    assert Faults.from_json(json.loads(json.dumps(f.to_json()))) == f
    # A block on the same link already drops everything: no second rule.
    assert Faults(link_loss={("h1", "h2"): 30}, blocks={("h1", "h2")}).rules_for("h2", ADDR) == [
        drop_from_rule(["10.0.0.2"], "block h1 -> h2")
    ]
