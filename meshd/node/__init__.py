"""The composition root (`Node`) and the daemon-level services it wires together."""
