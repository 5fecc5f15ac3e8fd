"""Plain value types the client hands to applications."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """A registry entry: where an agent runs and what it offers."""

    name: str
    node: str
    kind: str = ""
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    registered_at: int = 0
    entry_id: str = ""

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> AgentInfo:
        return cls(
            name=str(value.get("name", "")),
            node=str(value.get("node", "")),
            kind=str(value.get("kind", "")),
            capabilities=tuple(value.get("capabilities", ())),
            metadata=dict(value.get("metadata", {})),
            registered_at=int(value.get("registered_at", 0)),
            entry_id=str(value.get("entry_id", "")),
        )


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    """``registered``, ``unregistered``, ``moved`` or ``conflict`` (see the protocol docs)."""

    kind: str
    name: str
    agent: AgentInfo
    previous: AgentInfo | None = None
    winner: AgentInfo | None = None

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> RegistryEvent:
        prev = value.get("previous")
        won = value.get("winner")
        return cls(
            kind=str(value.get("kind", "")),
            name=str(value.get("name", "")),
            agent=AgentInfo.from_wire(value.get("entry", {})),
            previous=AgentInfo.from_wire(prev) if isinstance(prev, dict) else None,
            winner=AgentInfo.from_wire(won) if isinstance(won, dict) else None,
        )


@dataclass(frozen=True, slots=True)
class Message:
    """A message or request delivered to an agent."""

    id: str
    body: Any
    sender: str = ""
    is_request: bool = False
    at_least_once: bool = False
    # W3C Trace Context of the call (None if the sender had none): the handler runs in it
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal: the topic it was published to and its CloudEvents envelope."""

    topic: str
    id: str
    source: str
    type: str
    data: Any = None
    subject: str | None = None
    time: str | None = None
    specversion: str = "1.0"
    extensions: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> Signal:
        event = value.get("event", {})
        return cls(
            topic=str(value.get("topic", "")),
            id=str(event.get("id", "")),
            source=str(event.get("source", "")),
            type=str(event.get("type", "")),
            data=event.get("data"),
            subject=event.get("subject"),
            time=event.get("time"),
            specversion=str(event.get("specversion", "1.0")),
            extensions={k: v for k, v in event.items() if k not in _CLOUDEVENT_FIELDS},
        )


_CLOUDEVENT_FIELDS = ("id", "source", "type", "data", "subject", "time", "specversion")
