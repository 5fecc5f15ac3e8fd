"""Runners: a client process that can create agents of a kind on demand.

``mesh.serve_kind("counter", factory, capacity=100)`` tells the local daemon this process
can run ``counter`` agents. Placement (rendezvous hashing over the hosts serving the kind)
decides which host owns each agent; the owner's daemon asks one of its runners to
*activate* it — on its first message (virtual agents), on ``spawn``, on failover from a dead
host, or when a drain or rebalance moves it here. The runner calls ``factory(name)`` for a
handler and serves the agent; after ``idle_timeout`` seconds without messages it deactivates
the agent again (its state stays replicated).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus

from meshd_client.agents import Agent, Handler
from meshd_client.protocol import errors
from meshd_client.protocol.errors import MeshError

if TYPE_CHECKING:
    from meshd_client.mesh import Mesh

log = logging.getLogger("meshd_client.runners")
Strategy = Literal["keep_majority", "allow_duplicates"]
Factory = Callable[[str], Handler]


class Runner:
    def __init__(
        self,
        mesh: Mesh,
        kind: str,
        factory: Factory,
        *,
        capacity: int,
        strategy: Strategy,
        idle_timeout: float | None,
        concurrency: int,
    ) -> None:
        self.mesh = mesh
        self.kind = kind
        self.factory = factory
        self.capacity = capacity
        self.strategy = strategy
        self.idle_timeout = idle_timeout
        self.concurrency = concurrency
        self.agents: dict[str, Agent] = {}
        self.activations = 0
        self.deactivations: dict[str, int] = {}
        self._scope = anyio.CancelScope()
        self._tg: TaskGroup | None = None

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        with self._scope:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.idle_timeout is not None:
                    tg.start_soon(self._reap_idle, self.idle_timeout)
                while True:
                    conn = await self.mesh.wait_connected()
                    args = {"kind": self.kind, "capacity": self.capacity, "strategy": self.strategy}
                    try:
                        async with conn.stream("kind.serve", args) as items:
                            async for item in items:
                                if item.get("type") == "serving" and not started:
                                    started = True
                                    task_status.started()
                                elif item.get("type") == "activate":
                                    tg.start_soon(self._activate, str(item.get("name")))
                    except (errors.Closed, errors.Unreachable):
                        continue
                    except MeshError:
                        if not started:
                            raise
                        log.exception("runner for %s stopped", self.kind)
                        return

    async def _activate(self, name: str) -> None:
        current = self.agents.get(name)
        if current is not None and not current.stopped.is_set():
            return
        try:
            handler = self.factory(name)
            agent = await self.mesh.serve(
                name, handler, kind=self.kind, concurrency=self.concurrency
            )
        except errors.Conflict:
            return  # already running somewhere (another host won the race)
        except MeshError as exc:
            log.warning("could not activate %s: %s", name, exc)
            return
        self.activations += 1
        self.agents[name] = agent
        assert self._tg is not None
        self._tg.start_soon(self._forget_when_stopped, agent)

    async def _forget_when_stopped(self, agent: Agent) -> None:
        await agent.wait()
        reason = agent.stop_reason or "stopped"
        self.deactivations[reason] = self.deactivations.get(reason, 0) + 1
        if self.agents.get(agent.name) is agent:
            del self.agents[agent.name]

    async def _reap_idle(self, idle_timeout: float) -> None:
        while True:
            await anyio.sleep(min(1.0, idle_timeout / 2))
            now = anyio.current_time()
            for agent in list(self.agents.values()):
                if now - agent.last_activity > idle_timeout and not agent.is_leaving():
                    agent.deactivate("idle")


def default_factory(handler: Handler) -> Factory:
    """A factory that serves every agent of the kind with the same handler."""

    def make(_name: str) -> Handler:
        return handler

    return make


__all__ = ["Factory", "Runner", "Strategy", "default_factory"]
