"""Benchmarks: the membership protocol measured in the simulator (``python -m bench.simulate``)."""
