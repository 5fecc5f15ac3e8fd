"""Location-transparent messaging between agents: local delivery, forwarding to the hosting
daemon over a sealed ROUTING link, at-least-once de-duplication, per-host circuit breakers,
and cluster-wide signals (pub/sub with topic wildcards)."""
