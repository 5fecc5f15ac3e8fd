"""Network faults as data, and the nftables text that enforces them. Pure: no I/O.

Why a separate module: both backends (network namespaces and Docker containers) load the
*same* rule text into each host with ``nft -f -``; only the way the text reaches the host
differs (``ip netns exec`` or ``docker exec``). Keeping the rendering here, free of any
process or kernel call, lets the text be unit-tested anywhere and guarantees that a fault
means the same thing in a namespace, a container or a VM.

The model (:class:`Faults`) is the *desired* fault state of the whole cluster. Every fault
command changes the model and re-renders the rules of the hosts it touches; each host's
table is replaced in one transaction, so there is never a window with half a partition.

Rules drop on the receiver's *input* hook only (see :mod:`chaos.netns` for why): a fault is
silent for the sender, as a real lossy or partitioned network is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TABLE = "meshd_chaos"


def render_ruleset(rules: Sequence[str], *, table: str = TABLE, exempt: Sequence[str] = ()) -> str:
    """The nft script that makes ``table inet <table>`` hold exactly ``rules`` on input.

    Loaded with ``nft -f -`` it is one transaction: the first line makes sure the table exists
    so that the delete cannot fail, and the table is rebuilt from scratch. Loopback and the
    ``exempt`` source addresses (the harness's own controller) are accepted before any fault;
    what is left is counted (``arriving``), as is what each fault rule drops, so that a run
    can report the loss it actually got. Pure text, so the same script works in a namespace,
    a container or a VM.
    """
    lines = [
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        '\t\tiifname "lo" accept',
        *(f"\t\tip saddr {addr} accept" for addr in exempt),
        '\t\tcounter comment "arriving"',
        *(f"\t\t{rule}" for rule in rules),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def loss_rule(percent: int) -> str:
    """Drop ``percent`` % of arriving packets, independently per packet. (nft rejects
    ``< 100`` since the value exceeds the range of ``mod 100``, so 100 % is a plain drop.)"""
    if percent >= 100:
        return 'counter drop comment "loss 100%"'
    return f'numgen random mod 100 < {percent} counter drop comment "loss {percent}%"'


def drop_from_rule(addrs: Sequence[str], why: str) -> str:
    """Drop everything arriving from ``addrs``."""
    return f'ip saddr {{ {", ".join(addrs)} }} counter drop comment "{why}"'


def loss_from_rule(addr: str, percent: int, why: str) -> str:
    """Drop ``percent`` % of what arrives from ``addr`` (a lossy one-way link)."""
    if percent >= 100:
        return f'ip saddr {addr} counter drop comment "{why}"'
    return f'ip saddr {addr} numgen random mod 100 < {percent} counter drop comment "{why}"'


def parse_counters(nft_json: str) -> dict[str, int]:
    """Packets counted per rule comment, from ``nft -j list table inet <table>``: the
    ``arriving`` packets and what each fault rule dropped."""
    found: dict[str, int] = {}
    for item in json.loads(nft_json).get("nftables", []):
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                comment = rule["comment"]
                found[comment] = found.get(comment, 0) + int(expr["counter"]["packets"])
    return found


def percent_of(p: float) -> int:
    """A loss fraction (0–1) as whole percent; nft's ``numgen random mod 100`` has no finer
    grain, and silently rounding 10.5 % would make a run report a loss it never had."""
    if not 0.0 <= p <= 1.0:
        raise ValueError("loss must be between 0 and 1")
    percent = round(p * 100)
    if abs(p * 100 - percent) > 1e-6:
        raise ValueError("loss is applied in whole percent (numgen random mod 100)")
    return percent


@dataclass(slots=True)
class Faults:
    """The desired fault state, from which each host's rules are rendered.

    * ``loss``: host -> percent of arriving packets dropped;
    * ``link_loss``: one-way lossy links ``(src, dst)`` -> percent of src's packets that
      dst drops (an asymmetric fault: dst's packets to src are not touched);
    * ``blocks``: one-way cuts ``(src, dst)``: src can no longer reach dst;
    * ``groups``: a partition, hosts only reach their own group;
    * ``bridges``: hosts outside every group that reach (and are reached by) all groups,
      the classic "bridge" partition where one node sees both sides.
    """

    loss: dict[str, int] = field(default_factory=dict)
    link_loss: dict[tuple[str, str], int] = field(default_factory=dict)
    blocks: set[tuple[str, str]] = field(default_factory=set)
    groups: list[list[str]] | None = None
    bridges: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.loss or self.link_loss or self.blocks or self.groups)

    def rules_for(self, host: str, addr_of: Mapping[str, str]) -> list[str]:
        rules: list[str] = []
        if self.groups is not None and host not in self.bridges:
            mine = next((g for g in self.groups if host in g), None)
            if mine is None:
                raise ValueError(f"{host} is in no partition group and is not a bridge")
            others = sorted(
                (h for g in self.groups if g is not mine for h in g if h not in self.bridges),
                key=lambda h: addr_of[h],
            )
            if others:
                rules.append(
                    drop_from_rule([addr_of[h] for h in others], f"partition: {host} | others")
                )
        for src, dst in sorted(self.blocks):
            if dst == host:
                rules.append(drop_from_rule([addr_of[src]], f"block {src} -> {dst}"))
        for (src, dst), p in sorted(self.link_loss.items()):
            if dst == host and (src, dst) not in self.blocks:
                rules.append(loss_from_rule(addr_of[src], p, f"loss {src} -> {dst} {p}%"))
        percent = self.loss.get(host, 0)
        if percent:
            rules.append(loss_rule(percent))
        return rules

    def describe(self) -> list[str]:
        """One line per active fault, for ``chaos status`` and the history."""
        out: list[str] = []
        if self.groups is not None:
            text = " | ".join(",".join(g) for g in self.groups)
            via = f" (bridge {','.join(self.bridges)})" if self.bridges else ""
            out.append(f"partition {text}{via}")
        out += [f"block {s} -> {d}" for s, d in sorted(self.blocks)]
        out += [f"loss {s} -> {d} {p}%" for (s, d), p in sorted(self.link_loss.items())]
        out += [f"loss {h} {p}%" for h, p in sorted(self.loss.items())]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "loss": dict(self.loss),
            "link_loss": sorted([[s, d, p] for (s, d), p in self.link_loss.items()]),
            "blocks": sorted([list(b) for b in self.blocks]),
            "groups": self.groups,
            "bridges": list(self.bridges),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Faults:
        if not data:
            return cls()
        groups = data.get("groups")
        return cls(
            loss={str(h): int(p) for h, p in dict(data.get("loss", {})).items()},
            link_loss={(str(s), str(d)): int(p) for s, d, p in data.get("link_loss", [])},
            blocks={(str(s), str(d)) for s, d in data.get("blocks", [])},
            groups=[[str(h) for h in g] for g in groups] if groups is not None else None,
            bridges=[str(h) for h in data.get("bridges", [])],
        )


def partition_groups(
    all_hosts: Sequence[str], groups: Sequence[Sequence[str]], bridges: Sequence[str] = ()
) -> list[list[str]] | None:
    """Normalize a partition: hosts named nowhere (and not bridges) form one more group;
    a partition with fewer than two groups is no partition (None)."""
    named = [list(g) for g in groups]
    flat = [h for g in named for h in g] + list(bridges)
    unknown = sorted(set(flat) - set(all_hosts))
    if unknown:
        raise ValueError(f"unknown hosts: {', '.join(unknown)}")
    if len(flat) != len(set(flat)):
        raise ValueError("a host appears in more than one group (or is also a bridge)")
    rest = [h for h in all_hosts if h not in flat]
    full = [g for g in named if g] + ([rest] if rest else [])
    return full if len(full) > 1 else None


def parse_groups(text: str) -> list[list[str]]:
    """``"h1,h2 | h3,h4"`` -> ``[["h1", "h2"], ["h3", "h4"]]`` (the CLI's partition syntax)."""
    groups = [[h.strip() for h in part.split(",") if h.strip()] for part in text.split("|")]
    if len(groups) < 2 or any(not g for g in groups):
        raise ValueError(f"expected groups like 'h1,h2 | h3,h4', got {text!r}")
    return groups
