"""Integration with systemd service management.

Only the notification protocol lives here: it lets a ``Type=notify`` unit tell systemd when the
daemon is really ready (not merely forked), when it is reloading or stopping, and prove liveness
to the service watchdog. It is implemented directly on a Unix datagram socket so the daemon does
not need libsystemd or any binding to it.
"""

from meshd.systemd.notify import Notifier

__all__ = ["Notifier"]
