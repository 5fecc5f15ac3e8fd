"""Delta-CRDT replication of pycrdt documents between daemons.

`core.Replicator` is the sans-IO sync protocol: a fast path that pushes each local delta to a
few peers (who forward what was new to them), and anti-entropy rounds that compare bucketed
digests of every document's state vector and repair whatever the fast path missed.
`driver.ReplicationDriver` runs it over persistent sealed TCP links.
"""
