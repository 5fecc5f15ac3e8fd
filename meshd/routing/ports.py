"""What routing and placement need from each other and from the API, as small protocols.

Routing sits below placement: placement may use the router, but the router knows placement
only as an :class:`Activator` handed to it at construction. Neither knows the API server: an
agent's events go to an :class:`EventSink` (the API's stream handle is one), and the client
that serves an agent is an opaque owner compared by identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from meshd.registry.model import Entry
from meshd.wire.membership import Status

if TYPE_CHECKING:
    from meshd.routing.messages import Deliver
    from meshd.routing.outcome import Outcome


class EventSink(Protocol):
    """Where events for a client go (an API stream)."""

    def emit(self, payload: Any) -> None:
        """Queue one event; raises ``Overloaded`` if the client is not keeping up."""

    def offer(self, payload: Any) -> None:
        """Queue one event; a failure ends the stream instead of raising."""


class Activator(Protocol):
    """What routing asks of placement: start agents that are not running anywhere."""

    async def ensure_active(self, name: str, kind: str | None, deadline: float) -> Entry:
        """The entry of ``name`` once it runs where it belongs (``not_found`` if nobody
        serves its kind)."""

    def may_run(self, kind: str) -> bool:
        """May an agent of ``kind`` start on this side of a partition?"""

    async def activate_local(self, name: str, kind: str, deadline: float) -> Entry:
        """Start ``name`` here (another daemon's placement chose this host)."""


class AgentHost(Protocol):
    """What placement asks of routing: start an agent on another host, stop one here."""

    async def activate_remote(self, host: str, name: str, kind: str, deadline: float) -> Entry:
        """Ask ``host`` to start ``name``; its entry once it runs there."""

    def deactivate(self, name: str, reason: str) -> bool:
        """Ask the local agent ``name`` to stop (``minority``, ``drain``, ``rebalance``);
        False if it is not served here."""


class Wire(Protocol):
    """The routing links to other daemons, as the routing core sees them (PeerLinks)."""

    def send(self, peer: str, frame: bytes) -> bool:
        """Queue one frame for ``peer`` without blocking; False if it was dropped."""

    def connected(self, peer: str) -> bool:
        """Is a connection to ``peer`` established right now?"""


class Directory(Protocol):
    """Where agents run, as the routing core sees the registry."""

    def lookup(self, name: str) -> Entry | None:
        """The live entry of ``name``."""

    def last_known(self, name: str) -> Entry | None:
        """The entry ``name`` would have if its host were up (None if it has none)."""


class Members(Protocol):
    """Membership, as the routing core sees it."""

    def peek(self, name: str) -> tuple[Status, dict[str, str], float] | None:
        """``name``'s status, tags and the time of its last status change."""


class DeliveryObserver(Protocol):
    """Who watches deliveries from other hosts (the daemon's tracing: a span per remote
    delivery). Set only when tracing is on; the core then calls it once per DELIVER."""

    def remote_delivery(self, peer: str, msg: Deliver) -> tuple[Deliver, Callable[[Outcome], None]]:
        """``msg`` as it should reach the agent (its trace context now the observer's
        span's), and what to call with the delivery's outcome."""
