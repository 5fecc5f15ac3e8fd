"""Calls to other daemons: circuit breakers, one-way sends and exchanges awaiting a RESULT.

Sans-IO: frames leave through a :class:`~meshd.routing.ports.Wire`, time comes in as ``now``
and deadlines are timers on the core's heap. Rules:

* A call to a host membership does not call up fails at once (``unreachable``) and opens the
  host's breaker; so does a call while the breaker refuses it (open, or half-open with its
  trial already out).
* A frame the link will not take (queue full) fails the call at once (``overloaded``).
* An exchange ends with the RESULT its host sends back, or at its deadline (``timeout``; a
  failure for the breaker unless the link is up, for a slow handler is not a dead host), or
  when the host dies or the connection carrying it breaks (``unreachable``: a restarted
  daemon forgot what it was asked). Every end but the deadline closes the host's breaker —
  also the one a death just tripped, as the router always did (membership still refuses
  calls to a dead host; the breaker matters again once it is back).

Exchanges are indexed by host, then message id: a dead host's are found without a scan.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.routing import messages
from meshd.routing.breaker import Breaker
from meshd.routing.messages import Message, Result
from meshd.routing.outcome import Done, Err, Outcome, complete, from_result
from meshd.routing.ports import Members, Wire
from meshd.routing.stats import RouterStats
from meshd.timers import Timer, TimerHeap
from meshd_client.protocol import errors


@dataclass(slots=True, eq=False)
class _Exchange:
    host: str
    msg_id: str
    what: str  # what the call is about, for its error messages
    done: Done
    timer: Timer[_Exchange] | None = None


class Remote:
    """Owns the breakers and the exchanges under way with other hosts. Reads membership;
    never touches agents served here (:class:`~meshd.routing.local.LocalAgents`)."""

    def __init__(
        self, *, wire: Wire, members: Members, timers: TimerHeap, stats: RouterStats
    ) -> None:
        self.wire = wire
        self.members = members
        self.timers = timers
        self.stats = stats
        self.breakers: dict[str, Breaker] = {}
        self._pending: dict[str, dict[str, _Exchange]] = {}

    def breaker(self, host: str) -> Breaker:
        breaker = self.breakers.get(host)
        if breaker is None:
            breaker = self.breakers[host] = Breaker()
        return breaker

    def pending(self, host: str) -> int:
        """Exchanges under way with ``host``."""
        return len(self._pending.get(host, ()))

    # ------------------------------------------------------------------ starting calls

    def check(self, now: float, host: str, what: str) -> None:
        """Raise ``unreachable`` if ``host`` is down or its breaker refuses a call now."""
        breaker = self.breaker(host)
        state = self.members.peek(host)
        if state is None or not state[0].up:
            breaker.trip(now)
            self.stats.unreachable += 1
            raise errors.Unreachable(f"{what!r} is on {host}, which is down", detail={"host": host})
        if not breaker.allow(now):
            self.stats.unreachable += 1
            raise errors.Unreachable(
                f"{what!r} is on {host}, which is unreachable (circuit open)",
                detail={"host": host, "breaker": breaker.state.value},
            )

    def _put(self, host: str, msg: Message) -> None:
        if not self.wire.send(host, messages.encode(msg)):
            self.breaker(host).trial_in_flight = False
            raise errors.Overloaded(f"the link to {host} is backed up")

    def send(self, now: float, host: str, msg: messages.Deliver) -> None:
        """Hand a fire-and-forget message to the link (raises if refused)."""
        self.check(now, host, msg.to)
        self._put(host, msg)
        self.breaker(host).trial_in_flight = False
        self.stats.forwarded += 1

    def exchange(
        self,
        now: float,
        host: str,
        msg_id: str,
        msg: Message,
        deadline: float,
        done: Done,
        *,
        what: str,
    ) -> None:
        """Send ``msg`` to ``host``; ``done`` gets the outcome its RESULT carries, or the
        failure of the exchange. Raises (having sent nothing) if the call cannot start."""
        self.check(now, host, what)
        self._put(host, msg)
        exchange = _Exchange(host, msg_id, what, done)
        by_id = self._pending.get(host)
        if by_id is None:
            by_id = self._pending[host] = {}
        by_id[msg_id] = exchange
        exchange.timer = self.timers.at(deadline, self._expired, exchange)

    # ------------------------------------------------------------------ ending them

    def _end(self, exchange: _Exchange, outcome: Outcome) -> None:
        self._unlink(exchange)
        if exchange.timer is not None:
            self.timers.cancel(exchange.timer)
            exchange.timer = None
        # Any answer (even a failure we settle for it) closes the breaker.
        self.breaker(exchange.host).success()
        complete(exchange.done, outcome)

    def on_result(self, peer: str, msg: Result) -> bool:
        """A RESULT from ``peer``: end the exchange it answers (False if none waits)."""
        self.stats.results += 1
        by_id = self._pending.get(peer)
        exchange = by_id.get(msg.msg_id) if by_id is not None else None
        if exchange is None:
            return False
        self._end(exchange, from_result(msg))
        return True

    def _unlink(self, exchange: _Exchange) -> None:
        # A later exchange with the same id (a caller's own id, reused) may hold the slot.
        by_id = self._pending.get(exchange.host)
        if by_id is not None and by_id.get(exchange.msg_id) is exchange:
            del by_id[exchange.msg_id]
            if not by_id:
                del self._pending[exchange.host]

    def _expired(self, now: float, exchange: _Exchange) -> None:
        exchange.timer = None
        self._unlink(exchange)
        self.stats.timeouts += 1
        breaker = self.breaker(exchange.host)
        if self.wire.connected(exchange.host):
            breaker.trial_in_flight = False  # a slow handler is not a dead host
        else:
            breaker.failure(now)
        error = errors.Timeout(
            f"no answer from {exchange.what!r} on {exchange.host} in time",
            detail={"host": exchange.host},
        )
        complete(exchange.done, Err(error))

    def _fail_all(self, host: str, message: str) -> None:
        by_id = self._pending.get(host)
        if not by_id:
            return
        for exchange in list(by_id.values()):
            self._end(exchange, Err(errors.Unreachable(message)))

    # ------------------------------------------------------------------ health inputs

    def host_down(self, now: float, host: str) -> None:
        """Membership declared ``host`` dead: open its breaker, fail its exchanges now."""
        self.breaker(host).trip(now)
        self._fail_all(host, f"host {host} died")

    def host_suspect(self, now: float, host: str) -> None:
        """Membership suspects ``host``: open its breaker, so that new calls fail fast with
        ``unreachable`` while it is silent. Exchanges already sent keep waiting for their
        result (a suspect may still answer); the member's refutation lets a trial through."""
        self.breaker(host).trip(now)

    def host_up(self, host: str) -> None:
        self.breaker(host).host_up()

    def link_lost(self, host: str) -> None:
        """The connection to ``host`` broke: results of frames sent on it will not come."""
        self._fail_all(host, f"the connection to {host} broke")

    def link_status(self, now: float, host: str, connected: bool) -> None:
        """Whether connecting to ``host`` worked."""
        breaker = self.breaker(host)
        if connected:
            breaker.success()
        else:
            breaker.failure(now)
