"""The one definition of meshd's wire conventions shared by daemon and client.

The daemon imports this package; nothing here depends on trio, pycrdt or the daemon.
"""
