"""Shared agent state: named, multi-writer pycrdt documents (maps, lists, text, counters)."""
