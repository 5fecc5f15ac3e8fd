"""meshd: a CRDT gossip mesh daemon.

One daemon per host runs SWIM/Lifeguard membership, replicates the agent registry and shared
agent state as delta CRDTs, and serves a local Unix-socket API to the thin client library.
The package layout follows the architecture: each subpackage is one concern.
"""

__version__ = "0.1.0"
