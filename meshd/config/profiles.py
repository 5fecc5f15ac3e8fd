"""Named tuning profiles.

``lan`` is memberlist's DefaultLANConfig; ``wan`` its DefaultWANConfig; ``local`` its
DefaultLocalConfig (one machine or one rack: fast timers for tests, demos and loopback).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from meshd.config.model import ConfigError, MembershipTuning

_LAN: Final = MembershipTuning()

_WAN: Final = replace(
    _LAN,
    probe_interval=5.0,
    probe_timeout=3.0,
    suspicion_mult=6,
    suspicion_min_timeout=10.0,  # two probe intervals, as on the LAN
    gossip_interval=0.5,
    gossip_nodes=4,
    gossip_to_dead=60.0,
    push_pull_interval=60.0,
    tcp_timeout=30.0,
    reconnect_interval=60.0,
)

_LOCAL: Final = replace(
    _LAN,
    probe_interval=1.0,
    probe_timeout=0.2,
    suspicion_mult=3,
    suspicion_max_timeout_mult=6,
    retransmit_mult=2,
    gossip_interval=0.1,
    gossip_to_dead=15.0,
    push_pull_interval=15.0,
    tcp_timeout=1.0,
    reconnect_interval=5.0,
    join_retry_max=5.0,
    leave_timeout=2.0,
)

PROFILES: Final[dict[str, MembershipTuning]] = {"lan": _LAN, "wan": _WAN, "local": _LOCAL}


def profile_tuning(name: str) -> MembershipTuning:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(
            "profile", f"unknown profile {name!r} (choose {', '.join(PROFILES)})"
        ) from None
