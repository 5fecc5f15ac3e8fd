"""Command-line entry points: ``meshd`` (the daemon) and ``meshctl`` (the operator's tool)."""
