"""meshd's chaos harness: isolated hosts and network faults for real daemons.

The host layer (:mod:`chaos.netns`) puts every host in its own Linux network namespace on a
private bridge and expresses faults (loss, one-way blocks, partitions) as nftables rules
inside the host, so that the same rule text works unchanged inside a container later.
"""

from chaos.netns import ChaosError, Conflict, Host, HostNet, render_ruleset, unavailable_reason

__all__ = ["ChaosError", "Conflict", "Host", "HostNet", "render_ruleset", "unavailable_reason"]
