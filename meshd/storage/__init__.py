"""The per-node store: every replicated document this node holds, on disk.

``records`` frames and checksums what is written; ``files`` is the only code that touches the
file system (a real one, or the simulated disk of :mod:`meshd.sim.disk` that loses what was
not fsynced); ``store`` is the storage core — recovery, the append log with group commit,
snapshots — with no trio and no clock; ``driver`` runs it under trio, off the event loop.
"""
