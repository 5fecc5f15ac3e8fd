"""Deterministic simulation: real protocol cores on a simulated network in virtual time."""

from meshd.sim.network import SimNetwork, SimNode

__all__ = ["SimNetwork", "SimNode"]
