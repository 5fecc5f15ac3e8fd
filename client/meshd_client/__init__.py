"""Thin client for the meshd daemon (anyio: works under asyncio and trio)."""

__version__ = "0.1.0"
