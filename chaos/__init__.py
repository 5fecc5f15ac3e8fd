"""meshd's chaos harness: isolated hosts, real faults, a recorded workload and a checker.

* :mod:`chaos.faults` — faults as data and the nftables text that enforces them (pure);
* :mod:`chaos.netns` — hosts as network namespaces on a bridge (:class:`HostNet`);
* :mod:`chaos.backends`, :mod:`chaos.docker` — where hosts live: namespaces or containers;
* :mod:`chaos.cluster` — a meshd cluster on a backend: up, faults, heal, down;
* :mod:`chaos.workload` — client traffic through every host's daemon, recorded;
* :mod:`chaos.history` — the record of a run (JSON lines);
* :mod:`chaos.observe` — what the cluster looks like after the heal;
* :mod:`chaos.checker` — invariants judged from the history alone;
* :mod:`chaos.scenario`, :mod:`chaos.runner` — scenario files and running them;
* :mod:`chaos.cli` — the ``chaos`` command (docs/chaos.md).
"""

from chaos.faults import Faults, render_ruleset
from chaos.netns import ChaosError, Conflict, Host, HostNet, unavailable_reason

__all__ = [
    "ChaosError",
    "Conflict",
    "Faults",
    "Host",
    "HostNet",
    "render_ruleset",
    "unavailable_reason",
]
