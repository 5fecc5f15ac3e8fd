"""Agent lifecycle: where agents run (rendezvous placement), activation of virtual agents,
failover, the partition strategy per kind, drain and rebalance, reminders."""
