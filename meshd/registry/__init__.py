"""The cluster-wide agent registry, replicated as one single-writer document per node.

Each node writes only its own entries (``reg/<node>``), so registrations never conflict at
the CRDT level. A lookup takes the union over the nodes membership reports up, and when two
live entries claim one name (registered on both sides of a partition) every node picks the
same winner with :func:`resolve.winner`.
"""
