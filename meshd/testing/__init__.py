"""Helpers for running real meshd processes locally (tests, demo, benchmarks)."""
